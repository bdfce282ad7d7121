"""sim://  a seeded neutron detector simulator (the embedded default source).

    sim://?rate=EV_PER_S&seed=N&freq=14&shape=128x128&first=1&peaks=12.5,25.1,33.0&pace=realtime|max

A pulsed source at `freq` Hz (14 Hz, ESS-like); each pulse carries Poisson(rate/freq)
events. TOF spectrum: a moderator-like background (gamma distribution) with Bragg-like
Gaussian peaks at `peaks` (ms); detector image: flat background, a powder ring and a
direct-beam spot, with gaps between 4 panels. Events are drawn from a pre-sampled pool, so
the simulator itself is cheap at any rate.
"""

from __future__ import annotations

import time

import numpy as np

from livehist.engine.events import EventBatch
from livehist.engine.sources import Source, SourceError, check_known, number, query

DEFAULT_PEAKS_MS = (12.5, 20.4, 24.0, 33.1, 41.7)
MIN_FREQ, MAX_FREQ = 0.5, 1e6  # Hz: a frame of 2 s to 1 us
MAX_PULSE_EVENTS = 2**25  # events a pulse at most: 256 MiB of events, beyond any engine's ingest
MAX_PIXELS = 2**24  # a 4096 x 4096 model takes about 1.6 GB while it is built (20000x20000: 19 GB, 67 s)


class DetectorModel:
    def __init__(
        self,
        shape: tuple[int, int] = (128, 128),
        first: int = 1,
        freq: float = 14.0,
        peaks_ms: tuple[float, ...] = DEFAULT_PEAKS_MS,
        seed: int = 0,
        pool: int = 1 << 21,
    ) -> None:
        self.shape, self.first, self.freq = shape, first, freq
        self.period_ns = int(round(1e9 / freq))
        rng = np.random.default_rng(seed)
        ny, nx = shape
        y, x = np.mgrid[0:ny, 0:nx]
        r = np.hypot((y - ny / 2) / ny, (x - nx / 2) / nx)
        weight = 0.2 + 3.0 * np.exp(-(((r - 0.3) / 0.02) ** 2)) + 20.0 * np.exp(-((r / 0.03) ** 2))
        weight[:, nx // 2 - 1 : nx // 2 + 1] = 0.0  # gaps between the 4 panels
        weight[ny // 2 - 1 : ny // 2 + 1, :] = 0.0
        cdf = np.cumsum(weight.ravel())
        cdf /= cdf[-1]
        pixel = np.searchsorted(cdf, rng.random(pool), side="right") + first
        tof_max = self.period_ns
        n_peak = int(pool * 0.35)
        background = rng.gamma(3.0, tof_max / 9.0, pool - n_peak)
        centres = np.asarray(peaks_ms, dtype=np.float64) * 1e6
        which = rng.integers(0, centres.size, n_peak) if centres.size else np.zeros(0, int)
        peaks = rng.normal(centres[which], centres[which] * 0.006) if centres.size else np.zeros(0)
        tof = np.concatenate([background, peaks])
        tof = np.mod(np.maximum(tof, 0), tof_max)  # the slow tail arrives in the next frame (frame overlap)
        rng.shuffle(tof)
        # doubled so a pulse is always one contiguous slice
        self.tof = np.concatenate([tof, tof]).astype(np.int32)
        self.pixel_id = np.concatenate([pixel, pixel]).astype(np.int32)
        self.pool = pool
        self.rng = rng

    @property
    def pixel_count(self) -> int:
        return self.shape[0] * self.shape[1]

    def pulse(self, n: int, pulse_time_ns: int) -> EventBatch:
        """A pulse of n events: a slice of the pool (no copy), or slices of it one after another
        for more events than the pool holds (it was capped at the pool without a word)."""
        cuts = []
        while n > 0 or not cuts:
            k = min(n, self.pool)
            start = int(self.rng.integers(0, self.pool))
            cuts.append(slice(start, start + k))
            n -= k
        if len(cuts) == 1:
            tof, pix = self.tof[cuts[0]], self.pixel_id[cuts[0]]
        else:
            tof = np.concatenate([self.tof[c] for c in cuts])
            pix = np.concatenate([self.pixel_id[c] for c in cuts])
        return EventBatch(
            tof, pix, np.array([pulse_time_ns], np.int64), np.zeros(1, np.int64), "ns", "livehist-sim"
        )


def parse(uri: str) -> tuple[DetectorModel, float, bool]:
    parts, params = query(uri)
    check_known(params, {"rate", "seed", "freq", "shape", "first", "peaks", "pace"}, uri)
    rate = number(params, "rate", 1e6, uri)
    freq = number(params, "freq", 14.0, uri, minimum=0.0)
    if not MIN_FREQ <= freq <= MAX_FREQ:  # a frame's TOFs are int32 ns (ev44): at most 2.1 s
        raise SourceError(
            f"EventSource {uri!r}: freq must be {MIN_FREQ} to {MAX_FREQ:.0e} Hz (a frame's TOFs must fit "
            f"ev44's int32 nanoseconds), got {params['freq']!r}"
        )
    if rate / freq > MAX_PULSE_EVENTS:  # a pulse of 1e12 / 14 events would take 570 GB
        raise SourceError(
            f"EventSource {uri!r}: rate {params['rate']} ev/s at freq={freq:g} Hz makes {rate / freq:.3g} events a "
            f"pulse; at most {MAX_PULSE_EVENTS:,} (rate <= {MAX_PULSE_EVENTS * freq:.3g} at this freq; a higher "
            "freq allows more)"
        )
    seed = int(number(params, "seed", 0, uri, integer=True))
    first = int(number(params, "first", 1, uri, integer=True))
    shape = (128, 128)
    if "shape" in params:
        try:
            ny, nx = (int(v) for v in params["shape"].lower().split("x"))
            assert ny >= 4 and nx >= 4 and ny * nx <= MAX_PIXELS
            shape = (ny, nx)
        except (ValueError, AssertionError):
            raise SourceError(
                f"EventSource {uri!r}: shape must be NYxNX (each >= 4, at most {MAX_PIXELS:,} pixels: "
                f"the model takes about 100 bytes a pixel), got {params['shape']!r}"
            ) from None
    if first + shape[0] * shape[1] > 2**31:
        raise SourceError(f"EventSource {uri!r}: first + pixels must stay below 2**31 (ev44 pixel ids are "
                          f"int32), got first={first}")  # fmt: skip
    peaks = DEFAULT_PEAKS_MS
    if "peaks" in params:
        try:
            peaks = tuple(float(v) for v in params["peaks"].split(",") if v)
            assert all(0 < v < 1e6 for v in peaks)
        except (ValueError, AssertionError):
            raise SourceError(
                f"EventSource {uri!r}: peaks must be TOFs in ms (> 0) like 12.5,20.4, got {params['peaks']!r}"
            ) from None
    pace = params.get("pace", "realtime")
    if pace not in ("realtime", "max"):
        raise SourceError(f"EventSource {uri!r}: pace must be realtime or max, got {pace!r}")
    return DetectorModel(shape, first, freq, peaks, seed), rate, pace == "realtime"


class SimSource(Source):
    paced = True

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.model, self.rate, self.realtime = parse(uri)

    def run(self) -> None:
        m = self.model
        mean = self.rate / m.freq
        t0 = time.time_ns()
        k = 0
        while not self.stopping:
            pulse_time = t0 + k * m.period_ns
            if self.realtime:
                wait = (pulse_time - time.time_ns()) / 1e9
                if wait > 0 and self._stop.wait(wait):
                    return
            self.emit(m.pulse(int(m.rng.poisson(mean)) if mean < 1e7 else int(mean), pulse_time))
            k += 1
