"""Event batches and the ESS flatbuffer messages that carry them (ev44, ev42 accepted)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from streaming_data_types import eventdata_ev44
from streaming_data_types.fbschemas.eventdata_ev42 import EventMessage
from streaming_data_types.fbschemas.eventdata_ev44 import Event44Message

log = logging.getLogger("livehist.engine.events")


class BadMessage(ValueError):
    """A message that cannot be decoded into a consistent event batch."""


@dataclass
class EventBatch:
    """Events of one or more pulses.

    pulse_time[i] (ns since epoch) is the pulse of events pulse_index[i] .. pulse_index[i+1]-1.
    `tof` stays in the unit and dtype it arrived in; histograms convert their edges instead,
    so counts equal numpy's on the very same arrays.
    """

    tof: np.ndarray
    pixel_id: np.ndarray
    pulse_time: np.ndarray  # int64 ns
    pulse_index: np.ndarray  # int64, first event of each pulse
    tof_unit: str = "ns"
    source_name: str = ""
    origin: tuple[str, int, int] | None = None  # (topic, partition, offset) of a Kafka message

    def __post_init__(self) -> None:
        self.tof = _event_array(self.tof, "time_of_flight", "iuf")
        self.pixel_id = _event_array(self.pixel_id, "pixel_id", "iuf")
        if self.pixel_id.dtype.kind == "f":  # whole numbers only: 3.7 was counted in pixel 3, NaN anywhere
            wrong = not_whole(self.pixel_id)
            if wrong.any():
                at = int(np.flatnonzero(wrong)[0])
                raise BadMessage(
                    f"pixel_id[{at}] is {float(self.pixel_id[at])}, not a pixel number ({int(wrong.sum())} such "
                    "ids); pixel ids must be whole numbers (integers, or floats holding whole numbers)"
                )

    def __len__(self) -> int:
        return self.tof.size

    def head(self, n: int) -> EventBatch:
        """The first n events, with the pulses they belong to."""
        keep = int(np.searchsorted(self.pulse_index, n, side="left")) if n else 0
        return EventBatch(self.tof[:n], self.pixel_id[:n], self.pulse_time[:keep],
                          self.pulse_index[:keep], self.tof_unit, self.source_name, self.origin)  # fmt: skip

    def pulse_slices(self):
        """(pulse_time, start, stop) for each pulse."""
        ends = np.append(self.pulse_index[1:], self.tof.size)
        return zip(self.pulse_time.tolist(), self.pulse_index.tolist(), ends.tolist(), strict=True)


def _vector(value) -> np.ndarray | None:
    """A flatbuffer vector as numpy; None when absent (the generated reader returns 0)."""
    return None if isinstance(value, int) else value


def decode(payload: bytes | memoryview) -> EventBatch:
    """Decode an ev44 (or ev42) message; raise BadMessage with the reason.

    ev44 is read in place: a memoryview (a ZeroMQ frame) is never copied, the arrays
    returned are views of it."""
    if len(payload) < 8:
        raise BadMessage(f"message of {len(payload)} bytes is too short for a flatbuffer")
    schema = bytes(payload[4:8])
    try:
        if schema == b"ev44":
            msg = Event44Message.Event44Message.GetRootAs(payload, 0)
            tof, pid = _vector(msg.TimeOfFlightAsNumpy()), _vector(msg.PixelIdAsNumpy())
            ptime, pidx = _vector(msg.ReferenceTimeAsNumpy()), _vector(msg.ReferenceTimeIndexAsNumpy())
            ptime = np.zeros(0, np.int64) if ptime is None else ptime
            pidx = np.zeros(0, np.int64) if pidx is None else pidx.astype(np.int64)
            source = (msg.SourceName() or b"").decode("utf-8", errors="replace")  # a name never loses events
        elif schema == b"ev42":  # read in place too (streaming_data_types' reader needed bytes and UTF-8)
            msg = EventMessage.EventMessage.GetRootAsEventMessage(payload, 0)
            tof, pid = _vector(msg.TimeOfFlightAsNumpy()), _vector(msg.DetectorIdAsNumpy())
            ptime = np.array([msg.PulseTime()], dtype=np.int64)
            pidx = np.zeros(1, dtype=np.int64)
            source = (msg.SourceName() or b"").decode("utf-8", errors="replace")
        else:
            raise BadMessage(f"schema id {schema!r} is not ev44 or ev42")
    except BadMessage:
        raise
    except Exception as exc:  # flatbuffers raise many kinds on corrupt input
        raise BadMessage(f"corrupt {schema.decode(errors='replace')} flatbuffer: {exc}") from None
    tof = np.zeros(0, np.int32) if tof is None else tof
    pid = np.zeros(0, np.int32) if pid is None else pid
    return checked(EventBatch(tof, pid, ptime, pidx, "ns", source))


def not_whole(values: np.ndarray) -> np.ndarray:
    """Where floating-point values are not whole numbers (NaN and infinities included)."""
    return ~np.isfinite(values) | (values != np.trunc(values))


def _event_array(values, name: str, kinds: str) -> np.ndarray:
    """One value per event as the kernels take it: 1-D, a numeric dtype, this machine's byte order.
    Anything else raised numba's own errors from deep inside a kernel (TypingError: non-precise
    type pyobject), or for float16 NotImplementedError."""
    a = np.asarray(values)
    if a.ndim != 1:
        raise BadMessage(f"{name} must be a 1-D array (one value per event), got shape {a.shape}")
    if a.dtype.kind not in kinds:
        raise BadMessage(
            f"{name} must hold {'integers or floats' if 'f' in kinds else 'integers'}, got dtype {a.dtype}; "
            "convert it (numpy's .astype) before making the EventBatch"
        )
    if a.dtype == np.float16:
        return a.astype(np.float32)  # exact; numba has no float16 arrays
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def checked(batch: EventBatch) -> EventBatch:
    """Reject batches whose arrays disagree (they would corrupt histograms)."""
    n = batch.tof.size
    if batch.pixel_id.size != n:
        raise BadMessage(f"time_of_flight has {n} events but pixel_id has {batch.pixel_id.size}")
    if batch.pulse_time.size != batch.pulse_index.size:
        raise BadMessage(
            f"reference_time has {batch.pulse_time.size} pulses but reference_time_index {batch.pulse_index.size}"
        )
    if n and batch.pulse_index.size == 0:
        raise BadMessage(f"{n} events but no reference_time")
    if batch.pulse_index.size:
        idx = batch.pulse_index
        if idx[0] != 0 or np.any(np.diff(idx) < 0) or idx[-1] > n:
            raise BadMessage("reference_time_index must start at 0, not decrease and stay within the events")
    return batch


TOF_UNCARRIED = -(2**31)  # ev44's TOF for one it cannot carry: before any TOF axis a histogram may have


def ev44_tof(batch: EventBatch) -> tuple[np.ndarray, int]:
    """ev44's int32 ns TOFs of a batch, and how many it cannot carry (NaN, +-inf, beyond
    +-2.147 s): those become TOF_UNCARRIED, outside every TOF range, as a direct nexus:// replay
    counts NaN (a plain cast is undefined for them: it gave -2**31 or a wrapped, real-looking TOF)."""
    from livehist.engine.spec import EVENT_UNITS_NS

    tof = batch.tof
    if batch.tof_unit == "ns" and tof.dtype == np.int32:
        return tof, 0
    if tof.dtype.kind in "iu" and batch.tof_unit == "ns":
        ns = np.asarray(tof)
        fits = (ns >= -(2**31)) & (ns < 2**31)
    else:
        ns = np.rint(np.asarray(tof, np.float64) * EVENT_UNITS_NS[batch.tof_unit])
        fits = (ns >= -(2.0**31)) & (ns < 2.0**31)  # False for NaN
    if fits.all():
        return ns.astype(np.int32), 0
    return np.where(fits, ns, TOF_UNCARRIED).astype(np.int32), int(fits.size - np.count_nonzero(fits))


def encode_ev44(
    batch: EventBatch, message_id: int, source_name: str = "livehist", uncarried: list | None = None
) -> bytes:
    """ev44 bytes of a batch (TOF converted to integer ns, as ev44 defines). TOFs ev44 cannot
    carry are sent as TOF_UNCARRIED; their number is appended to `uncarried` if given."""
    tof, lost = ev44_tof(batch)
    if uncarried is not None and lost:
        uncarried.append(lost)
    return bytes(
        eventdata_ev44.serialise_ev44(
            source_name,
            message_id,
            batch.pulse_time.astype(np.int64),
            batch.pulse_index.astype(np.int32),
            tof,
            _int32_pixel_ids(batch.pixel_id),
        )  # fmt: skip
    )


def _int32_pixel_ids(pixel_id: np.ndarray) -> np.ndarray:
    """ev44's int32 pixel ids, or ValueError naming an id it cannot carry (a cast would wrap it
    onto another, real pixel: 2**32 + 5 becomes 5)."""
    pid = np.asarray(pixel_id)
    if pid.dtype == np.int32 or not pid.size:
        return pid.astype(np.int32, copy=False)
    if pid.dtype.kind in "iu":
        lo, hi = pid.min(), pid.max()
        bad = lo if lo < -(2**31) else hi if hi > 2**31 - 1 else None
    else:
        inside = np.isfinite(pid) & (pid > -(2**31) - 1) & (pid < 2**31)
        bad = None if inside.all() else pid[~inside][0]
    if bad is not None:
        raise ValueError(
            f"pixel id {bad} does not fit ev44's int32 pixel_id; ev44 cannot carry it "
            "(replay the file with nexus:// in the EventHistogrammer itself, which reads int64 ids)"
        )
    return pid.astype(np.int32)


@dataclass
class Tagged:
    """A message that is not an EventBatch (raw bytes, which the engine decodes and may count as
    bad), or None for one that counts nowhere (outside a time window), with the Kafka origin
    (topic, partition, offset) it came from: the engine's offsets then cover every message read,
    so a restart from them reads none of them again."""

    payload: bytes | memoryview | None
    origin: tuple[str, int, int]


class RateLimitedLog:
    """At most one log line per `period` seconds per key; the rest are counted and reported."""

    def __init__(self, logger: logging.Logger, period: float = 5.0) -> None:
        self.logger, self.period = logger, period
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) >= self.period:
            extra = self._suppressed.pop(key, 0)
            self.logger.warning("%s%s", message, f" (+{extra} similar since last report)" if extra else "")
            self._last[key] = now
        else:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
