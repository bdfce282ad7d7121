"""The record stream every sink consumes (after Bluesky's documents): small and explicit.

    ScanStart      title, scan number, times, metadata snapshot, columns, histograms declared
    Point          one row: a value per column (scalars, 1D or 2D arrays)
    Histogram      a histogram snapshot: counts, edges, unit, counters, spec, acquisition time
    ScanEnd        status ok | aborted | interrupted | failed, end time, reason
                   (interrupted: an acquisition ended early by an outside action, e.g. another
                   client's Stop; the reason says by what and how long it counted)

Columns and histograms are declared at scan start so that file formats that fix their
layout up front (HDF5 in SWMR mode, SPS arrays) can create it before the first point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

STATUSES = ("ok", "aborted", "interrupted", "failed")


class RecordError(ValueError):
    """A record that does not fit its scan (wrong shape, undeclared histogram...)."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str = "float64"
    shape: tuple[int, ...] = ()  # () scalar, (n,) spectrum, (ny, nx) image per point
    unit: str = ""
    label: str = ""
    role: str = "data"  # axis (a moved motor), data (a counter/channel), monitor, time

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-." for c in self.name):
            raise RecordError(f"column name {self.name!r}: use letters, digits, _ - .")
        if self.role not in ("axis", "data", "monitor", "time"):
            raise RecordError(
                f"column {self.name}: role must be axis, data, monitor or time, got {self.role!r}"
            )
        try:
            np.dtype(self.dtype)
        except TypeError:
            raise RecordError(f"column {self.name}: dtype {self.dtype!r} is not a numpy dtype") from None
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        if len(self.shape) > 2 or any(n <= 0 for n in self.shape):
            raise RecordError(
                f"column {self.name}: shape must be (), (n,) or (ny, nx) with n > 0, got {self.shape}"
            )


@dataclass(frozen=True)
class HistogramDecl:
    """A histogram snapshot a scan will record (its shape fixes the file layout)."""

    name: str
    shape: tuple[int, ...]
    tof_bins: int = 0  # >0: the last axis has TOF edges of tof_bins + 1 values
    unit: str = "ns"
    spec: dict = field(default_factory=dict, compare=False)  # the histogram spec (JSON)


@dataclass
class ScanStart:
    title: str
    scan_number: int
    columns: list[Column]
    metadata: dict = field(default_factory=dict)
    histograms: list[HistogramDecl] = field(default_factory=list)
    start_time: str = field(default_factory=now_iso)
    snapshot: dict = field(default_factory=dict)  # pre-scan positions / values: name -> value
    program: str = "livehist"
    config: dict = field(default_factory=dict)  # provenance: the configuration used
    signal: str | None = None  # column to plot by default (else: first scalar data column)

    def __post_init__(self) -> None:
        if not isinstance(self.scan_number, int | np.integer) or self.scan_number < 0:
            raise RecordError(f"scan_number must be an integer >= 0, got {self.scan_number!r}")
        names = [c.name for c in self.columns]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise RecordError(f"column names must be unique; repeated: {sorted(dup)}")
        if self.signal is not None and self.signal not in names:
            raise RecordError(f"signal {self.signal!r} is not a column; columns: {names}")

    @property
    def axes(self) -> list[Column]:
        return [c for c in self.columns if c.role == "axis"]

    def default_signal(self) -> Column | None:
        if self.signal:
            return next(c for c in self.columns if c.name == self.signal)
        scalars = [c for c in self.columns if c.role == "data" and not c.shape]
        return scalars[0] if scalars else next((c for c in self.columns if c.role == "data"), None)


@dataclass
class Point:
    index: int
    values: dict[str, Any]
    time: float = 0.0  # seconds since scan start

    def checked(self, start: ScanStart) -> Point:
        """Values as numpy of the declared dtype and shape; RecordError naming what is wrong."""
        out = {}
        for col in start.columns:
            if col.name not in self.values:
                raise RecordError(f"point {self.index}: no value for column {col.name!r}")
            try:
                value = np.asarray(self.values[col.name], dtype=col.dtype)
            except (TypeError, ValueError) as exc:
                raise RecordError(
                    f"point {self.index}: column {col.name!r} is not {col.dtype}: {exc}"
                ) from None
            if value.shape != col.shape:
                raise RecordError(
                    f"point {self.index}: column {col.name!r} has shape {value.shape}, declared {col.shape}"
                )
            out[col.name] = value
        extra = set(self.values) - set(out)
        if extra:
            raise RecordError(f"point {self.index}: undeclared columns {sorted(extra)}")
        return Point(self.index, out, self.time)


@dataclass
class Histogram:
    name: str
    counts: np.ndarray
    edges: np.ndarray | None = None
    unit: str = "ns"
    counters: dict = field(default_factory=dict)  # events, messages, bad/dropped messages, pulses...
    spec: dict = field(default_factory=dict)  # the histogram spec (JSON) it was made with
    acquisition_time: float = 0.0  # seconds accumulated
    time: str = field(default_factory=now_iso)

    def checked(self, start: ScanStart) -> Histogram:
        decl = next((h for h in start.histograms if h.name == self.name), None)
        if decl is None:
            raise RecordError(
                f"histogram {self.name!r} was not declared at scan start (ScanStart.histograms); declare it"
            )
        counts = np.asarray(self.counts)
        if counts.shape != tuple(decl.shape):
            raise RecordError(
                f"histogram {self.name!r} has shape {counts.shape}, declared {tuple(decl.shape)}"
            )
        edges = None if self.edges is None else np.asarray(self.edges, dtype=np.float64)
        if decl.tof_bins and (edges is None or edges.shape != (decl.tof_bins + 1,)):
            raise RecordError(f"histogram {self.name!r} needs {decl.tof_bins + 1} TOF edges")
        return Histogram(self.name, counts, edges, self.unit, dict(self.counters), dict(self.spec),
                         float(self.acquisition_time), self.time)  # fmt: skip


@dataclass
class ScanEnd:
    status: str = "ok"
    end_time: str = field(default_factory=now_iso)
    reason: str = ""
    custom: dict = field(default_factory=dict)  # data other than points (Sardana's custom data)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise RecordError(f"scan end status must be one of {STATUSES}, got {self.status!r}")
