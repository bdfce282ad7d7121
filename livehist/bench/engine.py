"""Engine figures of `livehist bench`, each a median ratio of alternated pairs (see `alternate`).

- kernels (one thread, int32 events, 10^7 of them: beyond every cache) beside the memory-read
  floor (numpy.sum over the arrays read) or numpy.bincount, both timed in thread CPU time
  (single-threaded calls: the time slices other processes take do not count);
- the realistic configuration (1000-bin TOF, 10^6-pixel image, ROI spectrum) in memory: one
  fused pass beside a pass per histogram, and 2 accumulating threads beside 1;
- the same configuration end to end over ZeroMQ beside bare receive + decode of the same
  messages, both from the same producer in the same run.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import zmq

from livehist.bench.common import E2E_HISTOGRAMS, CpuUse, MultiProducer, _row, alternate
from livehist.engine import histograms
from livehist.engine.events import EventBatch, decode
from livehist.engine.histograms import HistogramSet, make
from livehist.engine.spec import parse_histograms


def _one_pulse(tof: np.ndarray, pixel: np.ndarray) -> EventBatch:
    return EventBatch(tof, pixel, np.zeros(1, np.int64), np.zeros(1, np.int64))


def _set(spec_json: list[dict], threads: int = 1) -> HistogramSet:
    return HistogramSet([make(s, threads) for s in parse_histograms(spec_json)], threads)


def _note(r: dict) -> str:
    return (f"median of {len(r['ratios'])} alternated pairs {r['ratio']:.2f}x (spread {r['ratio_min']:.2f}.."
            f"{r['ratio_max']:.2f}); medians {r['subject']:.3g} vs {r['reference']:.3g}")  # fmt: skip


def engine_kernels(n: int, pairs: int) -> None:
    rng = np.random.default_rng(42)
    tof = rng.integers(0, 72_000_000, n, dtype=np.int32)
    pixel = rng.integers(0, 1_000_000, n, dtype=np.int32)
    tof_axis = {"start": 0, "stop": 7.2e7, "bins": 1000}
    pt_axis = {"start": 0, "stop": 7.2e7, "bins": 100}

    def kernel_row(figure, spec_json, batch, reference, ref_name, target, need):
        hs = _set(spec_json)
        hs.add(batch)  # compile
        r = alternate(lambda: hs.add(batch), reference, pairs, work=n, clock=time.thread_time)
        _row(figure, r["subject"], "events/s", ref_name, r["reference"], target,
             need is None or r["ratio"] >= need, pairs=r)  # fmt: skip
        return r

    both = _one_pulse(tof, pixel)
    floor_tof = lambda: tof.sum()  # noqa: E731
    kernel_row("engine tof 1D, 1000 bins (int32 events)", [{"name": "t", "kind": "tof", "tof": tof_axis}],
               both, floor_tof, "memory-read floor (numpy.sum of the TOF array)", ">= 0.8x floor", 0.8)  # fmt: skip
    kernel_row("engine image, 10^6 pixels", [{"name": "i", "kind": "image", "pixels": {"first": 0, "shape": [1000, 1000]}}],
               both, lambda: np.bincount(pixel, minlength=1_000_000), "numpy.bincount", ">= 2x numpy.bincount", 2.0)  # fmt: skip
    for count, need in ((10_000, 0.4), (100_000, None)):
        pix = pixel % count if count != 1_000_000 else pixel
        kernel_row(f"engine pixel_tof, {count:.0e} pixels x 100 bins".replace("+0", ""),
                   [{"name": "p", "kind": "pixel_tof", "pixels": {"first": 0, "count": count}, "tof": pt_axis}],
                   _one_pulse(tof, pix), lambda p=pix: (tof.sum(), p.sum()),
                   "memory-read floor (numpy.sum of both arrays)", ">= 0.4x floor" if need else "reported", need)  # fmt: skip

    # the realistic configuration in memory: one fused pass against a pass per histogram
    fused = _set(E2E_HISTOGRAMS)
    alone = [_set([h]) for h in E2E_HISTOGRAMS]
    fused.add(both)
    for s in alone:
        s.add(both)
    r = alternate(lambda: fused.add(both), lambda: [s.add(both) for s in alone], pairs, work=n,
                  clock=time.thread_time)  # fmt: skip
    _row("engine, tof + 10^6-pixel image + ROI spectrum in one fused pass", r["subject"], "events/s",
         "the same histograms, one pass each", r["reference"], "reported", True, pairs=r)  # fmt: skip

    # 2 accumulating threads against 1 (in memory, the Engine's path: lock, counters, partials)
    from livehist.engine import Engine

    per = 1 << 20
    batches = [_one_pulse(tof[i : i + per], pixel[i : i + per]) for i in range(0, n - per + 1, per)]
    engines = {k: Engine(parse_histograms(E2E_HISTOGRAMS), threads=k) for k in (1, 2)}
    for e in engines.values():
        e.process(batches[0])
    work = per * len(batches)
    r = alternate(lambda: [engines[2].process(b) for b in batches],
                  lambda: [engines[1].process(b) for b in batches], pairs, work=work)  # fmt: skip
    mem = {k: sum(h.nbytes for h in e._hists.values()) for k, e in engines.items()}
    _row("engine, same configuration in memory, 2 accumulating threads (Threads=2)", r["subject"], "events/s",
         "1 thread", r["reference"], "reported", True, pairs=r)  # fmt: skip
    from livehist.bench.common import ROWS

    ROWS[-1]["detail"] = (f"counts memory {mem[2] / 2**20:.1f} MiB with 2 threads, {mem[1] / 2**20:.1f} MiB "
                          f"with 1; {_note(r)}")  # fmt: skip


def _cpu_note(use: dict[str, list]) -> str:
    """Where the cores went (medians over the runs): a subject that leaves no core idle cannot
    go faster on this machine by overlapping better, only by spending less CPU per event."""
    import os

    def med(side: str, key: str) -> float:
        return float(np.median([u[key] for u in use[side]]))

    def ns(side: str) -> float:
        return float(np.median([u["process_cpu"] / u["events"] * 1e9 for u in use[side]]))

    return (f"cores busy on the machine (of {os.cpu_count()}, producer included): {med('engine', 'busy_cores'):.2f} "
            f"with the engine, {med('bare', 'busy_cores'):.2f} with the bare receiver; CPU of this process per "
            f"event: {ns('engine'):.2f} ns (receive + histogram), {ns('bare'):.2f} ns (receive + decode)")  # fmt: skip


class _BareReceiver:
    """The reference: receive + decode only (what the transport delivers), in one thread."""

    def __init__(self, port: int) -> None:
        self.events = 0
        self._stop = threading.Event()
        self._sock = zmq.Context.instance().socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, 8)
        self._sock.connect(f"tcp://127.0.0.1:{port}")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._sock.poll(50):
                self.events += len(decode(self._sock.recv(copy=False).buffer))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close(linger=0)


def end_to_end(seconds: float, pairs: int, threads: int = 1) -> float:
    """The realistic configuration over zmq:// beside bare receive + decode; returns the engine's rate."""
    from livehist.engine import Engine
    from livehist.engine.memory import retain_freed_memory
    from livehist.engine.sources import open_source

    retain_freed_memory()  # as the zmq source does: the bare receiver runs under the same malloc
    producer = MultiProducer()
    losses: list[str] = []
    use: dict[str, list] = {"engine": [], "bare": []}  # CpuUse of each run

    def measured(side: str, counted, dropped) -> tuple[dict, float]:
        cpu = CpuUse()
        cpu.start()
        sent, took = producer.run(seconds, counted, dropped)
        use[side].append(dict(cpu.stop(), events=sent["events"]))
        return sent, took

    try:

        def engine_run() -> float:
            engine = Engine(parse_histograms(E2E_HISTOGRAMS), threads=threads)
            engine.start(open_source(f"zmq://127.0.0.1:{producer.bind()}"))
            time.sleep(0.3)  # connected
            sent, took = measured("engine", lambda: engine.events, lambda: engine.dropped_messages)
            engine.stop()
            snap = engine.snapshot()
            if not (snap.events == sent["events"] and snap.dropped_messages == 0
                    and int(snap.counts["image"].sum()) == sent["events"]):  # fmt: skip
                losses.append(
                    f"sent {sent['events']}, counted {snap.events}, dropped {snap.dropped_messages}"
                )
            return snap.events / took

        def bare_run() -> float:
            rx = _BareReceiver(producer.bind())
            time.sleep(0.3)
            sent, took = measured("bare", lambda: rx.events, lambda: 0)
            rx.close()
            return rx.events / took

        # compile before any message arrives, as the device does
        histograms.warm_up(parse_histograms(E2E_HISTOGRAMS))
        engine_run()  # warm-up: first connections
        use["engine"].clear()
        r = alternate(engine_run, bare_run, pairs)
    finally:
        producer.close()
    label = f", {threads} accumulating threads" if threads > 1 else ""
    _row(f"zmq:// end to end, tof + 10^6-pixel image + ROI spectrum{label}, runs of {seconds:g} s",
         r["subject"], "events/s", "bare receive + decode of the same messages (same run)", r["reference"],
         ">= 0.6x bare receive + decode, zero loss", r["ratio"] >= 0.6 and not losses, pairs=r)  # fmt: skip
    from livehist.bench.common import ROWS

    ROWS[-1]["detail"] = (
        ("zero loss in every run" if not losses else f"LOSS: {losses}") + "; " + _cpu_note(use)
    )
    return r["subject"]
