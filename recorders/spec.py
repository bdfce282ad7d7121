"""SPEC sink: standard SPEC data files, scans appended, each with the number of its acquisition.

    #F #E #D #C          file header, written when the file is created
    #S #D #C #O0/#P0     scan header; #C lines carry the metadata, #O/#P the pre-scan snapshot
    #N #L                columns of the scalar data lines; a scan of histograms alone (histo_count)
                         has one row: acquisition_time_s, the counters and NAME_total per histogram
    #@MCA #@CHANN @A     one spectrum per point and 1D column (16 values per line)

Histogram snapshots follow as their own scans with the same number (`#S n histogram NAME of
scan n`: SPEC readers tell repeated numbers apart by order, keys "n.1", "n.2"...) and the
columns bin_low, bin_high, counts, so every SPEC reader plots them. One acquisition has one
number in every file: NeXus /scan_n, SPEC #S n and JSON "scan_number" agree. 2D data (images) has
no SPEC form: a `#C` line points to the NeXus file instead.
"""

from __future__ import annotations

import fcntl
import json
import os
import time

import numpy as np
from livehist.recorders.base import RecorderError, Sink, TextAppender
from livehist.recorders.records import Histogram, Point, ScanEnd, ScanStart

from livehist import __version__


def one_line(text) -> str:
    """SPEC lines end at a newline: fold any in titles and metadata."""
    return " ".join(str(text).split())


def _field(value) -> str:
    """A key=value field's value: as is, or JSON-quoted when it holds what separates fields."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',="') else text


def _fmt(v) -> str:
    if isinstance(v, bool | np.bool_):  # 'True' is no number: PyMca could not read the scan
        return str(int(v))
    return repr(float(v)) if isinstance(v, float | np.floating) else str(v)


def _label(text) -> str:
    """One label of a #L or #O line (they are separated by two spaces): no newline, no space."""
    return "_".join(str(text).split())


def _tokens(a: np.ndarray) -> list[str]:
    """Exact text of each value, fast: integers (and integral floats, as counts are) as ints."""
    if a.dtype.kind == "f" and np.all(np.rint(a) == a) and np.all(np.abs(a) < 2**53):
        a = a.astype(np.int64)
    if a.dtype.kind == "b":
        a = a.astype(np.uint8)
    return list(map(str if a.dtype.kind in "iu" else repr, a.tolist()))


def _locked(path: str, flags: int, cannot_open: str, locked: str) -> int:
    """A descriptor of `path` holding its exclusive lock (livehist's writers hold it for a whole
    scan); RecorderError with `cannot_open` (and the reason) or `locked` otherwise."""
    try:
        fd = os.open(path, flags, 0o664)
    except OSError as exc:
        raise RecorderError(f"{cannot_open}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RecorderError(locked) from None
    return fd


class SpecSink(Sink):
    extensions = ("spec", "dat")

    def __init__(self, target: str, **options) -> None:
        super().__init__(target, **options)
        self.f = None
        self.histograms: list[Histogram] = []
        self.number = 0

    def prepare(self, start: ScanStart) -> None:
        self.created = not os.path.exists(self.target)
        fd = _locked(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, f"cannot open {self.target} for writing",
                     f"{self.target} is locked by another writer; use another file")  # fmt: skip
        first = b""
        if os.path.isfile(self.target):  # a regular file we append to (not a device such as /dev/full)
            try:
                with open(self.target, "rb") as head:
                    first = head.read(2)
            except OSError:
                pass
        if first and first != b"#F":
            os.close(fd)
            raise RecorderError(f"{self.target} exists and is not a SPEC file (no #F line); use another name")
        self.f = TextAppender(fd, self.target)
        self._pending: list[str] = []

    def _w(self, text: str) -> None:
        self._pending.append(text)

    def _flush(self) -> None:
        """What the record wrote, as one write: a point is in the file whole or not at all."""
        text, self._pending = "".join(self._pending), []
        if text:
            self.f.write(text)

    def start(self, record: ScanStart) -> None:
        self.start_record = record
        self.number = record.scan_number  # the acquisition's number, as NeXus and JSON record it
        if self.f.size == 0:
            self._w(f"#F {self.target}\n#E {int(time.time())}\n#D {time.ctime()}\n"
                    f"#C livehist {__version__}  SPEC file\n\n")  # fmt: skip
        else:
            self._w("\n")
        md = record.metadata
        lines = [f"#S {self.number} {one_line(record.title)}", f"#D {time.ctime()}",
                 f"#C start_time {record.start_time}"]  # fmt: skip
        for key in ("proposal", "title", "instrument"):
            if md.get(key):
                lines.append(f"#C {key}: {one_line(md[key])}")
        for key, value in (md.get("sample") or {}).items():
            lines.append(f"#C sample.{one_line(key)}: {one_line(value)}")
        for user in md.get("users") or []:  # a value with ', ' or '=' quoted: 'name=Doe, Jane' read as two
            lines.append("#C user: " + one_line(", ".join(f"{k}={_field(v)}" for k, v in user.items())))
        if (md.get("dataset") or {}).get("name"):
            lines.append(f"#C dataset: {one_line(md['dataset']['name'])}")
        for key, value in md.items():
            if key not in ("proposal", "title", "instrument", "sample", "users", "dataset", "data_root"):
                # a key is folded too: 'x\n#S 99 fake' made PyMca read a scan nobody recorded
                lines.append(f"#C meta.{one_line(key)}: {one_line(json.dumps(value))}")
        # #P holds numbers only: a text value ('hello world') shifted every position after it
        numbers = {k: v for k, v in record.snapshot.items() if isinstance(v, int | float | np.number)}
        names = list(numbers)
        for i in range(0, len(names), 8):
            lines.append(f"#O{i // 8} " + "  ".join(_label(n) for n in names[i : i + 8]))
        for i in range(0, len(names), 8):
            lines.append(f"#P{i // 8} " + " ".join(_fmt(numbers[n]) for n in names[i : i + 8]))
        for key, value in record.snapshot.items():
            if key not in numbers:
                lines.append(f"#C snapshot {one_line(key)}: {one_line(value)}")
        self.scalars = [c for c in record.columns if not c.shape]
        self.spectra = [c for c in record.columns if len(c.shape) == 1]
        for c in record.columns:
            if len(c.shape) == 2:
                lines.append(
                    f"#C {c.name}: {c.shape[0]}x{c.shape[1]} image per point, not in SPEC; see the NeXus file"
                )
        if self.spectra:
            n = self.spectra[0].shape[0]
            lines += [f"#@MCA {min(n, 16)}C", f"#@CHANN {n} 0 {n - 1} 1"]
        # a snapshot of histograms alone (histo_count) has no column: its one row, the counters and
        # each histogram's total, is written at the end ('#N 0' made PyMca fail: 'cannot get lines')
        self.totals_row = not record.columns and bool(record.histograms)
        if not self.totals_row:
            lines.append(f"#N {len(self.scalars)}")
            lines.append("#L " + "  ".join(c.name for c in self.scalars))
        self._w("\n".join(lines) + "\n")
        self._flush()

    def point(self, record: Point) -> None:
        v = record.values
        line = " ".join(_fmt(v[c.name].item()) for c in self.scalars)
        bad = [c.name for c in self.scalars + self.spectra
               if v[c.name].dtype.kind == "f" and not np.isfinite(v[c.name]).all()]  # fmt: skip
        if bad:  # PyMca and silx stop reading a scan at a nan/inf token: keep the point as a comment
            self._w(f"#C point {record.index} has non-finite {', '.join(bad)}; kept here, not as a data line "
                    f"(read it from NeXus or JSON): {line}\n")  # fmt: skip
            self._flush()
            return
        out = [line]
        for c in self.spectra:
            values = _tokens(v[c.name])
            rows = [" ".join(values[i : i + 16]) for i in range(0, len(values), 16)]
            out.append("@A " + " \\\n".join(rows))
        self._w("\n".join(out) + "\n")
        self._flush()

    def histogram(self, record: Histogram) -> None:
        self.histograms.append(record)  # written after the scan, as scans of their own

    def _totals(self) -> None:
        """The row of a histograms-only scan: acquisition time, the device's counters and each
        histogram's total, as recorded with the histograms (NeXus and JSON lines hold the same)."""
        if not self.histograms:
            self._w("#C no histogram was recorded\n#N 0\n#L\n")
            return
        first = self.histograms[0]
        counters = {k: v for k, v in first.counters.items()
                    if isinstance(v, int | float | np.integer | np.floating) and np.isfinite(v)}  # fmt: skip
        labels = ["acquisition_time_s", *counters, *(f"{h.name}_total" for h in self.histograms)]
        values = [_fmt(float(first.acquisition_time)), *map(_fmt, counters.values()),
                  *(str(int(h.counts.sum(dtype=np.int64))) for h in self.histograms)]  # fmt: skip
        self._w(f"#N {len(labels)}\n#L " + "  ".join(labels) + "\n" + " ".join(values) + "\n")

    def end(self, record: ScanEnd) -> None:
        if getattr(self, "totals_row", False):
            self._totals()
        for key, value in record.custom.items():
            shown = value.tolist() if isinstance(value, np.ndarray) else value
            self._w(f"#C custom {one_line(key)}: {one_line(json.dumps(shown, default=str))}\n")
        if record.status != "ok":
            self._w(f"#C scan {record.status} at {record.end_time}: {one_line(record.reason)}\n")
        else:
            self._w(f"#C scan ended at {record.end_time}\n")
        for h in self.histograms:
            if h.counts.ndim != 1 or h.edges is None:
                self._w(
                    f"#C histogram {h.name}: shape {h.counts.shape} is not a spectrum; see the NeXus file\n"
                )
        number = self.number
        for h in self.histograms:
            if h.counts.ndim != 1 or h.edges is None:
                continue
            self._w(f"\n#S {number} histogram {h.name} of scan {self.number}\n#D {time.ctime()}\n"
                    f"#C acquisition_time {h.acquisition_time} s, counters {json.dumps(h.counters)}\n"
                    f"#C spec {json.dumps(h.spec)}\n")  # fmt: skip
            unit = _label(h.unit)
            self._w(f"#N 3\n#L bin_low_{unit}  bin_high_{unit}  counts\n")
            rows = np.column_stack([h.edges[:-1], h.edges[1:], h.counts])
            self._w("".join(f"{lo!r} {hi!r} {int(c)}\n" for lo, hi, c in rows.tolist()))
        self._flush()

    def add_custom(self, name: str, value) -> None:
        """Appended as the scan's end writes custom data (`#C custom NAME: JSON`), as Sardana's
        SPEC recorder appends it after the scan."""
        shown = value.tolist() if isinstance(value, np.ndarray) else value
        fd = _locked(self.target, os.O_WRONLY | os.O_APPEND, f"cannot append {name!r} to {self.target}",
                     f"{self.target} is being written by another scan; {name!r} not added")  # fmt: skip
        f = TextAppender(fd, self.target)
        try:
            f.write(f"#C custom {one_line(name)}: {one_line(json.dumps(shown, default=str))}\n")
        finally:
            f.close()

    def discard(self) -> None:
        path = self.target
        if getattr(self, "created", False) and path and os.path.isfile(path) and os.path.getsize(path) == 0:
            os.unlink(path)

    def close(self) -> None:
        if self.f is not None:
            f, self.f = self.f, None
            f.close()  # closing the descriptor releases the lock (what a failed record wrote is not kept)
