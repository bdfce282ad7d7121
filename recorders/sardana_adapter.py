"""Sardana's record lists as livehist records (no Sardana import: duck-typed env and records).

    env["datadesc"], ["serialno"], ["title"], ["starttime"], ["preScanSnapShot"],
    ["ref_moveables"], ["counters"], ["endtime"], ["endstatus"]     -> ScanStart / ScanEnd
    record.recordno, record.data                                     -> Point
    addCustomData(value, name)                                        -> ScanEnd.custom

Columns are named by their Sardana label (what NXscanH5 and SPEC call them), made safe
for file formats; a column whose type a file cannot hold (strings, references) is left
out with a warning, as Sardana's own recorders do.
"""

from __future__ import annotations

import re
from datetime import datetime

import numpy as np
from livehist.recorders.records import Column, Point, ScanEnd, ScanStart, now_iso

END_STATUS = {"Normal": "ok", "Stop": "aborted", "Abort": "aborted", "Exception": "failed"}
NUMERIC = ("float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def safe_name(label: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(label)).strip("_") or "column"
    return name if name[0].isalpha() else f"c_{name}"


def iso(t) -> str:
    if isinstance(t, datetime):
        return t.astimezone().isoformat(timespec="milliseconds")
    return str(t)


def status_of(endstatus) -> str:
    name = getattr(endstatus, "name", None) or str(endstatus)
    for key, value in END_STATUS.items():
        if key in name:
            return value
    try:  # Sardana's Enumeration values are ints: Normal, Stop, Abort, Exception
        return ("ok", "aborted", "aborted", "failed")[int(endstatus)]
    except (TypeError, ValueError, IndexError):
        return "failed"


class ScanMapping:
    """Maps one Sardana scan onto the record stream."""

    def __init__(self, warn=lambda msg: None) -> None:
        self.warn = warn
        self.columns: dict[str, Column] = {}  # Sardana column name -> our column
        self.custom: dict = {}
        self.changed: dict[str, str] = {}  # column -> how its shape changed mid-scan (first time)
        self.dropped: list[str] = []  # points no file could take, with why

    def start(self, env: dict, metadata: dict, config: dict) -> ScanStart:
        moveables = set(env.get("ref_moveables") or [])
        counters = list(env.get("counters") or [])
        seen: set[str] = set()
        cols = []
        for dd in env["datadesc"]:
            dtype = str(getattr(dd, "dtype", "float64"))
            if dtype == "bool":
                dtype = "int8"
            if dtype in NUMERIC and np.dtype(dtype).kind in "iu":
                # Sardana gives None for a channel that failed to read: as float64 it is recorded
                # NaN (a failed read, said so in every format), never a 0 that looks like a count
                dtype = "float64"
            if dtype not in NUMERIC or getattr(dd, "value_ref_enabled", False):
                self.warn(f"{dd.label}: {dtype} values are not recorded by livehist recorders")
                continue
            name = safe_name(dd.label)
            while name in seen:
                name += "_"
            seen.add(name)
            shape = tuple(int(n) for n in (getattr(dd, "shape", None) or ()))
            role = "axis" if dd.name in moveables or dd.label in moveables else "data"
            if dd.name in ("point_nb", "timestamp"):
                role = "time"
            unit = getattr(dd, "data_units", "") or ""
            col = Column(name, dtype=dtype, shape=shape, unit="" if unit == "No unit" else str(unit),
                         label=str(dd.label), role=role)  # fmt: skip
            self.columns[dd.name] = col
            cols.append(col)
        signal = next(
            (self.columns[c].name for c in counters if c in self.columns and not self.columns[c].shape), None
        )
        snapshot = {}
        for dd in env.get("preScanSnapShot") or []:
            value = getattr(dd, "pre_scan_value", None)
            if isinstance(value, int | float | np.number):
                snapshot[safe_name(dd.label)] = float(value)
        return ScanStart(str(env.get("title", "")), int(env.get("serialno", 0)), cols, metadata=metadata,
                         start_time=iso(env["starttime"]) if env.get("starttime") else now_iso(), snapshot=snapshot, config=config,
                         signal=signal)  # fmt: skip

    def point(self, record) -> Point | None:
        values = {}
        for sardana_name, col in self.columns.items():
            value = record.data.get(sardana_name)
            if value is None:  # Sardana gives None for a channel that failed to read (all columns are float)
                value = np.full(col.shape, np.nan)
            elif col.shape and np.shape(value) != col.shape:
                # the channel changed shape mid-scan (a Configure of the histogrammer): the point is
                # kept with this column NaN (a failed read, in every format), and the end says so
                if col.name not in self.changed:
                    self.changed[col.name] = (
                        f"{col.name} changed shape from {col.shape} to {np.shape(value)} at point "
                        f"{record.recordno} (the histogrammer was reconfigured during the scan); "
                        "recorded as NaN from there"
                    )
                    self.warn(self.changed[col.name])
                value = np.full(col.shape, np.nan)
            values[col.name] = value
        return Point(int(record.recordno), values, float(record.data.get("timestamp", 0.0) or 0.0))

    def add_custom(self, value, name: str) -> None:
        self.custom[safe_name(name)] = value

    def end(self, env: dict) -> ScanEnd:
        status = status_of(env.get("endstatus", "Normal"))
        reason = {"aborted": "stopped or aborted by the user", "failed": "the scan raised an error"}.get(
            status, ""
        )
        end_time = iso(env["endtime"]) if env.get("endtime") else now_iso()
        notes = list(self.changed.values())
        if self.dropped:
            notes.append(f"{len(self.dropped)} point(s) not recorded: " + "; ".join(self.dropped[:3]))
        if notes:  # the file holds less than was measured: never 'ok'
            status = "interrupted" if status == "ok" else status
            reason = "; ".join([reason, *notes] if reason else notes)
        return ScanEnd(status, end_time, reason, custom=dict(self.custom))
