"""Metadata from the MetadataManager reaches every file, with the histogrammer's snapshots."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import tango
from PyMca5.PyMcaIO import specfile

from livehist.components.capture import record_histograms
from tests.test_recorders import run_tool


def test_histogram_snapshot_with_metadata_in_nexus_spec_and_json(sardana_site):
    m = tango.DeviceProxy(sardana_site.url("livehist/metadata/1"))
    h = tango.DeviceProxy(sardana_site.url("livehist/histogrammer/1"))
    for p in (m, h):
        p.set_timeout_millis(10_000)
    if m.state() == tango.DevState.RUNNING:
        m.EndDataset()
    m.SetMetadata(json.dumps({"proposal": "20269999", "title": "Capture test", "instrument": "LOKI-sim",
                              "sample": {"name": "SiO2", "temperature": 77.0},
                              "users": [{"name": "Ada Lovelace", "role": "PI"}], "field_T": 1.5}))  # fmt: skip
    folder = Path(m.StartDataset("capture_1"))
    h.Stop()
    h.Reset()
    h.PresetTime = 1.0
    h.Start()
    deadline = time.monotonic() + 20
    while h.state() != tango.DevState.ON and time.monotonic() < deadline:
        time.sleep(0.1)
    targets = [folder / "histograms.nxs", folder / "histograms.spec", folder / "histograms.jsonl"]
    r = record_histograms(h, targets, "histo_count 1", 1, metadata_device=m)
    assert r.errors == {}
    events = h.EventCount
    assert events > 0

    with h5py.File(targets[0]) as f:
        e = f["scan_1"]
        assert (
            e["experiment_identifier"][()] == b"20269999" and e["collection_identifier"][()] == b"capture_1"
        )
        assert e["sample/name"][()] == b"SiO2" and e["sample/temperature"][()] == 77.0
        assert e["user_1/name"][()] == b"Ada Lovelace" and e["instrument/name"][()] == b"LOKI-sim"
        assert np.array_equal(e["tof/data"][()], h.tof) and np.array_equal(e["image/data"][()], h.image)
        assert np.array_equal(e["tof/time_of_flight"][()], h.tof_edges)
        assert e["livehist/tof/events"][()] == events and e.attrs["default"] == "tof"
        assert json.loads(e["notes/data"][()])["metadata"]["field_T"] == 1.5
    check = run_tool("nxcheck", targets[0])
    assert "Total number of errors: 0" in check and "Total number of warnings: 0" in check, check
    assert "rror" not in run_tool("nxvalidate", targets[0]).replace("No application", "")

    sf = specfile.Specfile(str(targets[1]))
    header = "\n".join(sf[0].header(""))
    assert "#C proposal: 20269999" in header and "#C sample.name: SiO2" in header
    assert "#C dataset: capture_1" in header and "#C meta.field_T: 1.5" in header
    tof_scan = next(sf[k] for k in range(sf.scanno()) if "histogram tof" in sf[k].command())
    assert tof_scan.datacol(3).tolist() == h.tof.tolist()

    start = json.loads(targets[2].read_text().splitlines()[0])
    assert (
        start["metadata"]["sample"]["name"] == "SiO2" and start["metadata"]["dataset"]["name"] == "capture_1"
    )

    summary = json.loads(Path(m.EndDataset()).read_text())
    assert sorted(f["path"] for f in summary["files"]) == [
        "histograms.jsonl",
        "histograms.nxs",
        "histograms.spec",
    ]
    # the NeXus file stays readable by another process after the scan
    out = subprocess.run([sys.executable, "-c", f"import h5py; print(h5py.File('{targets[0]}')['scan_1/tof/data'][()].sum())"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert int(out.stdout) == int(h.tof.sum())
