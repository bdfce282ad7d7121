"""Shared-memory sink through PyMca5's `sps`, as SPEC and PyMca read it: `sps://NAME`.

    NAME/SCAN_D        DOUBLE, one row per point, one column per scalar column
    NAME/SCAN_D_ENV    environment strings: title, axistitles, nopts, started, ended, metadata
    NAME/<column>      the latest spectrum or image of each 1D/2D column
    NAME/<histogram>   the latest snapshot of each declared histogram

SPS arrays live while the writing process lives (a reader in another process sees them
while the scan runs). SCAN_D has room for `rows` points (default 4096, or the scan's
expected points); it is re-created twice as large, data kept, when a scan outgrows it.
"""

from __future__ import annotations

import json
import time

import numpy as np
from livehist.recorders.base import RecorderError, Sink
from livehist.recorders.records import Histogram, Point, ScanEnd, ScanStart

MAX_ENV, ENV_LEN = 128, 1024
MAX_ARRAYS, MAX_ARRAY_NAME = 256, 31  # per SPS name (more are created but never listed: lost)
_MADE: set[str] = set()  # SPS names this process created (others live in other processes)


class SpsSink(Sink):
    schemes = ("sps",)

    def __init__(self, target: str, rows: int = 4096, **options) -> None:
        super().__init__(target, **options)
        self.name = target.split("://", 1)[1].strip("/") or "livehist"
        self.rows = int(rows)
        self.sps = None

    def prepare(self, start: ScanStart) -> None:
        try:
            from PyMca5.PyMcaIO import sps
        except ImportError as exc:
            raise RecorderError(f"shared memory needs PyMca5's sps ({exc}); pip install PyMca5") from None
        if not self.name.replace("_", "").isalnum() or len(self.name.encode()) > 32:
            raise RecorderError(
                f"SPS name {self.name!r}: use up to 32 letters, digits and _ (bytes in UTF-8)"
            )
        arrays = [c.name for c in start.columns if c.shape] + [h.name for h in start.histograms]
        if 2 + len(arrays) > MAX_ARRAYS:
            raise RecorderError(
                f"SPS holds {MAX_ARRAYS} arrays per name and this scan needs {2 + len(arrays)} (SCAN_D, "
                "SCAN_D_ENV, one per spectrum, image and histogram); record the rest in NeXus only"
            )
        # the limit is in bytes: a longer UTF-8 name ('α' * 20) overran into the SPS name's own
        long = [a for a in arrays if len(a.encode()) > MAX_ARRAY_NAME]
        if long:
            raise RecorderError(
                f"SPS array names are at most {MAX_ARRAY_NAME} characters (bytes in UTF-8): {long[0]!r} "
                f"has {len(long[0].encode())}; rename it or record it in NeXus only"
            )
        # a name another live process holds (another MacroServer, SPEC): SPS made ours NAME(pid),
        # which no reader looks at, and the scan went on as if published
        if self.name in sps.getspeclist() and self.name not in _MADE:
            raise RecorderError(
                f"SPS name {self.name!r} is held by another process (another MacroServer or SPEC session); "
                "give this one its own name (SharedMemory, sps://NAME)"
            )
        self.sps = sps

    def _create(self, array: str, rows: int, cols: int, dtype, flags: int = 0) -> None:
        _MADE.add(self.name)
        try:
            self.sps.create(self.name, array, rows, cols, dtype, flags)
        except self.sps.error as exc:
            # PyMca5's binding creates STRING arrays, then fails to wrap them in a numpy view
            if dtype == self.sps.STRING and array in self.sps.getarraylist(self.name):
                return
            raise RecorderError(
                f"cannot create SPS array {self.name}/{array} ({rows}x{cols}): {exc}"
            ) from None

    def putenv(self, key: str, value) -> None:
        """One environment string, KEY=VALUE in at most ENV_LEN bytes: a longer value is cut
        (between characters), never refused (a refusal stopped the strings after it)."""
        room = ENV_LEN - len(key.encode()) - 2
        text = str(value).encode("utf-8", "replace")[:room].decode("utf-8", "ignore")
        self.sps.putenv(self.name, "SCAN_D_ENV", key, text)

    def start(self, record: ScanStart) -> None:
        self.start_record = record
        self.scalars = [c for c in record.columns if not c.shape]
        self.rows = max(self.rows, 1)
        self._create("SCAN_D", self.rows, max(len(self.scalars), 1), self.sps.DOUBLE, self.sps.TAG_SCAN)
        self._create("SCAN_D_ENV", MAX_ENV, ENV_LEN, self.sps.STRING)
        for c in record.columns:
            if c.shape:
                rows, cols = (1, c.shape[0]) if len(c.shape) == 1 else c.shape
                tag = self.sps.TAG_MCA if len(c.shape) == 1 else self.sps.TAG_IMAGE
                self._create(c.name, rows, cols, self.sps.DOUBLE, tag)
        for h in record.histograms:
            rows, cols = (1, h.shape[0]) if len(h.shape) == 1 else h.shape
            self._create(
                h.name,
                rows,
                cols,
                self.sps.DOUBLE,
                self.sps.TAG_MCA if len(h.shape) == 1 else self.sps.TAG_IMAGE,
            )
        self.data = np.zeros((self.rows, max(len(self.scalars), 1)))
        self.n = 0
        md = record.metadata
        env = {"title": record.title, "scan_number": record.scan_number, "started": time.ctime(),
               "ended": "", "aborted": 0, "nopts": 0,
               "axistitles": " ".join(c.label or c.name for c in self.scalars),
               "xlabel": record.axes[0].name if record.axes else "point",
               "ylabel": (record.default_signal().name if record.default_signal() else "counts"),
               "proposal": md.get("proposal", ""), "sample": (md.get("sample") or {}).get("name", ""),
               "metadata": self._metadata(md)}  # fmt: skip
        for k, v in env.items():
            self.putenv(k, v)

    @staticmethod
    def _metadata(md: dict) -> str:
        """The metadata as JSON if it fits one environment string, else a summary that does
        (always valid JSON: a cut one does not parse)."""
        full = json.dumps(md, default=str)
        room = ENV_LEN - len("metadata") - 2
        if len(full.encode()) <= room:
            return full
        short = {"proposal": md.get("proposal", ""), "sample": (md.get("sample") or {}).get("name", ""),
                 "dataset": (md.get("dataset") or {}).get("name", ""), "title": str(md.get("title", ""))[:200],
                 "cut": "the full metadata is in the NeXus and JSON lines files"}  # fmt: skip
        while len(json.dumps(short).encode()) > room and short["title"]:
            short["title"] = short["title"][: len(short["title"]) // 2]
        return json.dumps(short)

    def point(self, record: Point) -> None:
        if self.n >= self.rows:  # grow: a new, twice larger array with the data so far
            self.rows *= 2
            grown = np.zeros((self.rows, self.data.shape[1]))
            grown[: self.n] = self.data[: self.n]
            self.data = grown
            self._create("SCAN_D", self.rows, self.data.shape[1], self.sps.DOUBLE, self.sps.TAG_SCAN)
            self.sps.putdata(self.name, "SCAN_D", self.data)
        row = np.array([float(record.values[c.name]) for c in self.scalars] or [0.0])
        self.data[self.n] = row
        self.sps.putdatarow(self.name, "SCAN_D", self.n, row)
        for c in self.start_record.columns:
            if c.shape:
                value = np.asarray(record.values[c.name], dtype=np.float64)
                self.sps.putdata(self.name, c.name, value.reshape(1, -1) if value.ndim == 1 else value)
        self.n += 1
        self.putenv("nopts", self.n)

    def histogram(self, record: Histogram) -> None:
        counts = np.asarray(record.counts, dtype=np.float64)
        self.sps.putdata(self.name, record.name, counts.reshape(1, -1) if counts.ndim == 1 else counts)

    def end(self, record: ScanEnd) -> None:
        self.putenv("status", record.status)  # what a reader must not miss, first
        self.putenv("aborted", int(record.status != "ok"))
        self.putenv("ended", time.ctime())
        for key, value in record.custom.items():
            self.putenv(f"custom_{key}", value)
