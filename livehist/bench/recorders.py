"""Recorder figures of `livehist bench`, beside Sardana's own recorders and a raw h5py write.

Workload (issue 5): 2000 points of 10 float64 scalars plus one 1024-channel spectrum, fed
to Sardana's NXscanH5_FileRecorder and SPEC_FileRecorder through their DataRecorder API
and to livehist's NeXus and SPEC sinks through the record stream; then a 10^6-pixel
int64 histogram snapshot with its edges, beside h5py writing the same arrays.
"""

from __future__ import annotations

import tempfile
import time
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np

from livehist.recorders.base import Recorder, open_sink
from livehist.recorders.records import Column, Histogram, HistogramDecl, Point, ScanEnd, ScanStart

N_POINTS, N_SCALARS, N_CHANNELS = 2000, 10, 1024


def _workload(n: int):
    rng = np.random.default_rng(0)
    scalars = rng.random((n, N_SCALARS)) * 100
    spectra = rng.integers(0, 1000, (n, N_CHANNELS)).astype(np.float64)
    names = ["mot01"] + [f"ct{k:02d}" for k in range(1, N_SCALARS)]
    return names, scalars, spectra


def _sardana_run(recorder_cls, path: Path, n: int) -> float:
    """Points/s of one of Sardana's file recorders on the workload."""
    from sardana.macroserver.scan.scandata import ColumnDesc, Record, RecordList

    names, scalars, spectra = _workload(n)
    datadesc = [ColumnDesc(name="point_nb", label="#Pt No", dtype="int64")]
    datadesc += [ColumnDesc(name=nm, label=nm, dtype="float64", shape=[]) for nm in names]
    datadesc.append(ColumnDesc(name="spectrum", label="spectrum", dtype="float64", shape=[N_CHANNELS]))
    now = datetime.now()
    env = {"serialno": 1, "title": "bench ascan", "user": "bench", "starttime": now, "scanstarttime": now,
           "datadesc": datadesc, "labels": [d.label for d in datadesc], "ScanFile": [path.name],
           "ScanDir": str(path.parent), "preScanSnapShot": [], "instrumentlist": [], "counters": names[1:],
           "ref_moveables": ["mot01"], "estimatedtime": 0, "total_scan_intervals": n - 1}  # fmt: skip
    rl = RecordList(None, environ=env)
    rec = recorder_cls(filename=str(path))
    t0 = time.perf_counter()
    rec.startRecordList(rl)
    for i in range(n):
        data = {"point_nb": i, "spectrum": spectra[i]}
        data.update(zip(names, scalars[i].tolist(), strict=True))
        r = Record(data)
        r.setRecordNo(i)
        rec.writeRecord(r)
    rl.setEnvironValue("endtime", datetime.now())
    rec.endRecordList(rl)
    return n / (time.perf_counter() - t0)


def _livehist_run(path: Path, n: int) -> float:
    names, scalars, spectra = _workload(n)
    cols = [Column("point_nb", dtype="int64")] + [
        Column(nm, role="axis" if nm == "mot01" else "data") for nm in names
    ] + [Column("spectrum", shape=(N_CHANNELS,))]  # fmt: skip
    r = Recorder([open_sink(path)])
    t0 = time.perf_counter()
    r.start(ScanStart("bench ascan", 1, cols))
    for i in range(n):
        values = dict(zip(names, scalars[i].tolist(), strict=True))
        values.update(point_nb=i, spectrum=spectra[i])
        r.point(Point(i, values))
    r.end(ScanEnd())
    return n / (time.perf_counter() - t0)


def _histogram_write(tmp: Path) -> tuple[float, float]:
    """Seconds for a 10^6-pixel int64 snapshot + edges: livehist NeXus sink vs raw h5py."""
    counts = np.random.default_rng(1).integers(0, 1000, (1000, 1000))
    edges = np.linspace(0, 7.2e7, 1001)
    best_ours = best_raw = float("inf")
    for k in range(3):
        t0 = time.perf_counter()
        with h5py.File(tmp / f"raw{k}.h5", "w") as f:
            f.create_dataset("counts", data=counts, chunks=True, compression="gzip", shuffle=True)
            f.create_dataset("edges", data=edges)
        best_raw = min(best_raw, time.perf_counter() - t0)
        decl = HistogramDecl("image", (1000, 1000))
        t0 = time.perf_counter()
        r = Recorder([open_sink(tmp / f"ours{k}.nxs")])
        r.start(ScanStart("histogram", 1, [], histograms=[decl, HistogramDecl("tof", (1000,), 1000)]))
        r.histogram(Histogram("image", counts))
        r.histogram(Histogram("tof", counts[0], edges))
        r.end(ScanEnd())
        best_ours = min(best_ours, time.perf_counter() - t0)
    return best_ours, best_raw


def recorder_figures(row, quick: bool = False) -> None:
    from sardana.macroserver.recorders.h5storage import NXscanH5_FileRecorder
    from sardana.macroserver.recorders.storage import SPEC_FileRecorder

    n = 200 if quick else N_POINTS
    with tempfile.TemporaryDirectory(prefix="livehist-bench-rec-") as tmp:
        tmp = Path(tmp)
        sardana_nx = _sardana_run(NXscanH5_FileRecorder, tmp / "sardana.h5", n)
        ours_nx = _livehist_run(tmp / "ours.nxs", n)
        row(f"NeXus sink, {n} points of 10 scalars + a 1024-channel spectrum (SWMR on)", ours_nx, "points/s",
            "Sardana NXscanH5_FileRecorder", sardana_nx, ">= 10x Sardana", ours_nx >= 10 * sardana_nx)  # fmt: skip
        sardana_spec = _sardana_run(SPEC_FileRecorder, tmp / "sardana.spec", n)
        ours_spec = _livehist_run(tmp / "ours.spec", n)
        row(f"SPEC sink, {n} points of 10 scalars + a 1024-channel spectrum", ours_spec, "points/s",
            "Sardana SPEC_FileRecorder", sardana_spec, ">= 3x Sardana", ours_spec >= 3 * sardana_spec)  # fmt: skip
        ours, raw = _histogram_write(tmp)
        row("NeXus sink: 10^6-pixel int64 histogram snapshot + edges", ours, "s",
            "raw h5py write of the same arrays (gzip, shuffle)", raw, "<= 2x raw h5py", ours <= 2 * raw)  # fmt: skip
