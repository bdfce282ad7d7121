"""Histogram specs (CONTRACT.md "Histogram spec"): parsed and checked, errors naming the field.

Example error: "Histograms[2].tof.bins must be an integer > 0, got -5".
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

UNITS_NS = {"ns": 1.0, "us": 1e3, "ms": 1e6}
# units event TOFs may arrive in (a NeXus replay can hold seconds); spec axes use UNITS_NS
EVENT_UNITS_NS = {**UNITS_NS, "s": 1e9}
KINDS = ("tof", "image", "pixel_tof", "roi")
NEEDS_TOF = {"tof", "pixel_tof", "roi"}
NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,39}")  # used with fullmatch: "$" lets "x\n" through
# attribute names the device owns; a histogram may not shadow them (Tango names are caseless)
RESERVED = {
    n.lower()
    for n in (
        "State", "Status", "EventCount", "EventRate", "MessageCount", "BadMessageCount",
        "DroppedMessageCount", "UpdateCounter", "PresetTime", "PresetEvents", "PresetPulses",
        "ElapsedTime", "PulseCount", "PresetPulses", "HistogramConfig", "EventSourceURI", "RestreamSentCount", "RestreamDroppedCount",
    )
}  # fmt: skip
DEFAULT_MAX_BYTES = 2 * 1024**3
# one generated kernel fills all histograms of a device; its compile time grows with the square
# of their number (2026-12-04, 2-core host: 30 -> 5 s, 60 -> 15 s, 120 -> 57 s, 300 -> minutes and 6 GB)
MAX_HISTOGRAMS = 64
WINDOW_SLICES = 10  # a sliding window is kept as this many time slices
MIN_WINDOW = 1e-3  # seconds; a slice must span at least 100 us of pulse time
MAX_WINDOW = 1e7  # seconds (about 4 months)
MAX_PIXEL_ID = 2**62  # pixel ids are int64 in the kernels; keep first + count far from overflow
MAX_AXIS = 2**31 - 1  # Tango dims are 32-bit
TOF_KEYS = ("start", "stop", "bins", "unit", "scale", "edges")
PIXEL_KEYS = ("first", "shape", "count")
ROI_KEYS = ("rows", "cols", "pixels")


class SpecError(ValueError):
    """A histogram spec is wrong; the message names the field and the fix."""


@dataclass(frozen=True)
class TofAxis:
    edges: np.ndarray  # float64, strictly increasing, in `unit`
    unit: str = "ns"
    scale: str = "linear"  # linear | log | explicit

    @property
    def bins(self) -> int:
        return len(self.edges) - 1

    def edges_in(self, unit: str) -> np.ndarray:
        """Edges converted to another TOF unit (the unit of an event batch)."""
        if unit == self.unit:
            return self.edges
        return self.edges * (EVENT_UNITS_NS[self.unit] / EVENT_UNITS_NS[unit])

    def to_json(self) -> dict:
        if self.scale == "explicit":
            return {"edges": self.edges.tolist(), "unit": self.unit}
        return {"start": float(self.edges[0]), "stop": float(self.edges[-1]),
                "bins": self.bins, "unit": self.unit, "scale": self.scale}  # fmt: skip


@dataclass(frozen=True)
class HistogramSpec:
    name: str
    kind: str
    tof: TofAxis | None = None
    first_pixel: int = 0
    shape: tuple[int, ...] = ()  # (ny, nx) for image/roi; (count,) for pixel_tof
    roi_pixels: np.ndarray | None = field(default=None, compare=False)  # pixel ids, roi only
    window: float | None = None
    source: dict = field(default_factory=dict, compare=False)  # the JSON it came from

    @property
    def pixel_count(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 0

    @property
    def roi_span(self) -> int:
        """Pixel ids from the ROI's first to its last: what its pixel mask covers (a byte each while built)."""
        ids = self.roi_pixels
        return int(ids.max() - ids.min() + 1) if ids is not None and ids.size else 0

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of the counts as clients see them."""
        if self.kind == "image":
            return self.shape
        if self.kind == "pixel_tof":
            return (self.shape[0], self.tof.bins)
        return (self.tof.bins,)

    @property
    def nbytes(self) -> int:
        """Memory of the counts (and an ROI's pixel mask and ids), in Python ints: no overflow."""
        slices = WINDOW_SLICES + 1 if self.window else 1
        extra = 0
        if self.kind == "roi":
            extra = self.roi_span + (self.roi_pixels.size * 8 if self.roi_pixels is not None else 0)
        return math.prod(self.data_shape) * 8 * slices + extra


def unknown_key(obj: dict, known: tuple[str, ...] | set[str], path: str) -> None:
    """Refuse keys we do not read (a typo would silently give a default), naming the nearest known one."""
    for key in obj:
        if key not in known:
            near = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.5)
            near = near or [k for k in known if k.lower() == str(key).lower()]
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise SpecError(f"{path} has unknown key {key!r}{hint} (known: {', '.join(sorted(known))})")


def size_text(nbytes: int) -> str:
    """Bytes as MiB, or as bytes below 1 MiB (not "0 MiB, over the limit of 0 MiB")."""
    return f"{nbytes / 2**20:.0f} MiB" if nbytes >= 2**20 else f"{nbytes} bytes"


def _check_cap(what: str, nbytes: int, max_bytes: int | None) -> None:
    if max_bytes is not None and nbytes > max_bytes:
        raise SpecError(
            f"{what} needs {size_text(nbytes)}, over the limit of {size_text(max_bytes)}; "
            "use fewer bins/pixels or raise MaxHistogramBytes"
        )


def _where(path: str, key: str) -> str:
    return f"{path}.{key}"


def _int(obj: dict, key: str, path: str, minimum: int | None = None, default: Any = None) -> int:
    if key not in obj:
        if default is not None:
            return default
        raise SpecError(f"{_where(path, key)} is missing; give an integer")
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or (isinstance(v, float) and not v.is_integer()):
        raise SpecError(f"{_where(path, key)} must be an integer, got {v!r}")
    if isinstance(v, float) and abs(v) >= 2**53:  # not exact as a float; and int(1e300) printed 301 digits
        raise SpecError(f"{_where(path, key)} must be an integer, got {v!r}: too large for a number with an "
                        "exponent or a fraction (write it as digits)")  # fmt: skip
    v = int(v)
    if minimum is not None and v < minimum:
        raise SpecError(f"{_where(path, key)} must be an integer >= {minimum}, got {v}")
    return v


def _number(obj: dict, key: str, path: str) -> float:
    if key not in obj:
        raise SpecError(f"{_where(path, key)} is missing; give a number")
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise SpecError(f"{_where(path, key)} must be a finite number, got {v!r}")
    return float(v)


def _object(obj: dict, key: str, path: str) -> dict:
    v = obj.get(key)
    if not isinstance(v, dict):
        got = "nothing" if v is None else repr(v)
        raise SpecError(f"{_where(path, key)} must be an object, got {got}")
    return v


def parse_tof(obj: Any, path: str, max_bytes: int | None = None) -> TofAxis:
    if not isinstance(obj, dict):
        raise SpecError(
            f"{path} must be an object like {{'start': 0, 'stop': 1e5, 'bins': 1000}}, got {obj!r}"
        )
    unknown_key(obj, TOF_KEYS, path)
    unit = obj.get("unit", "ns")
    if unit not in UNITS_NS:
        raise SpecError(f"{path}.unit must be one of ns, us, ms, got {unit!r}")
    if "edges" in obj:
        edges = obj["edges"]
        if not isinstance(edges, list) or len(edges) < 2:
            raise SpecError(f"{path}.edges must be a list of at least 2 numbers, got {edges!r}")
        if not all(isinstance(e, int | float) and not isinstance(e, bool) for e in edges):
            raise SpecError(f"{path}.edges must hold numbers only")
        arr = np.asarray(edges, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise SpecError(f"{path}.edges must be finite numbers")
        bad = np.flatnonzero(np.diff(arr) <= 0)
        if bad.size:
            i = int(bad[0])
            raise SpecError(
                f"{path}.edges must be strictly increasing; edges[{i}]={arr[i]} >= edges[{i + 1}]={arr[i + 1]}"
            )
        return _binnable(TofAxis(arr, unit, "explicit"), path)
    start, stop = _number(obj, "start", path), _number(obj, "stop", path)
    bins = _int(obj, "bins", path)
    if bins <= 0:
        raise SpecError(f"{path}.bins must be > 0, got {bins}")
    if bins > MAX_AXIS - 1:
        raise SpecError(f"{path}.bins must be < {MAX_AXIS}, got {bins}")
    _check_cap(f"{path}.bins={bins}", (bins + 1) * 8, max_bytes)  # before the edges are made
    if start >= stop:
        raise SpecError(f"{path}.start must be < {path}.stop, got start={start} stop={stop}")
    if not math.isfinite(stop - start):
        raise SpecError(f"{path} from {start:g} to {stop:g} is wider than float64 holds; keep the edges "
                        f"between -1e290 and 1e290")  # fmt: skip
    scale = obj.get("scale", "linear")
    if scale == "linear":
        edges = np.linspace(start, stop, bins + 1)
    elif scale == "log":
        if start <= 0:
            raise SpecError(f"{path}.start must be > 0 for scale 'log', got {start}")
        edges = np.geomspace(start, stop, bins + 1)
    else:
        raise SpecError(f"{path}.scale must be 'linear' or 'log', got {scale!r}")
    return _binnable(TofAxis(edges, unit, scale), path)


def _binnable(axis: TofAxis, path: str) -> TofAxis:
    """The axis, if float64 bins it right in every unit events may come in (the kernels take
    the edges in the batch's unit and scale by bins / (stop - start))."""
    for unit in EVENT_UNITS_NS:
        with np.errstate(all="ignore"):
            e = axis.edges_in(unit)
            ok = np.all(np.isfinite(e)) and np.all(np.diff(e) > 0) and np.isfinite(axis.bins / (e[-1] - e[0]))
        if not ok:
            raise SpecError(
                f"{path} from {axis.edges[0]:g} to {axis.edges[-1]:g} {axis.unit} cannot be binned exactly in "
                f"float64 (in {unit} its edges overflow, merge or give an infinite scale); keep the edges "
                f"between -1e290 and 1e290, and more than 1e-290 apart"
            )
    return axis


def parse_one(obj: Any, path: str, max_bytes: int | None = None) -> HistogramSpec:
    if not isinstance(obj, dict):
        raise SpecError(f"{path} must be an object with name and kind, got {obj!r}")
    name = obj.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise SpecError(
            f"{path}.name must start with a letter and hold only letters, digits and _ "
            f"(at most 40), got {name!r}"
        )
    if name.lower() in RESERVED:
        raise SpecError(f"{path}.name {name!r} is a name the device already uses; choose another")
    kind = obj.get("kind")
    if kind not in KINDS:
        raise SpecError(f"{path}.kind must be one of {', '.join(KINDS)}, got {kind!r}")
    known = {"name", "kind", "tof", "pixels", "roi", "window"}
    unknown_key(obj, known, path)
    tof = parse_tof(obj.get("tof"), f"{path}.tof", max_bytes) if kind in NEEDS_TOF else None
    first, shape, roi_pixels = 0, (), None
    if kind != "tof":
        pix_path = f"{path}.pixels"
        pixels = _object(obj, "pixels", path)
        unknown_key(pixels, PIXEL_KEYS, pix_path)
        first = _int(pixels, "first", pix_path, minimum=0, default=0)
        if first > MAX_PIXEL_ID:
            raise SpecError(f"{pix_path}.first must be <= 2**62, got {first}")
        if kind == "pixel_tof" and "count" in pixels:
            shape = (_int(pixels, "count", pix_path, minimum=1),)
        else:
            raw = pixels.get("shape")
            if (not isinstance(raw, list) or len(raw) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in raw)):  # fmt: skip
                what = "a count N or a shape [ny, nx]" if kind == "pixel_tof" else "a shape [ny, nx]"
                raise SpecError(f"{pix_path}.shape must be {what} of positive integers, got {raw!r}")
            if max(raw) > MAX_AXIS:
                raise SpecError(f"{pix_path}.shape must have sides <= {MAX_AXIS}, got {raw!r}")
            shape = tuple(raw)
            if kind == "pixel_tof":
                shape = (shape[0] * shape[1],)
        if shape[0] > MAX_AXIS:
            raise SpecError(f"{pix_path} count must be <= {MAX_AXIS}, got {shape[0]}")
        if first + math.prod(shape) > MAX_PIXEL_ID:
            raise SpecError(f"{pix_path}: pixel ids first + count must stay <= 2**62, got first={first}")
        if kind == "roi":
            roi = _object(obj, "roi", path)
            unknown_key(roi, ROI_KEYS, f"{path}.roi")
            roi_pixels = _parse_roi(roi, f"{path}.roi", first, shape, max_bytes)
            # the mask spans the ROI's own pixel ids, not the detector; checked before it is made
            lo, hi = int(roi_pixels.min()), int(roi_pixels.max())
            _check_cap(f"{path} (its pixel mask, pixel ids {lo}..{hi})", hi - lo + 1, max_bytes)
    window = None
    if obj.get("window") is not None:
        window = _number(obj, "window", path)
        if not MIN_WINDOW <= window <= MAX_WINDOW:
            raise SpecError(
                f"{path}.window must be {MIN_WINDOW:g} to {MAX_WINDOW:g} seconds (or absent for cumulative), "
                f"got {window:g}"
            )
    return HistogramSpec(name, kind, tof, first, shape, roi_pixels, window, obj)


def _parse_roi(
    roi: dict, path: str, first: int, shape: tuple[int, ...], max_bytes: int | None = None
) -> np.ndarray:
    ny, nx = shape
    if "pixels" in roi:
        ids = roi["pixels"]
        if (
            not isinstance(ids, list)
            or not ids
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        ):
            raise SpecError(f"{path}.pixels must be a non-empty list of pixel ids, got {ids!r}")
        outside = [i for i in ids if not first <= i < first + ny * nx]  # checked before int64 conversion
        if outside:
            raise SpecError(
                f"{path}.pixels holds {outside[0]}, outside pixels {first}..{first + ny * nx - 1}"
            )
        return np.unique(np.asarray(ids, dtype=np.int64))
    for key, n in (("rows", ny), ("cols", nx)):
        v = roi.get(key)
        if (not isinstance(v, list) or len(v) != 2
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in v)
                or not 0 <= v[0] < v[1] <= n):  # fmt: skip
            raise SpecError(f"{path}.{key} must be [start, stop) with 0 <= start < stop <= {n}, got {v!r}")
    (r0, r1), (c0, c1) = roi["rows"], roi["cols"]
    _check_cap(f"{path} ({r1 - r0}x{c1 - c0} pixel ids)", (r1 - r0) * (c1 - c0) * 8, max_bytes)
    rows, cols = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
    return (first + rows * nx + cols).ravel().astype(np.int64)


def join_property(lines: list[str] | tuple[str, ...]) -> str:
    """A Tango property holds lines: either one JSON list split over lines, or one object per line."""
    lines = [line for line in lines if line.strip()]
    if not lines or lines[0].lstrip().startswith("["):
        return "\n".join(lines) or "[]"
    return "[" + ",\n".join(lines) + "]"


class _HugeNumber(Exception):
    pass


def _json_int(text: str) -> int:
    """An integer of the JSON text; past Python's limit on digits (4300), _HugeNumber(its digits)."""
    digits = len(text.lstrip("-"))
    if digits > 4000:
        raise _HugeNumber(digits)
    return int(text)


def parse_histograms(
    value: str | list, label: str = "Histograms", max_bytes: int = DEFAULT_MAX_BYTES
) -> list[HistogramSpec]:
    """Parse a JSON list (text or already decoded) of histogram specs."""
    if isinstance(value, str):
        try:
            value = json.loads(value, parse_int=_json_int)
        except _HugeNumber as exc:  # Python's own message named sys.set_int_max_str_digits() as the fix
            raise SpecError(
                f"{label} holds a number of {exc.args[0]:,} digits; no histogram field takes one that long "
                "(counts, bins and pixels fit in 19 digits): check the JSON for a runaway number"
            ) from None
        except RecursionError:
            raise SpecError(
                f"{label} is nested too deep to be histogram specs; give a JSON list of histogram objects"
            ) from None
        except ValueError as exc:
            raise SpecError(
                f"{label} is not valid JSON ({exc}); give a JSON list of histogram objects"
            ) from None
    if not isinstance(value, list):
        raise SpecError(f"{label} must be a JSON list of histogram objects, got {type(value).__name__}")
    if len(value) > MAX_HISTOGRAMS:
        raise SpecError(
            f"{label} holds {len(value)} histograms, more than {MAX_HISTOGRAMS} per device (one pass "
            f"fills them all; compiling it for 300 took minutes and 6 GB); use fewer, or more devices"
        )
    specs = [parse_one(obj, f"{label}[{i}]", max_bytes) for i, obj in enumerate(value)]
    seen: dict[str, int] = {}
    for i, s in enumerate(specs):
        for attr in (
            [s.name]
            + ([f"{s.name}_edges"] if s.tof else [])
            + ([f"{s.name}_total"] if s.kind == "roi" else [])
            + ([f"{s.name}_preview"] if s.kind in ("image", "pixel_tof") else [])
        ):
            if attr.lower() in seen:
                raise SpecError(
                    f"{label}[{i}].name {s.name!r} clashes with {label}[{seen[attr.lower()]}]; names must be unique"
                )
            seen[attr.lower()] = i
    total = sum(s.nbytes for s in specs)
    if total > max_bytes:
        big = max(specs, key=lambda s: s.nbytes)
        raise SpecError(
            f"{label} need {size_text(total)} of counts, over the limit of {size_text(max_bytes)} "
            f"(largest: {big.name}, {size_text(big.nbytes)}); use fewer bins/pixels or raise the limit"
        )
    return specs
