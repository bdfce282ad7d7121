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

import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

STATUSES = ("ok", "aborted", "interrupted", "failed")


RESERVED = ("SCAN_D", "SCAN_D_ENV")  # SPS array names of the scan itself
MAX_HISTOGRAM_CELLS = 1 << 31  # a snapshot larger than that is a mistake in a scan file


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
        if (not self.name or not all(c.isalnum() or c in "_-." for c in self.name)
                or self.name.strip(".") == "" or self.name in RESERVED):  # fmt: skip
            raise RecordError(
                f"column name {self.name!r}: use letters, digits, _ - . (not only dots; not {', '.join(RESERVED)})"
            )
        if self.role not in ("axis", "data", "monitor", "time"):
            raise RecordError(
                f"column {self.name}: role must be axis, data, monitor or time, got {self.role!r}"
            )
        try:
            kind = np.dtype(self.dtype).kind
        except TypeError:
            raise RecordError(f"column {self.name}: dtype {self.dtype!r} is not a numpy dtype") from None
        if kind not in "biuf":
            raise RecordError(
                f"column {self.name}: dtype {self.dtype!r} is not numeric; use an integer or float dtype"
            )
        _text_field(f"column {self.name}", "unit", self.unit)  # NeXus failed on it at scan start
        _text_field(f"column {self.name}", "label", self.label)
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

    def __post_init__(self) -> None:
        if (not isinstance(self.name, str) or not self.name or self.name.strip(".") == "" or self.name in RESERVED
                or not all(c.isalnum() or c in "_-." for c in self.name)):  # fmt: skip
            raise RecordError(f"histogram name {self.name!r}: use letters, digits, _ - . (not only dots)")
        shape = tuple(int(n) for n in self.shape)
        if (
            not 1 <= len(shape) <= 2
            or any(n <= 0 for n in shape)
            or int(np.prod(shape)) > MAX_HISTOGRAM_CELLS
        ):
            raise RecordError(
                f"histogram {self.name}: shape must be (n,) or (ny, nx) with n > 0 and at most "
                f"{MAX_HISTOGRAM_CELLS:,} cells, got {tuple(self.shape)}"
            )
        _text_field(f"histogram {self.name}", "unit", self.unit)
        if self.tof_bins and self.tof_bins != shape[-1]:
            raise RecordError(
                f"histogram {self.name}: tof_bins {self.tof_bins} but the last axis of shape {shape} has "
                f"{shape[-1]} bins; the TOF axis is the last one"
            )
        object.__setattr__(self, "shape", shape)


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
        if not isinstance(self.title, str) or "\x00" in self.title or not _encodable(self.title):
            raise RecordError(f"scan title {self.title!r:.80}: text without NUL or lone surrogates, please")
        if not isinstance(self.scan_number, int | np.integer) or self.scan_number < 0:
            raise RecordError(f"scan_number must be an integer >= 0, got {self.scan_number!r}")
        names = [c.name for c in self.columns]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise RecordError(f"column names must be unique; repeated: {sorted(dup)}")
        hnames = [h.name for h in self.histograms]
        hdup = {n for n in hnames if hnames.count(n) > 1}
        if hdup:
            raise RecordError(f"histogram names must be unique; repeated: {sorted(hdup)}")
        clash = set(hnames) & set(names)
        if clash:
            raise RecordError(f"{sorted(clash)} name both a column and a histogram; rename one")
        if self.signal is not None and self.signal not in names:
            raise RecordError(f"signal {self.signal!r} is not a column; columns: {names}")
        check_metadata(self.metadata)

    @property
    def axes(self) -> list[Column]:
        return [c for c in self.columns if c.role == "axis"]

    def default_signal(self) -> Column | None:
        if self.signal:
            return next(c for c in self.columns if c.name == self.signal)
        scalars = [c for c in self.columns if c.role == "data" and not c.shape]
        return scalars[0] if scalars else next((c for c in self.columns if c.role == "data"), None)


def _json_data(value, where: str) -> None:
    """RecordError naming `where` unless `value` is JSON data with text every file can hold."""
    if isinstance(value, str):
        if "\x00" in value or not _encodable(value):
            raise RecordError(f"{where} {value!r:.60}: text without NUL or lone surrogates, please")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise RecordError(f"{where}: key {key!r} is not text; metadata keys are strings")
            _json_data(key, f"{where} key")
            _json_data(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _json_data(item, f"{where}[{i}]")
    elif not (value is None or isinstance(value, bool | int | float)):  # np.float64 is a float
        raise RecordError(
            f"{where} is a {type(value).__name__}; metadata holds text, numbers, true/false, null, "
            "lists and objects (JSON data): convert it, e.g. with .tolist() or str()"
        )


def check_metadata(md) -> None:
    """The metadata of a scan as the MetadataManager gives it: a failure here was a sink dropped at
    scan start with a bare TypeError or AttributeError (NeXus on a number as proposal, SPEC on
    bytes, both on a sample given as text), its file gone, and the others recording."""
    if not isinstance(md, dict):
        raise RecordError(f"metadata must be a dict (JSON object), got {type(md).__name__}")
    _json_data(md, "metadata")
    for key in ("proposal", "title", "instrument"):
        if md.get(key) is not None and not isinstance(md[key], str):
            raise RecordError(f"metadata[{key!r}] must be text, got {md[key]!r:.60}")
    for key in ("sample", "dataset"):
        if md.get(key) is not None and not isinstance(md[key], dict):
            raise RecordError(
                f"metadata[{key!r}] must be an object such as {{'name': ...}}, got {md[key]!r:.60}"
            )
    temperature = (md.get("sample") or {}).get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, int | float)
    ):
        raise RecordError(f"metadata['sample']['temperature'] must be a number in K, got {temperature!r:.60}")
    users = md.get("users")
    if users is not None and not (isinstance(users, list) and all(isinstance(u, dict) for u in users)):
        raise RecordError(
            f"metadata['users'] must be a list of objects such as {{'name': ...}}, got {users!r:.60}"
        )


def _text_field(owner: str, what: str, value) -> None:
    if not isinstance(value, str) or "\x00" in value or not _encodable(value):
        raise RecordError(f"{owner}: {what} {value!r:.60} must be text without NUL or lone surrogates")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _kept(given, value: np.ndarray) -> bool:
    """Whether `value` (cast to a column's dtype) holds `given` exactly (NaN stays NaN)."""
    try:
        original = np.asarray(given)
        if original.dtype.kind not in "biuf" or original.dtype == value.dtype:
            return True
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if value.dtype.kind == "f" and original.dtype.kind in "iu":
                back = value.astype(np.float64)  # int -> float: exact where the float holds the int
                if not np.all(np.isfinite(back)) or np.any(np.abs(back) >= 2.0**63):
                    return False
                return bool(np.array_equal(back.astype(np.int64), original.astype(np.int64)))
            back = value.astype(original.dtype)
            if original.dtype.kind == "f":
                return bool(np.array_equal(back, original, equal_nan=True))
            return bool(np.array_equal(back, original))
    except (TypeError, ValueError, OverflowError):
        return False


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
            given = self.values[col.name]
            try:
                # a copy: NeXus buffers points, and a caller refilling one array per point had
                # every buffered row written with the last point's values
                value = np.array(given, dtype=col.dtype)
            except OverflowError as exc:  # an int beyond int64/uint64: it named no fix
                raise RecordError(
                    f"point {self.index}: column {col.name!r} is not {col.dtype}: {exc}; declare the "
                    "column with a wider dtype (uint64 up to 2**64 - 1, float64 for more, rounded)"
                ) from None
            except (TypeError, ValueError) as exc:
                raise RecordError(
                    f"point {self.index}: column {col.name!r} is not {col.dtype}: {exc}"
                ) from None
            if not _kept(given, value):
                shown = repr(given) if np.ndim(given) == 0 else "a value"
                raise RecordError(
                    f"point {self.index}: column {col.name!r}: {shown[:60]} does not fit {col.dtype} "
                    f"(it would be stored as something else); declare the column with a wider dtype"
                )
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
        counts = np.array(self.counts)  # a copy: SPEC writes snapshots at the scan's end
        if counts.dtype.kind not in "iu" and counts.size:
            if counts.dtype.kind != "f" or not (
                np.all(np.isfinite(counts)) and np.all(counts == np.round(counts))
            ):
                raise RecordError(
                    f"histogram {self.name!r}: counts must be whole numbers (no NaN, inf or fractions)"
                )
        if counts.size and (counts.min() < 0 or counts.max() > np.iinfo(np.int64).max):
            raise RecordError(f"histogram {self.name!r}: counts must be from 0 to 2**63-1")
        if counts.shape != tuple(decl.shape):
            raise RecordError(
                f"histogram {self.name!r} has shape {counts.shape}, declared {tuple(decl.shape)}"
            )
        edges = None if self.edges is None else np.array(self.edges, dtype=np.float64)
        if decl.tof_bins and (edges is None or edges.shape != (decl.tof_bins + 1,)):
            raise RecordError(f"histogram {self.name!r} needs {decl.tof_bins + 1} TOF edges")
        if edges is not None and edges.shape != (counts.shape[-1] + 1,):  # SPEC failed on them at the end
            raise RecordError(
                f"histogram {self.name!r}: {edges.size} edges for {counts.shape[-1]} bins on its last axis; "
                f"give {counts.shape[-1] + 1} (bins + 1) or none"
            )
        if (
            edges is not None
            and edges.size
            and (not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0))
        ):
            raise RecordError(f"histogram {self.name!r}: TOF edges must be finite and increasing")
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
