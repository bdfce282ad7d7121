"""SPEC sink: standard SPEC data files, scans appended with increasing numbers.

    #F #E #D #C          file header, written when the file is created
    #S #D #C #O0/#P0     scan header; #C lines carry the metadata, #O/#P the pre-scan snapshot
    #N #L                columns of the scalar data lines
    #@MCA #@CHANN @A     one spectrum per point and 1D column (16 values per line)

Histogram snapshots follow as their own scans (`#S n histogram NAME of scan m`) with the
columns bin_low, bin_high, counts, so every SPEC reader plots them. 2D data (images) has
no SPEC form: a `#C` line points to the NeXus file instead.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time

import numpy as np
from livehist.recorders.base import RecorderError, Sink
from livehist.recorders.records import Histogram, Point, ScanEnd, ScanStart

from livehist import __version__

SCAN_RE = re.compile(rb"^#S\s+(\d+)", re.M)


def one_line(text) -> str:
    """SPEC lines end at a newline: fold any in titles and metadata."""
    return " ".join(str(text).split())


def _fmt(v) -> str:
    return repr(float(v)) if isinstance(v, float | np.floating) else str(v)


def _tokens(a: np.ndarray) -> list[str]:
    """Exact text of each value, fast: integers (and integral floats, as counts are) as ints."""
    if a.dtype.kind == "f" and np.all(np.rint(a) == a) and np.all(np.abs(a) < 2**53):
        a = a.astype(np.int64)
    return list(map(str if a.dtype.kind in "iub" else repr, a.tolist()))


class SpecSink(Sink):
    extensions = ("spec", "dat")

    def __init__(self, target: str, **options) -> None:
        super().__init__(target, **options)
        self.f = None
        self.histograms: list[Histogram] = []
        self.number = 0

    def prepare(self, start: ScanStart) -> None:
        try:
            fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o664)
        except OSError as exc:
            raise RecorderError(f"cannot open {self.target} for writing: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RecorderError(f"{self.target} is locked by another writer; use another file") from None
        self.f = os.fdopen(fd, "a", encoding="utf-8", errors="replace")
        self.last = 0
        if os.path.isfile(self.target):  # not a device such as /dev/full: it never ends
            with open(self.target, "rb") as existing:
                for line in existing:
                    m = SCAN_RE.match(line)
                    if m:
                        self.last = max(self.last, int(m.group(1)))

    def _w(self, text: str) -> None:
        self.f.write(text)

    def start(self, record: ScanStart) -> None:
        self.start_record = record
        self.number = max(record.scan_number, self.last + 1)
        if self.f.tell() == 0:
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
            lines.append(f"#C sample.{key}: {one_line(value)}")
        for user in md.get("users") or []:
            lines.append("#C user: " + one_line(", ".join(f"{k}={v}" for k, v in user.items())))
        if (md.get("dataset") or {}).get("name"):
            lines.append(f"#C dataset: {one_line(md['dataset']['name'])}")
        for key, value in md.items():
            if key not in ("proposal", "title", "instrument", "sample", "users", "dataset", "data_root"):
                lines.append(f"#C meta.{key}: {one_line(json.dumps(value))}")
        if record.snapshot:
            names = list(record.snapshot)
            for i in range(0, len(names), 8):
                lines.append(f"#O{i // 8} " + "  ".join(names[i : i + 8]))
            for i in range(0, len(names), 8):
                lines.append(f"#P{i // 8} " + " ".join(_fmt(record.snapshot[n]) for n in names[i : i + 8]))
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
        lines.append(f"#N {len(self.scalars)}")
        lines.append("#L " + "  ".join(c.name for c in self.scalars))
        self._w("\n".join(lines) + "\n")
        self.f.flush()

    def point(self, record: Point) -> None:
        v = record.values
        line = " ".join(_fmt(v[c.name].item()) for c in self.scalars)
        bad = [c.name for c in self.scalars + self.spectra
               if v[c.name].dtype.kind == "f" and not np.isfinite(v[c.name]).all()]  # fmt: skip
        if bad:  # PyMca and silx stop reading a scan at a nan/inf token: keep the point as a comment
            self._w(f"#C point {record.index} has non-finite {', '.join(bad)}; kept here, not as a data line "
                    f"(read it from NeXus or JSON): {line}\n")  # fmt: skip
            self.f.flush()
            return
        out = [line]
        for c in self.spectra:
            values = _tokens(v[c.name])
            rows = [" ".join(values[i : i + 16]) for i in range(0, len(values), 16)]
            out.append("@A " + " \\\n".join(rows))
        self._w("\n".join(out) + "\n")
        self.f.flush()

    def histogram(self, record: Histogram) -> None:
        self.histograms.append(record)  # written after the scan, as scans of their own

    def end(self, record: ScanEnd) -> None:
        for key, value in record.custom.items():
            shown = value.tolist() if isinstance(value, np.ndarray) else value
            self._w(f"#C custom {key}: {one_line(json.dumps(shown, default=str))}\n")
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
            number += 1
            self._w(f"\n#S {number} histogram {h.name} of scan {self.number}\n#D {time.ctime()}\n"
                    f"#C acquisition_time {h.acquisition_time} s, counters {json.dumps(h.counters)}\n"
                    f"#C spec {json.dumps(h.spec)}\n")  # fmt: skip
            self._w(f"#N 3\n#L bin_low_{h.unit}  bin_high_{h.unit}  counts\n")
            rows = np.column_stack([h.edges[:-1], h.edges[1:], h.counts])
            self._w("".join(f"{lo!r} {hi!r} {int(c)}\n" for lo, hi, c in rows.tolist()))
        self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            try:
                self.f.flush()
            finally:
                self.f.close()  # closing the descriptor releases the lock
                self.f = None
