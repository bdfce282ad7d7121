"""nexus:///ABS/PATH.nxs?path=/entry/events&rate=realtime|max&loop=N&tof_unit=us

Replays an NXevent_data group pulse by pulse. `event_time_offset` keeps its dtype and unit
(from its `units` attribute; ISIS files have none: microseconds, or `tof_unit`), so
histograms of a replay equal numpy's on the very same arrays. Loop k (of N; 0 = forever)
shifts pulse times by k run lengths. After the last loop the source stays quiet.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime
from urllib.parse import unquote

import h5py
import numpy as np

from livehist.engine.events import EventBatch, not_whole
from livehist.engine.sources import Source, SourceError, check_known, number, query

log = logging.getLogger("livehist.engine.sources.nexus")
UNIT_NAMES = {
    "ns": "ns", "nanosecond": "ns", "nanoseconds": "ns",
    "us": "us", "µs": "us", "microsecond": "us", "microseconds": "us", "usec": "us",
    "ms": "ms", "millisecond": "ms", "milliseconds": "ms",
    "s": "s", "second": "s", "seconds": "s",
}  # fmt: skip
SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
MAX_EVENTS_PER_BATCH = 1 << 20
FIELDS = ("event_time_offset", "event_id", "event_time_zero", "event_index")


def _unit(ds, default: str | None, what: str, path: str) -> str:
    raw = ds.attrs.get("units")
    if raw is None:
        if default is None:
            raise SourceError(f"{path}/{what} has no units attribute; add tof_unit=us|ns|ms|s to the URI")
        return default
    raw = raw.decode() if isinstance(raw, bytes) else str(raw)
    unit = UNIT_NAMES.get(raw.strip().lower())
    if unit is None:
        raise SourceError(f"{path}/{what} has units {raw!r}; livehist reads ns, us, ms or s")
    return unit


class NexusSource(Source):
    paced = True

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        parts, params = query(uri)
        check_known(params, {"path", "rate", "loop", "tof_unit"}, uri)
        if parts.netloc:  # nexus://tmp/x.nxs: urlparse reads "tmp" as a host
            raise SourceError(
                f"EventSource {uri!r}: {parts.netloc!r} was read as a host name; a file path needs three "
                f"slashes: nexus:///{parts.netloc}{parts.path}"
            )
        self.file = unquote(parts.path)  # %23, %3F, %20: a '#', '?' or space in a file name
        self.event_group = params.get("path", "")  # not `group`: that is a Kafka consumer group
        self.position = (0, 0)  # (loop, pulse) the next run starts at: Start after Stop goes on from there
        # (file identity, pulse_time, event_index) of the file `position` was reached in
        self.position_of: tuple | None = None
        self.realtime = params.get("rate", "realtime") == "realtime"
        if params.get("rate", "realtime") not in ("realtime", "max"):
            raise SourceError(f"EventSource {uri!r}: rate must be realtime or max, got {params['rate']!r}")
        self.loops = int(number(params, "loop", 1, uri, integer=True))
        tof_unit = params.get("tof_unit")
        if tof_unit is not None and tof_unit not in ("ns", "us", "ms", "s"):
            raise SourceError(f"EventSource {uri!r}: tof_unit must be ns, us, ms or s, got {tof_unit!r}")
        self.tof_unit_given = tof_unit
        self.read_index(tof_unit)

    def read_index(self, tof_unit: str | None) -> None:
        """Open the file now so a bad path fails at configuration, not in the thread."""
        try:
            f = h5py.File(self.file, "r")
        except OSError as exc:
            raise SourceError(f"EventSource {self.uri!r}: cannot open {self.file}: {exc}") from None
        try:
            with f:
                self.identity = _identity(f)
                self._read_index(f, tof_unit)
        except SourceError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:  # h5py on a damaged file
            raise SourceError(
                f"EventSource {self.uri!r}: cannot read {self.file}: {type(exc).__name__}: {exc} "
                "(a damaged or unfinished file?)"
            ) from None

    def _read_index(self, f: h5py.File, tof_unit: str | None) -> None:
        group = self.event_group or _find_event_group(f)
        if group is None or group not in f or not isinstance(f[group], h5py.Group):
            raise SourceError(
                f"EventSource {self.uri!r}: {group or 'no NXevent_data group'} not found in {self.file}; give path=/entry/..."
            )
        g = f[group]
        nx_class = g.attrs.get("NX_class", b"")
        nx_class = nx_class.decode() if isinstance(nx_class, bytes) else str(nx_class)
        missing = [k for k in FIELDS if k not in g]
        if nx_class != "NXevent_data" or missing:
            raise SourceError(
                f"EventSource {self.uri!r}: {group} is not NXevent_data "
                f"(NX_class={nx_class!r}, missing {missing or 'nothing'})"
            )
        self.event_group = group
        for k in FIELDS:  # a group, a scalar or a 2-D array failed later with IndexError or TypeError
            ds = g[k]
            if not isinstance(ds, h5py.Dataset) or len(ds.shape or ()) != 1:
                what = (f"a {type(ds).__name__}" if not isinstance(ds, h5py.Dataset)
                        else f"of shape {ds.shape}")  # fmt: skip
                raise SourceError(
                    f"EventSource {self.uri!r}: {group}/{k} is {what}; NXevent_data needs a 1-D dataset "
                    "with one value per event (event_id, event_time_offset) or per pulse (event_time_zero, "
                    "event_index) (the file is damaged, or path= names another group)"
                )
        self.tof_unit = tof_unit or _unit(g["event_time_offset"], "us", "event_time_offset", group)
        zero_unit = _unit(g["event_time_zero"], "s", "event_time_zero", group)
        zero = g["event_time_zero"][()].astype(np.float64) * SECONDS[zero_unit]
        offset = g["event_time_zero"].attrs.get("offset")
        base = 0.0
        if offset is not None:
            try:
                base = datetime.fromisoformat(
                    offset.decode() if isinstance(offset, bytes) else str(offset)
                ).timestamp()
            except ValueError:
                log.warning(
                    "%s/event_time_zero@offset %r is not ISO 8601; pulse times taken as given",
                    group,
                    offset,
                )
        bad = np.flatnonzero(~np.isfinite(zero) | (np.abs(zero + base) >= 9.2e9))
        if bad.size:  # NaN cast to int64 is -2**63: a garbage pulse time, shifting windows and Kafka stamps
            raise SourceError(
                f"EventSource {self.uri!r}: {group}/event_time_zero of pulse {int(bad[0])} is "
                f"{float(zero[bad[0]] / SECONDS[zero_unit])} {zero_unit} ({bad.size} such pulse{'s' if bad.size > 1 else ''}); every pulse "
                "needs a finite time (the file is damaged)"
            )
        self.pulse_time = np.rint((zero + base) * 1e9).astype(np.int64)
        self.n_events = g["event_id"].shape[0]
        self.event_index = self._index(g["event_index"][()], group)
        shapes = {k: g[k].shape for k in ("event_id", "event_time_offset")}
        if shapes["event_id"] != shapes["event_time_offset"] or len(shapes["event_id"]) != 1:
            raise SourceError(
                f"EventSource {self.uri!r}: {group}/event_id has {_size(shapes['event_id'])} values but "
                f"event_time_offset has {_size(shapes['event_time_offset'])}; both must be 1-D with one "
                "value per event (the file is damaged or still being written)"
            )
        for k in ("event_id", "event_time_offset"):
            if g[k].dtype.kind not in "iuf":  # complex or bool: refused by EventBatch at every pulse
                raise SourceError(
                    f"EventSource {self.uri!r}: {group}/{k} has dtype {g[k].dtype.str}; livehist replays "
                    "integer or floating-point numbers only"
                )
        if self.event_index.size != self.pulse_time.size:
            raise SourceError(
                f"{group}: event_index has {self.event_index.size} pulses but event_time_zero {self.pulse_time.size}"
            )
        idx = self.event_index
        first = int(idx[0]) if idx.size else self.n_events
        if first != 0 and self.n_events:  # events before the first pulse belong to none: never replayed
            raise SourceError(
                f"EventSource {self.uri!r}: {group}/event_index "
                + (f"starts at {first}: events 0..{first - 1}" if idx.size else f"is empty: all {self.n_events} events")
                + " belong to no pulse and would not be replayed; the first pulse must start at event 0 "
                "(the file is damaged or still being written)"
            )  # fmt: skip
        if idx.size and (idx[-1] > self.n_events or np.any(np.diff(idx) < 0)):
            wrong = (idx < 0) | (idx > self.n_events) | np.insert(np.diff(idx) < 0, 0, False)
            bad = int(np.flatnonzero(wrong)[0])
            raise SourceError(
                f"EventSource {self.uri!r}: {group}/event_index must not decrease and stay within the "
                f"{self.n_events} events (0..{self.n_events}); pulse {bad} has {int(idx[bad])}"
                + (f" after {int(idx[bad - 1])}" if bad else "")
                + " (replaying it would count events twice)"
            )

    def _index(self, raw: np.ndarray, group: str) -> np.ndarray:
        """event_index as int64: integers, or floats holding whole numbers (2.5 was cut to 2 without a
        word); values an int64 cannot hold (NaN, 2**64-1 wrapped to -1) are refused naming the pulse."""
        if raw.dtype.kind not in "iuf":
            raise SourceError(
                f"EventSource {self.uri!r}: {group}/event_index has dtype {raw.dtype.str}; it must hold the "
                "index of each pulse's first event as integers"
            )
        limit = np.float64(self.n_events)
        if raw.dtype.kind == "f":
            wrong = not_whole(raw) | (raw < 0) | (raw > limit)
        else:
            wrong = (raw < 0) | (raw > self.n_events)  # compared before any cast: no wrap-around
        if wrong.any():
            at = int(np.flatnonzero(wrong)[0])
            raise SourceError(
                f"EventSource {self.uri!r}: {group}/event_index of pulse {at} is {raw[at].item()!r}; each "
                f"must be a whole number of 0..{self.n_events} (the index of the pulse's first event; the "
                "file is damaged)"
            )
        return raw.astype(np.int64)

    def run(self) -> None:
        with h5py.File(self.file, "r") as f:
            self._same_file(f)
            n_pulses = self.pulse_time.size
            if n_pulses == 0:
                self.finished = True
                return
            span = int(self.pulse_time[-1] - self.pulse_time[0])
            period = int(np.median(np.diff(self.pulse_time))) if n_pulses > 1 else 100_000_000
            g = f[self.event_group]
            loop, p = self.position
            wall0 = time.monotonic()
            if self.realtime:  # a resumed replay keeps the pace from where it went on
                wall0 -= (
                    self.pulse_time[min(p, n_pulses - 1)] - self.pulse_time[0] + loop * (span + period)
                ) / 1e9
            while self.loops == 0 or loop < self.loops:
                shift = loop * (span + period)
                while p < n_pulses:
                    if self.stopping:
                        return
                    q = p + 1
                    if not self.realtime:  # group pulses up to a batch size
                        limit = self.event_index[p] + MAX_EVENTS_PER_BATCH
                        q = max(p + 1, int(np.searchsorted(self.event_index, limit, side="right")) - 1)
                        q = min(q, n_pulses)
                    else:
                        due = (self.pulse_time[p] - self.pulse_time[0] + shift) / 1e9
                        wait = due - (time.monotonic() - wall0)
                        if wait > 0 and self._stop.wait(wait):
                            return
                    a = int(self.event_index[p])
                    b = int(self.event_index[q]) if q < n_pulses else self.n_events
                    batch = EventBatch(
                        _native(g["event_time_offset"][a:b]), self._pixel_ids(g["event_id"][a:b], a),
                        self.pulse_time[p:q] + shift, self.event_index[p:q] - a, self.tof_unit, self.event_group,
                    )  # fmt: skip
                    if not self.emit(batch):
                        return  # not taken (stopping): the next run sends it again
                    p = q
                    self.position = (loop, p)
                    self.position_of = (self.identity, self.pulse_time, self.event_index)
                loop, p = loop + 1, 0
                self.position = (loop, p)
        self.finished = True

    def _pixel_ids(self, ids: np.ndarray, first: int) -> np.ndarray:
        """Native-order pixel ids; floating-point ids must hold whole numbers: 3.7 was counted in
        pixel 3 without a word (the kernels truncate), NaN in an arbitrary one."""
        ids = _native(ids)
        if ids.dtype.kind == "f":
            wrong = not_whole(ids) | (np.abs(ids) >= 2.0**63)
            if wrong.any():
                at = int(np.argmax(wrong))
                raise SourceError(
                    f"EventSource {self.uri!r}: {self.event_group}/event_id[{first + at}] is {float(ids[at])}, "
                    f"not a pixel number ({int(wrong.sum())} such ids in this pulse); pixel ids must be "
                    "whole numbers (the file is damaged, or event_id is not a pixel id)"
                )
        return ids

    def _same_file(self, f: h5py.File) -> None:
        """The index read at open must be this file's: a file replaced (or rewritten) since was replayed
        with the old one's index (a file of 1000 events in 100 pulses counted 100 events in 10). Read it
        again; a replay under way goes on only if the pulses it counted are the same in the new file."""
        now = _identity(f)
        if now != self.identity:
            log.warning("%s changed since it was indexed; reading its index again", self.file)
            try:
                self._read_index(f, self.tof_unit_given)
            except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
                raise SourceError(f"cannot read {self.file}: {type(exc).__name__}: {exc}") from None
            self.identity = now
        if self.position != (0, 0) and self.position_of is not None and self.position_of[0] != now:
            loop, p = self.position
            _, pulse_time, event_index = self.position_of
            upto = p if loop == 0 else max(pulse_time.size, self.pulse_time.size)
            if np.array_equal(pulse_time[:upto], self.pulse_time[:upto]) and np.array_equal(
                event_index[:upto], self.event_index[:upto]
            ):  # a copy of it, or the file grown by more pulses (still being written): it goes on
                self.position_of = (now, self.pulse_time, self.event_index)
                return
            raise SourceError(
                f"{self.file} was replaced or rewritten after {p} pulses (loop {loop + 1}) of its replay had "
                "been counted, and its pulses differ from those; going on would mix two files: Stop, Reset "
                "and Start to replay it from its first pulse"
            )

    def resume_after(self, old: Source) -> None:
        """Start after Stop (without Reset), or a reconnect: go on from where `old` stopped, so
        no pulse is counted twice (a replay from the start counted the first part again)."""
        self.position = getattr(old, "position", (0, 0))
        self.position_of = getattr(old, "position_of", None)

    def start_from(self, offsets: dict) -> None:
        """After Reset: the replay begins at its first pulse again."""
        self.position, self.position_of = (0, 0), None


def _find_event_group(f: h5py.File) -> str | None:
    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Group):
            cls = obj.attrs.get("NX_class", b"")
            if (cls.decode() if isinstance(cls, bytes) else str(cls)) == "NXevent_data":
                found.append("/" + name)

    f.visititems(visit)
    return found[0] if found else None


def _identity(f: h5py.File) -> tuple:
    """What tells a file from its replacement: device, inode, size and modification time."""
    st = os.fstat(f.id.get_vfd_handle())
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _size(shape: tuple) -> str:
    return str(shape[0]) if len(shape) == 1 else f"shape {shape}"


def _native(a: np.ndarray) -> np.ndarray:
    """The array in this machine's byte order (HDF5 hands over the writer's: the kernels take native only)."""
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))
