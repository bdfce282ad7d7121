"""Dead time per scan point in Sardana: mg_livehist beside Sardana's dummy counters (`livehist bench`).

A fresh site (embedded DB, default configuration, sar_demo) runs the same `ascan` of N
points with 0.1 s integration twice per case: with `mntgrp01` (Sardana's dummy
counter/timers) and with `mg_livehist` (timer, event counter and the 1000-bin `tof` of
the simulator-fed EventHistogrammer). Dead time per point = (scan time - acquisition
time) / points, from Sardana's own ScanHistory. Files: none in the first pair (the cost
of the channels alone); in the second, each with its own recorders (Sardana's NXscanH5 +
SPEC for the dummies, livehist's NeXus + SPEC + JSON for mg_livehist).
"""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

from livehist.site import control
from livehist.site.door import Door, set_environment
from livehist.site.process import free_port


def _scan_deadtime(site, door, points: int, env: dict) -> float:
    set_environment(site.url("macroserver/livehist/1"), env)
    door.run(["ascan", "mot01", "0", "1", str(points), "0.1"], timeout=600)
    import tango

    ms = tango.DeviceProxy(site.url("macroserver/livehist/1"))
    data = pickle.loads(ms.read_attribute("Environment").value[1])
    history = data.get("new", data)["ScanHistory"][-1]
    return history["deadtime"] / (points + 1)


def sardana_figures(row, quick: bool = False) -> None:
    points = 20 if quick else 100
    with tempfile.TemporaryDirectory(prefix="livehist-bench-sardana-") as tmp:
        state = Path(tmp)
        site = control.up(f"127.0.0.1:{free_port()}", None, state, say=lambda s: None)
        try:
            door = Door(site.url("door/livehist/1"), say=None)
            door.run(["sar_demo"], timeout=300)
            scans = state / "scans"
            no_files = {"ScanDir": str(scans), "ScanFile": []}
            dummy = _scan_deadtime(site, door, points, {**no_files, "ActiveMntGrp": "mntgrp01"})
            ours = _scan_deadtime(site, door, points, {**no_files, "ActiveMntGrp": "mg_livehist"})
            row(f"Sardana ascan, {points} points x 0.1 s, mg_livehist (timer, events, 1000-bin tof): dead time "
                "per point, no files", ours, "s", "same scan with Sardana's dummy counters (mntgrp01)", dummy,
                "<= dummy + 0.020 s", ours <= dummy + 0.020)  # fmt: skip
            dummy_f = _scan_deadtime(site, door, points, {"ScanDir": str(scans), "ActiveMntGrp": "mntgrp01",
                                                          "ScanFile": ["dummy.h5", "dummy.spec"],
                                                          "ScanRecorder": ["NXscanH5_FileRecorder", "SPEC_FileRecorder"]})  # fmt: skip
            ours_f = _scan_deadtime(site, door, points, {"ScanDir": str(scans), "ActiveMntGrp": "mg_livehist",
                                                         "ScanFile": ["ours.nxs", "ours.spec", "ours.jsonl"],
                                                         "ScanRecorder": ["LivehistRecorder"] * 3})  # fmt: skip
            row("same, each writing files (mg_livehist: livehist NeXus + SPEC + JSON)", ours_f, "s",
                "dummies with Sardana's NXscanH5 + SPEC recorders", dummy_f, "<= dummy + 0.020 s",
                ours_f <= dummy_f + 0.020)  # fmt: skip
            door.close()
        finally:
            control.down(state, say=lambda s: None)
