"""Sardana integration through the real Door: recorders, histogram channels, macros, faults.

Runs on the default configuration (`livehist up`): Pool, MacroServer, Door, the
EventHistogrammer on the simulator and the MetadataManager, plus Sardana's demo motors.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tango
from PyMca5.PyMcaIO import specfile

from livehist.errors import LivehistError
from livehist.site import control
from livehist.site.door import Door, set_environment
from livehist.site.process import Managed
from tests.test_recorders import run_tool


@pytest.fixture(scope="module")
def site(sardana_site):
    door = Door(sardana_site.url("door/livehist/1"), say=None)
    host, port = sardana_site.host_port
    if not tango.Database(host, port).get_device_alias_list("mot01").value_string:
        door.run(["sar_demo"], timeout=180)
    door.close()
    return sardana_site


class Session:
    """A spock-like session: run macros, keep their output."""

    def __init__(self, site) -> None:
        self.site = site
        self.lines: list[str] = []
        self.door = Door(site.url("door/livehist/1"), say=self.lines.append)

    def run(self, *argv, timeout: float = 180) -> list[str]:
        start = len(self.lines)
        self.door.run([str(a) for a in argv], timeout=timeout)
        time.sleep(0.2)  # the last output events
        return self.lines[start:]

    def env(self, **values) -> None:
        set_environment(self.site.url("macroserver/livehist/1"), values)

    def close(self) -> None:
        self.door.close()


@pytest.fixture
def spock(site, tmp_path):
    s = Session(site)
    s.env(ScanDir=str(tmp_path), ScanFile=["scan.nxs", "scan.spec", "scan.jsonl"], ActiveMntGrp="mg_livehist",
          ScanRecorder=["LivehistRecorder"] * 8, SharedMemory="")  # fmt: skip
    yield s
    s.close()


def wait_state(proxy, states, timeout=30):
    deadline = time.monotonic() + timeout
    while proxy.state() not in states:
        assert time.monotonic() < deadline, proxy.state()
        time.sleep(0.05)


def test_ascan_with_mg_livehist_writes_nexus_spec_and_json(spock, tmp_path):
    spock.run("meta_set", "proposal", "20261111")
    spock.run("meta_set", "sample.name", "LaB6 standard")
    out = spock.run("ascan", "mot01", "0", "1", "4", "0.1")
    assert any("lh_tof" in line for line in out)  # the scan table shows the channel
    nxs, spec, jsonl = (tmp_path / f for f in ("scan.nxs", "scan.spec", "scan.jsonl"))
    with h5py.File(nxs) as f:
        entry = f[next(iter(f))]
        data = entry["data"]
        tof, events = data["lh_tof"][()], data["lh_events"][()]
        assert tof.shape == (5, 1000) and events.shape == (5,) and (events > 0).all()
        # every event of each point falls in the 0-72 ms TOF range: spectrum sum = event counter
        assert tof.sum(axis=1).tolist() == events.astype(np.int64).tolist()
        # the timer is the time counted: the preset, or a little more when the device's thread is
        # woken late on a loaded machine (0.122 s seen in CI), never less; the counts cover the same time
        timer = data["lh_timer"][()]
        assert ((timer >= 0.1) & (timer < 0.6)).all(), timer
        assert np.allclose(data["mot01"][()], [0, 0.25, 0.5, 0.75, 1.0])
        assert (
            entry["experiment_identifier"][()] == b"20261111" and entry["sample/name"][()] == b"LaB6 standard"
        )
        assert entry["livehist/status"][()] == b"ok" and data.attrs["axes"][0] == "mot01"
    check = run_tool("nxcheck", nxs)
    assert "Total number of errors: 0" in check and "Total number of warnings: 0" in check, check
    assert "rror" not in run_tool("nxvalidate", nxs).replace("No application", "")
    scan = specfile.Specfile(str(spec))[0]
    labels = scan.alllabels()
    assert scan.lines() == 5 and scan.nbmca() == 5 and "lh_events" in labels
    spec_events = scan.datacol(labels.index("lh_events") + 1)
    assert [scan.mca(k + 1).sum() for k in range(5)] == spec_events.tolist()
    assert "#C proposal: 20261111" in "\n".join(scan.header(""))
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    points = [r for r in records if r["record"] == "point"]
    assert [sum(p["values"]["lh_tof"]) for p in points] == [p["values"]["lh_events"] for p in points]
    assert records[0]["metadata"]["proposal"] == "20261111" and records[-1]["status"] == "ok"


def test_histo_count_and_dataset_macros(spock, site):
    m = tango.DeviceProxy(site.url("livehist/metadata/1"))
    if m.state() == tango.DevState.RUNNING:  # the proposal names an open dataset's folder: fixed till its end
        m.EndDataset()
    spock.run("meta_set", "proposal", "20262222")
    spock.run("meta_set", "users", "Ada Lovelace (PI), Alan Turing")
    spock.run("meta_set", "sample.temperature", "4.2")
    spock.run("meta_set", "magnetic_field_T", "2.5")
    shown = "\n".join(spock.run("meta_show"))
    assert "sample.temperature  4.2" in shown and "Ada Lovelace (PI), Alan Turing" in shown
    out = spock.run("dataset_start", "count_test")
    folder = Path(json.loads(m.Metadata)["dataset"]["folder"])
    assert any(str(folder) in line for line in out) and folder.is_dir()
    out = spock.run("histo_count", "1")
    assert any("events/s" in line for line in out) and any(
        "scan" in line and "recorded" in line for line in out
    )
    h = tango.DeviceProxy(site.url("livehist/histogrammer/1"))
    with h5py.File(folder / "scan.nxs") as f:
        entry = f[next(iter(f))]
        assert (
            np.array_equal(entry["tof/data"][()], h.tof) and entry["livehist/tof/events"][()] == h.EventCount
        )
        assert entry["sample/temperature"][()] == 4.2 and entry["user_2/name"][()] == b"Alan Turing"
        assert 0.95 < entry["livehist/tof/acquisition_time"][()] < 1.3
    out = spock.run("dataset_end")
    summary = json.loads((folder / "dataset.json").read_text())
    assert {f["path"] for f in summary["files"]} == {"scan.nxs", "scan.spec", "scan.jsonl"}
    assert any("3 files" in line for line in out)


def test_meta_set_users_whose_names_hold_a_comma(spock, site):
    """`meta_set users "Doe, Jane (PI); Li, Wei"` was cut at every comma: four users 'Doe',
    'Jane' (PI), 'Li; Wei'... in every file, and no way to give a 'Last, First' name at all."""
    m = tango.DeviceProxy(site.url("livehist/metadata/1"))
    spock.run("meta_set", "users", "Doe, Jane (PI); Li, Wei")
    assert json.loads(m.GetMetadata())["users"] == [{"name": "Doe, Jane", "role": "PI"}, {"name": "Li, Wei"}]
    shown = [line.split(None, 1) for line in spock.run("meta_show") if line.startswith("users ")]
    assert shown == [["users", "Doe, Jane (PI); Li, Wei"]], shown  # as meta_set takes it
    spock.run("meta_set", "users", '["Lovelace, Ada (PI)", {"name": "Turing, Alan", "orcid": "0000-0001"}]')
    assert json.loads(m.GetMetadata())["users"] == [
        {"name": "Lovelace, Ada", "role": "PI"}, {"name": "Turing, Alan", "orcid": "0000-0001"}]  # fmt: skip
    spock.run("meta_set", "users", "Ada Lovelace (PI), Alan Turing")  # the comma list as before
    assert list(m.Users) == ["Ada Lovelace (PI)", "Alan Turing"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["histo_count", "-1"], "seconds must be > 0"),
        (["meta_set", "proposal", "../etc"], "does not match the pattern"),
        (["meta_set", "sample.temperature", "warm"], "sample.temperature must be a number"),
        (["meta_set", "sample.temperature", "nan"], "sample.temperature must be a number"),
        (["meta_set", "big", "1e400"], "big: '1e400' is not a finite number"),
        (["dataset_start", "a/b"], "is not allowed"),
        (["histo_count"], "'seconds' not specified"),
    ],
)
def test_wrong_macro_arguments_give_clear_errors(spock, argv, message):
    with pytest.raises(LivehistError) as exc:
        spock.run(*argv)
    assert message in str(exc.value) + "\n".join(spock.lines[-20:])


def test_sardana_builtin_recorders_still_work_when_selected(spock, tmp_path):
    spock.env(
        ScanFile=["builtin.h5", "builtin.spec"], ScanRecorder=["NXscanH5_FileRecorder", "SPEC_FileRecorder"]
    )
    spock.run("ascan", "mot01", "0", "1", "2", "0.1")
    with h5py.File(tmp_path / "builtin.h5") as f:
        assert "measurement" in f[next(iter(f))]  # Sardana's layout, not livehist's
    assert specfile.Specfile(str(tmp_path / "builtin.spec"))[0].lines() == 3


# Both SPS tests live in this file: a scan's SPS array is named after its Door, the same in every
# test site, so tests in two pytest workers must not write it at the same time.
def test_shared_memory_sps_is_fed_by_livehist(spock):
    from PyMca5.PyMcaIO import sps

    spock.env(SharedMemory="sps")
    spock.run("ascan", "mot01", "0", "1", "3", "0.1")
    names = [n for n in sps.getspeclist() if "door" in n.lower()]
    assert names, sps.getspeclist()
    data = sps.getdata(names[0], "SCAN_D")
    assert sps.getenv(names[0], "SCAN_D_ENV", "nopts") == "4" and data.shape[1] >= 3
    assert "lh_tof" in sps.getarraylist(names[0])


def test_shared_memory_of_a_scan_carries_the_metadata(spock, site):
    """Sardana makes its shared-memory recorder without the scan's macro: livehist's SPS sink
    never reached the MetadataManager and SCAN_D_ENV said metadata {} and no proposal."""
    from PyMca5.PyMcaIO import sps

    m = tango.DeviceProxy(site.url("livehist/metadata/1"))
    m.SetMetadata(json.dumps({"proposal": "20265555", "sample": {"name": "Si 111"}}))
    spock.env(SharedMemory="sps")
    try:
        spock.run("ascan", "mot01", "0", "1", "1", "0.1")
    finally:
        spock.env(SharedMemory="")
    name = next(n for n in sps.getspeclist() if "door" in n.lower())
    assert sps.getenv(name, "SCAN_D_ENV", "proposal") == "20265555"
    assert sps.getenv(name, "SCAN_D_ENV", "sample") == "Si 111"
    assert json.loads(sps.getenv(name, "SCAN_D_ENV", "metadata"))["proposal"] == "20265555"


def test_unwritable_scandir_fails_before_any_motion(spock):
    mot = tango.DeviceProxy(spock.site.url("motor/motctrl01/1"))
    spock.run("mv", "mot01", "3")
    spock.env(ScanDir="/proc/livehist-cannot-write-here")
    with pytest.raises(LivehistError) as exc:
        spock.run("ascan", "mot01", "0", "1", "3", "0.1")
    assert "/proc/livehist-cannot-write-here" in str(exc.value) + "\n".join(spock.lines[-30:])
    assert mot.Position == pytest.approx(3.0)  # the scan never moved


def wait_points(tmp_path, n=1, timeout=120):
    """Wait until the scan's JSON lines hold `n` points (the first point waits for a cold start)."""
    path = tmp_path / "scan.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count('"record": "point"') >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"the scan wrote fewer than {n} points in {timeout} s")


def test_abort_mid_scan_leaves_consistent_files(spock, tmp_path):
    door = spock.door.proxy
    door.RunMacro(["ascan", "mot01", "0", "10", "40", "0.1"])
    wait_points(tmp_path, 2)
    door.AbortMacro()
    wait_state(door, (tango.DevState.ON, tango.DevState.ALARM))
    h = tango.DeviceProxy(spock.site.url("livehist/histogrammer/1"))
    wait_state(h, (tango.DevState.ON,))  # aborting stopped the acquisition
    with h5py.File(tmp_path / "scan.nxs") as f:
        entry = f[next(iter(f))]
        n = entry["data/lh_events"].shape[0]
        assert 1 <= n < 41 and entry["livehist/status"][()] == b"aborted"
        assert entry["data/lh_tof"].shape == (n, 1000)
    scan = specfile.Specfile(str(tmp_path / "scan.spec"))[0]
    assert scan.lines() == n and "scan aborted" in (tmp_path / "scan.spec").read_text()
    records = [json.loads(line) for line in (tmp_path / "scan.jsonl").read_text().splitlines()]
    assert records[-1]["record"] == "end" and records[-1]["status"] == "aborted"


def _kill_histogrammer(site) -> None:
    pid = Managed(site.state_dir, "EventHistogrammer-livehist").pid()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while control.ping(site.url("livehist/histogrammer/1"), 500) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_histogrammer_down_at_scan_start_and_dying_mid_scan(spock, tmp_path):
    site = spock.site
    mot = tango.DeviceProxy(site.url("motor/motctrl01/1"))
    spock.run("mv", "mot01", "7")
    _kill_histogrammer(site)
    try:
        with pytest.raises(LivehistError) as exc:
            spock.run("ascan", "mot01", "0", "1", "3", "0.1")
        text = str(exc.value) + "\n".join(spock.lines[-30:])
        assert "livehist/histogrammer/1" in text and "does not answer" in text
        assert mot.Position == pytest.approx(7.0)  # refused before any motion
    finally:
        control.up(site.tango_host, site.config_path, site.state_dir, say=lambda s: None)

    door = spock.door.proxy
    door.RunMacro(["ascan", "mot01", "0", "10", "40", "0.1"])
    wait_points(tmp_path, 2)
    _kill_histogrammer(site)
    try:
        wait_state(door, (tango.DevState.ON, tango.DevState.ALARM), timeout=60)
        with h5py.File(tmp_path / "scan.nxs") as f:
            entry = f[next(iter(f))]
            n = entry["data/lh_events"].shape[0]
            assert 1 <= n < 41 and entry["livehist/status"][()] in (b"failed", b"aborted")
            assert (entry["data/lh_events"][()] > 0).all()  # every point kept was acquired
        assert specfile.Specfile(str(tmp_path / "scan.spec"))[0].lines() == n
    finally:
        control.up(site.tango_host, site.config_path, site.state_dir, say=lambda s: None)


def test_histo_count_with_the_metadata_manager_in_fault_still_records(spock, site, tmp_path):
    """With the MetadataManager answering but in FAULT (a StoredMetadata it cannot read), histo_count
    said 'histograms not recorded: ...' and the whole count was lost, where a scan records with a
    warning; the count is recorded without metadata, and says so."""
    name = "livehist/metadata/1"
    m = tango.DeviceProxy(site.url(name))
    db = tango.Database(*site.host_port)
    good = list(db.get_device_property(name, "StoredMetadata")["StoredMetadata"])
    try:
        db.put_device_property(name, {"StoredMetadata": ['{"metadata": {"proposal": "2026']})  # cut short
        m.Init()
        assert m.state() == tango.DevState.FAULT
        out = spock.run("histo_count", "0.5")
        assert any("recording without metadata" in line for line in out), out
        records = [json.loads(line) for line in (tmp_path / "scan.jsonl").read_text().splitlines()]
        assert records[0]["metadata"] == {} and records[-1]["record"] == "end", records[-1]
        assert any(r["record"] == "histogram" for r in records)
        assert any("scan" in line and "recorded in" in line for line in out), out
        out = spock.run("ascan", "mot01", "0", "1", "1", "0.1")  # a scan says why it has no metadata
        assert any("no metadata from" in line and "StoredMetadata is not JSON" in line for line in out), out
    finally:
        if good:
            db.put_device_property(name, {"StoredMetadata": good})
        else:
            db.delete_device_property(name, "StoredMetadata")
        m.Init()
    assert m.state() != tango.DevState.FAULT
