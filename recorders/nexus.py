"""NeXus/HDF5 sink (h5py): one NXentry per scan, SWMR so readers follow a running scan.

Layout of /scan_<N> (NXentry, @default -> the plot):
    title, start_time, end_time, entry_identifier (scan number), experiment_identifier
    (proposal), collection_identifier (dataset), experiment_description, program_name @version
    sample (NXsample), user_<k> (NXuser), instrument (NXinstrument: name)
    data (NXdata: one dataset per column, @signal, @axes)
    <histogram> (NXdata: data counts, time_of_flight edges as the last axis)
    notes (NXnote: the configuration used, JSON), livehist (NXcollection: scan status,
    histogram counters and specs)

No application definition is declared: none of those NeXus knows is honestly filled by a
generic step scan (NXscan needs a rotation angle and a monitor). In SWMR mode nothing may
be created once readers attach, so everything, end_time and status included, is made at
scan start and filled later. Points are buffered and written in blocks at most 0.2 s
apart (a timer flushes a quiet scan), so a reader sees each point within 0.5 s.

What is written is true: livehist appends only to files it created (a foreign HDF5 file
is refused at scan start, before anything is written), a histogram whose name would
clash with the entry's own groups is refused, a second writer on the same file (another
Door, another process) is refused while the first holds the writer lock, and an entry
that cannot be made whole is removed again. A file left open by a writer that died is
repaired when livehist next opens it (or by `livehist repair FILE`): its consistency
flags are cleared and its unfinished entry is marked "incomplete" with the points kept.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import h5py
import numpy as np
from livehist.recorders.base import RecorderError, Sink
from livehist.recorders.records import Histogram, Point, ScanEnd, ScanStart
from livehist.recorders.repair import RepairError, repair, writer_lock

from livehist import __version__

log = logging.getLogger("livehist.recorders.nexus")

FLUSH_PERIOD = 0.2
# kept free on the disk: HDF5 crashes the process (at its next close or at exit) after a write
# it could not make, so a sink stops before the disk is that full, and closes its file with an
# honest status while there is room for it
DISK_RESERVE = 16 * 2**20
STR = h5py.string_dtype()
# names an entry (and its livehist collection) already uses: a histogram may not take them
ENTRY_NAMES = {"title", "start_time", "end_time", "entry_identifier", "experiment_identifier",
               "collection_identifier", "experiment_description", "program_name", "sample",
               "instrument", "data", "livehist", "notes", "custom_data"}  # fmt: skip
PROVENANCE_NAMES = {"status", "end_reason", "points"}
_WRITING: set[str] = set()  # files a sink of this process writes (POSIX locks do not see those)
_WRITING_LOCK = threading.Lock()


def _text(group: h5py.Group, name: str, value: str, **attrs) -> None:
    group.create_dataset(name, data=value, dtype=STR)
    for k, v in attrs.items():
        group[name].attrs[k] = v


def utf8_cut(text: str, limit: int) -> bytes:
    """`text` as UTF-8 in at most `limit` bytes, cut between characters (never inside one)."""
    data = text.encode("utf-8", "replace")
    return data if len(data) <= limit else data[:limit].decode("utf-8", "ignore").encode()


def _numeric(value) -> np.ndarray | None:
    """`value` as a numeric array, or None if it is not one (None, dicts, mixed lists...)."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        return None
    return array if array.dtype.kind in "biufc" else None


def snapshot_written(prov: h5py.Group) -> bool:
    """Did a histogram snapshot reach this livehist/<name> group? Its snapshot_time is set by every
    write (counters may be absent and stay -1, so they cannot tell); files older than it: events."""
    if "snapshot_time" in prov:
        return bool(bytes(prov["snapshot_time"][()]).strip(b"\0"))
    return "events" not in prov or int(prov["events"][()]) != -1


def _reopen(path: str) -> h5py.File:
    """The scan's own file again, without SWMR, to add or remove objects after the points. A SWMR
    reader following the scan holds a lock that made this fail (and the scan's end with it:
    custom data lost, placeholder zeros left); livehist's writer lock keeps other writers out."""
    try:
        return h5py.File(path, "a", libver="latest")
    except OSError as exc:
        if "lock" not in str(exc).lower():
            raise
        return h5py.File(path, "a", libver="latest", locking=False)


def _custom(entry: h5py.Group, key: str, value) -> None:
    """One custom datum in entry/custom_data: numbers as arrays, anything else as (JSON) text."""
    c = entry["custom_data"] if "custom_data" in entry else _nx(entry, "custom_data", "NXcollection")
    if key in c:
        raise RecorderError(f"custom data {key!r} is already in {entry.name}; give it another name")
    array = None if isinstance(value, str) else _numeric(value)
    if array is None:  # text, or what HDF5 has no type for: kept as JSON text
        _text(c, key, value if isinstance(value, str) else json.dumps(value, default=str))
    else:
        c[key] = array
    entry.file.flush()


def _nx(group: h5py.Group, name: str, nx_class: str) -> h5py.Group:
    g = group.create_group(name)
    g.attrs["NX_class"] = nx_class
    return g


class NexusSink(Sink):
    extensions = ("nxs", "h5", "hdf5", "nx5")

    def __init__(self, target: str, swmr: bool = True, compression: str | None = "gzip", **options) -> None:
        super().__init__(target, **options)
        self.swmr, self.compression = swmr, compression
        self.file: h5py.File | None = None
        self.entry: h5py.Group | None = None
        self._fd: int | None = None
        self.created = False
        self.repaired: list[str] = []  # what was repaired in the file at open (a dead writer's leftovers)
        self._lock = threading.RLock()
        self._buffer: list[Point] = []
        self._written = 0
        self._last_flush = 0.0
        self._timer: threading.Thread | None = None
        self._stop = threading.Event()
        self._broken: str | None = None  # why this sink stopped writing (a disk nearly full)

    # --- setup --------------------------------------------------------------------------
    def prepare(self, start: ScanStart) -> None:
        for h in start.histograms:
            low = h.name.lower()
            if low in ENTRY_NAMES or low in PROVENANCE_NAMES or low.startswith("user_"):
                raise RecorderError(
                    f"histogram {h.name!r} cannot be recorded in NeXus: the entry already has a {h.name!r} "
                    "field or group (title, sample, data, instrument, notes, livehist, points, status...); "
                    "rename the histogram"
                )
        self.real = os.path.realpath(self.target)
        with _WRITING_LOCK:
            if self.real in _WRITING:
                raise RecorderError(
                    f"{self.target} is being written by another scan of this server (another Door?); "
                    "give each Door its own ScanFile"
                )
            _WRITING.add(self.real)
        try:
            self._open()
        except BaseException:
            self._release()
            raise

    def _open(self) -> None:
        self._fd = None
        self.created = not os.path.exists(self.target)
        if self.created:
            try:
                h5py.File(self.target, "w-", libver="latest").close()
            except OSError as exc:
                why = os.strerror(exc.errno) if exc.errno else str(exc)
                raise RecorderError(
                    f"cannot open {self.target} for writing (cannot create it: {why})"
                ) from None
        elif os.path.isdir(self.target):  # it said "exists and is not an HDF5 file"
            raise RecorderError(f"cannot open {self.target} for writing: it is a folder; give a file name")
        elif not h5py.is_hdf5(self.target):
            raise RecorderError(
                f"{self.target} exists and is not an HDF5 file; give a new file name (livehist never overwrites)"
            )
        try:
            self._fd = writer_lock(self.target)
        except OSError as exc:
            raise RecorderError(f"cannot open {self.target} for writing: {exc.strerror}") from None
        if self._fd is None:
            raise RecorderError(
                f"{self.target} is being written by another livehist recorder (another process); "
                "use another file, or wait for that scan to end"
            )
        try:
            self.file = h5py.File(self.target, "a", libver="latest", locking=True)
        except OSError as exc:
            msg = str(exc)
            if "already open for write" not in msg:
                if "lock" in msg.lower():
                    raise RecorderError(
                        f"{self.target} is locked by another program ({msg}); close it there or use another file"
                    ) from None
                raise RecorderError(f"cannot open {self.target} for writing: {msg}") from None
            self._repair()
        if self.created:
            self.file.attrs["NX_class"] = "NXroot"  # a new file
            self.file.attrs["creator"] = f"livehist {__version__}"
            self.file.attrs["HDF5_Version"] = h5py.version.hdf5_version
            self.file.flush()
            return
        creator = self.file.attrs.get("creator", "")
        creator = creator.decode() if isinstance(creator, bytes) else str(creator)
        if not creator.startswith("livehist"):
            self.file.close()
            self.file = None
            raise RecorderError(
                f"{self.target} was not written by livehist (its root has no @creator 'livehist ...'); "
                "livehist appends only to its own files: give a new file name"
            )

    def _repair(self) -> None:
        """Left open by a writer that died (we hold the writer lock, so it is not live): repair it."""
        notes = []
        try:
            repair(self.target, say=notes.append)
        except RepairError as exc:
            raise RecorderError(str(exc)) from None
        self.repaired = notes
        try:
            self.file = h5py.File(self.target, "a", libver="latest", locking=True)
        except OSError as exc:
            raise RecorderError(f"cannot open {self.target} even after repairing it: {exc}") from None
        # h5py's close inside repair() dropped this process's POSIX lock: take it again
        import fcntl

        fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _release(self) -> None:
        with _WRITING_LOCK:
            _WRITING.discard(getattr(self, "real", None))
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def discard(self) -> None:
        """The scan did not start: remove a file this sink created and never wrote to."""
        if getattr(self, "created", False) and self.entry is None:
            try:
                os.unlink(self.target)
            except OSError:
                pass

    def start(self, record: ScanStart) -> None:
        try:
            self._start(record)
        except BaseException:
            self._undo_start()
            raise

    def _undo_start(self) -> None:
        """An entry that could not be made whole is removed: no file claims what it does not hold."""
        entry, self.entry = self.entry, None
        if entry is None or self.file is None:
            return
        name = self._entry_name
        try:
            if self.file.swmr_mode:
                return  # cannot delete in SWMR mode; the status stays "running" -> repaired as incomplete
            del self.file[name]
            if self.file.attrs.get("default") == name:
                del self.file.attrs["default"]
            self.file.flush()
        except Exception:  # the file itself is failing; the error that brought us here is reported
            pass

    def _start(self, record: ScanStart) -> None:
        f = self.file
        name = f"scan_{record.scan_number}"
        k = 1
        while name in f:  # never overwrite an entry: a repeated number gets a suffix
            k += 1
            name = f"scan_{record.scan_number}_{k}"
        self.start_record = record
        self._entry_name = name
        e = self.entry = _nx(f, name, "NXentry")
        md = record.metadata
        _text(e, "title", record.title)
        _text(e, "start_time", record.start_time)
        e.create_dataset("end_time", data=b"", dtype="S40")  # filled at scan end
        _text(e, "entry_identifier", str(record.scan_number))
        if md.get("proposal"):
            _text(e, "experiment_identifier", md["proposal"])
        dataset = md.get("dataset") or {}
        if dataset.get("name"):
            _text(e, "collection_identifier", dataset["name"])
        if md.get("title"):
            _text(e, "experiment_description", md["title"])
        _text(e, "program_name", record.program, version=__version__)
        self._metadata_groups(e, md)
        data = self._data_group(e, record)
        prov = _nx(e, "livehist", "NXcollection")
        for h in record.histograms:
            self._histogram_group(e, h)
        note = _nx(e, "notes", "NXnote")
        _text(note, "type", "application/json")
        _text(note, "description", "configuration used for this scan (livehist provenance)")
        _text(note, "data", json.dumps({"config": record.config, "metadata": md, "snapshot": record.snapshot},
                                       default=str))  # fmt: skip
        prov.create_dataset("status", data=b"running", dtype="S16")
        prov.create_dataset("end_reason", data=b"", dtype="S512")
        prov.create_dataset("points", data=0, dtype=np.int64)
        if data is not None:
            e.attrs["default"] = "data"
        elif record.histograms:
            e.attrs["default"] = record.histograms[0].name
        if "default" not in f.attrs or not f.attrs["default"]:
            f.attrs["default"] = name
        f.flush()
        if self.swmr:
            f.swmr_mode = True
        self._last_flush = time.monotonic()
        self._timer = threading.Thread(target=self._flush_loop, name="livehist-nexus-flush", daemon=True)
        self._timer.start()

    def _metadata_groups(self, e: h5py.Group, md: dict) -> None:
        sample = md.get("sample") or {}
        s = _nx(e, "sample", "NXsample")
        for key in ("name", "description", "chemical_formula"):
            if sample.get(key):
                _text(s, key, sample[key])
        if sample.get("temperature") is not None:
            s["temperature"] = float(sample["temperature"])
            s["temperature"].attrs["units"] = "K"
        for k, user in enumerate(md.get("users") or [], 1):
            u = _nx(e, f"user_{k}", "NXuser")
            for key, field in (("name", "name"), ("role", "role"), ("email", "email"),
                               ("affiliation", "affiliation"), ("orcid", "ORCID")):  # fmt: skip
                if user.get(key):
                    _text(u, field, user[key])
        inst = _nx(e, "instrument", "NXinstrument")
        if md.get("instrument"):
            _text(inst, "name", md["instrument"])

    def _data_group(self, e: h5py.Group, record: ScanStart) -> h5py.Group | None:
        if not record.columns:
            return None
        d = _nx(e, "data", "NXdata")
        for col in record.columns:
            per_point = int(np.prod(col.shape)) * np.dtype(col.dtype).itemsize
            rows = max(1, min(4096, (1 << 20) // max(per_point, 1)))
            compress = self.compression if col.shape else None
            ds = d.create_dataset(col.name, shape=(0, *col.shape), maxshape=(None, *col.shape),
                                  dtype=col.dtype, chunks=(rows, *col.shape), compression=compress,
                                  shuffle=bool(compress))  # fmt: skip
            ds.attrs["units"] = col.unit
            if col.label:
                ds.attrs["long_name"] = col.label
        signal = record.default_signal()
        if signal is not None:
            d.attrs["signal"] = signal.name
            axis = record.axes[0].name if record.axes else "."
            d.attrs["axes"] = [axis] + ["."] * len(signal.shape)
            if record.axes:
                d.attrs[f"{axis}_indices"] = 0
        return d

    def _histogram_group(self, e: h5py.Group, h) -> None:
        g = _nx(e, h.name, "NXdata")
        g.attrs["signal"] = "data"
        counts = g.create_dataset("data", shape=tuple(h.shape), dtype=np.int64, fillvalue=0,
                                  chunks=True if len(h.shape) else None, compression=self.compression,
                                  shuffle=bool(self.compression))  # fmt: skip
        counts.attrs["units"] = "counts"
        axes = ["."] * len(h.shape)
        if h.tof_bins:
            tof = g.create_dataset("time_of_flight", shape=(h.tof_bins + 1,), dtype=np.float64)
            tof.attrs["units"] = h.unit
            tof.attrs["long_name"] = f"time of flight bin edges ({h.unit})"
            axes[-1] = "time_of_flight"
        g.attrs["axes"] = axes
        c = _nx(e["livehist"], h.name, "NXcollection")
        for key in ("events", "messages", "bad_messages", "dropped_messages", "pulses"):
            c.create_dataset(key, data=-1, dtype=np.int64)  # -1 until a snapshot arrives
        c.create_dataset("acquisition_time", data=0.0)
        c["acquisition_time"].attrs["units"] = "s"
        c.create_dataset("snapshot_time", data=b"", dtype="S40")
        _text(c, "spec", json.dumps(h.spec))

    # --- data ---------------------------------------------------------------------------
    @property
    def written(self) -> int:
        """Points in the file (not those still buffered)."""
        return self._written

    def _room(self) -> int:
        """Bytes this file may still grow by: free space on its disk, and the process's file size limit."""
        import resource

        st = os.statvfs(os.path.dirname(os.path.abspath(self.target)))
        room = st.f_bavail * st.f_frsize
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY:
            room = min(room, soft - os.path.getsize(self.target))
        return room

    def _stop_writing(self, why: str) -> None:
        """Stop before HDF5 meets a full disk: drop what is buffered, close the entry as failed
        (a few bytes, within the reserve), and refuse every later record."""
        lost, self._buffer = len(self._buffer), []
        self._broken = f"{why}; {lost} point(s) not written, the {self._written} before are in the file"
        try:
            self.entry["livehist/status"][()] = b"failed"
            self.entry["livehist/end_reason"][()] = utf8_cut(self._broken, 512)
            self.entry["end_time"][()] = time.strftime("%Y-%m-%dT%H:%M:%S").encode()
            self.file.flush()
        except Exception as exc:  # noqa: BLE001 - the file still says running: repaired as incomplete
            log.error("%s: status not written: %s", self.target, exc)
        raise RecorderError(self._broken)

    def point(self, record: Point) -> None:
        with self._lock:
            if self._broken:
                raise RecorderError(self._broken)
            self._buffer.append(record)
            if time.monotonic() - self._last_flush >= FLUSH_PERIOD:
                self._flush()

    def _flush(self) -> None:
        """Write buffered points as one block per column, then let readers see them."""
        with self._lock:
            if self.entry is None:
                return
            if self._broken:
                raise RecorderError(self._broken)
            if self._buffer:
                need = sum(p.values[c.name].nbytes for p in self._buffer for c in self.start_record.columns)
                room = self._room()
                if room < need + DISK_RESERVE:
                    self._stop_writing(
                        f"{self.target}: only {room / 2**20:.1f} MiB left on its disk, {need / 2**20:.1f} MiB "
                        f"to write and {DISK_RESERVE / 2**20:.0f} MiB kept free to close the file"
                    )
                d = self.entry["data"]
                n0, n = self._written, len(self._buffer)
                for col in self.start_record.columns:
                    block = np.stack([p.values[col.name] for p in self._buffer])
                    ds = d[col.name]
                    ds.resize(n0 + n, axis=0)
                    ds[n0 : n0 + n] = block
                # the rows reach the file first: a scalar's new value is on disk as soon as it is
                # written, the datasets' new lengths only at a flush (a SWMR reader saw points=8
                # beside 7 rows); so the count follows the rows it counts
                self.file.flush()
                self._written += n
                self.entry["livehist/points"][()] = self._written
                self._buffer.clear()
            self.file.flush()
            self._last_flush = time.monotonic()

    def _flush_loop(self) -> None:
        while not self._stop.wait(FLUSH_PERIOD / 2):
            with self._lock:
                if self._buffer and time.monotonic() - self._last_flush >= FLUSH_PERIOD:
                    try:
                        self._flush()
                    except Exception:  # the next point or the end reports it
                        return

    def histogram(self, record: Histogram) -> None:
        with self._lock:
            self._flush()
            if self._room() < record.counts.nbytes + DISK_RESERVE:
                self._stop_writing(f"{self.target}: no room on its disk for histogram {record.name!r}")
            g = self.entry[record.name]
            g["data"][...] = record.counts
            if record.edges is not None and "time_of_flight" in g:
                g["time_of_flight"][...] = record.edges
            self.file.flush()  # the counts before the counters and snapshot_time that vouch for them
            c = self.entry["livehist"][record.name]
            for key in ("events", "messages", "bad_messages", "dropped_messages", "pulses"):
                if key in record.counters:
                    c[key][()] = int(record.counters[key])
            c["acquisition_time"][()] = record.acquisition_time
            c["snapshot_time"][()] = record.time.encode()[:40]
            self.file.flush()

    def end(self, record: ScanEnd) -> None:
        with self._lock:
            self._flush()  # raises if this sink stopped writing: its status says failed already
            self.entry["end_time"][()] = record.end_time.encode()[:40]
            self.entry["livehist/status"][()] = record.status.encode()
            self.entry["livehist/end_reason"][()] = utf8_cut(record.reason, 512)
            self.file.flush()
            prov = self.entry["livehist"]
            missing = [h.name for h in self.start_record.histograms if not snapshot_written(prov[h.name])]
            if record.custom or missing:  # SWMR forbids new or deleted objects: reopen without it
                name = self.entry.name
                self.file.close()
                self.file = _reopen(self.target)
                self.entry = self.file[name]
                import fcntl  # closing any descriptor of the file dropped our POSIX lock

                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if missing:  # declared, never sent: their zeros are not data (as `repair` does)
                    from livehist.recorders.repair import _drop_placeholders

                    _drop_placeholders(self.entry, self.entry["livehist"])
                    self.entry["livehist"].attrs["histograms_never_received"] = json.dumps(missing)
                for key, value in record.custom.items():
                    _custom(self.entry, key, value)

    def add_custom(self, name: str, value) -> None:
        """Custom data a macro adds after the scan ended, into this scan's entry (as Sardana's
        NeXus recorder does)."""
        entry = getattr(self, "_entry_name", None)
        if entry is None:
            raise RecorderError(f"{self.target}: no scan of this recorder to add {name!r} to")
        real = os.path.realpath(self.target)
        with _WRITING_LOCK:
            if real in _WRITING:
                raise RecorderError(f"{self.target} is being written by another scan; {name!r} not added")
            _WRITING.add(real)
        try:
            fd = writer_lock(self.target)
            if fd is None:
                raise RecorderError(f"{self.target} is being written by another process; {name!r} not added")
            try:
                with _reopen(self.target) as f:
                    if entry not in f:
                        raise RecorderError(f"{self.target} has no {entry} any more; {name!r} not added")
                    _custom(f[entry], name, value)
            finally:
                os.close(fd)
        except OSError as exc:
            raise RecorderError(f"cannot add {name!r} to {self.target}: {exc}") from None
        finally:
            with _WRITING_LOCK:
                _WRITING.discard(real)

    def close(self) -> None:
        self._stop.set()
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.join(timeout=2)
        with self._lock:
            try:
                if self.file is not None:
                    try:
                        if self._buffer and not self._broken:
                            self._flush()
                    finally:
                        self.file.close()
                        self.file = None
            finally:
                self._release()
