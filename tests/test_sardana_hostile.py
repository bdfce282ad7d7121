"""Found by a hostile test of the Sardana integration and the command line (real servers)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tango

from livehist.errors import LivehistError
from livehist.site.process import free_port
from livehist.site.sardana_setup import environment
from tests import test_sardana
from tests.conftest import run_cli
from tests.test_sardana import wait_points, wait_state

site, spock = test_sardana.site, test_sardana.spock  # the fixtures of the Sardana tests


def _configure_mid_scan(spock, tmp_path, intervals: str, change) -> None:
    """An ascan of `intervals` into tmp_path; after its 3rd point another client Configures the
    histogrammer with `change` applied to the first histogram's tof axis; the list is put back after."""
    h = tango.DeviceProxy(spock.site.url("livehist/histogrammer/1"))
    original = h.HistogramConfig
    changed = json.loads(original)
    change(changed[0]["tof"])
    door = spock.door.proxy
    try:
        door.RunMacro(["ascan", "mot01", "0", "1", intervals, "0.2"])
        wait_points(tmp_path, 3)
        h.Configure(json.dumps(changed))
        wait_state(door, (tango.DevState.ON, tango.DevState.ALARM), timeout=60)
    finally:
        h.Configure(original)


def test_configure_mid_scan_keeps_every_point_and_the_files_say_so(spock, tmp_path):
    _configure_mid_scan(spock, tmp_path, "8", lambda tof: tof.update(bins=10))  # 1000 bins -> 10
    with h5py.File(tmp_path / "scan.nxs") as f:
        entry = f[next(iter(f))]
        events, tof = entry["data/lh_events"][()], entry["data/lh_tof"][()]
        assert events.shape == (9,) and (events > 0).all()  # every measured point is in the file
        assert tof.shape == (9, 1000) and np.isnan(tof[-1]).all()  # never a spectrum it did not get
        assert entry["livehist/status"][()] == b"interrupted"
        assert b"lh_tof changed shape" in entry["livehist/end_reason"][()]
    records = [json.loads(line) for line in (tmp_path / "scan.jsonl").read_text().splitlines()]
    assert sum(r["record"] == "point" for r in records) == 9 and records[-1]["status"] == "interrupted"
    assert "#C scan interrupted" in (tmp_path / "scan.spec").read_text()


def test_histo_count_refuses_before_touching_the_device(spock, site, tmp_path):
    h = tango.DeviceProxy(site.url("livehist/histogrammer/1"))
    spock.run("histo_count", "0.3")
    counted = h.EventCount
    assert counted > 0
    with pytest.raises(LivehistError) as exc:
        spock.run("histo_count", "inf")
    assert "seconds must be > 0 and finite" in str(exc.value)
    assert h.EventCount == counted  # the last count is still there (it was reset before)
    spock.env(ScanDir="/proc/livehist-cannot-write-here")
    t0 = time.monotonic()
    with pytest.raises(LivehistError) as exc:
        spock.run("histo_count", "5")
    assert "ScanDir /proc/livehist-cannot-write-here" in str(exc.value)  # was a bare FileNotFoundError
    assert time.monotonic() - t0 < 4  # refused at once, not after counting 5 s for nothing
    assert h.EventCount == counted


def _start_a_dataset(spock, site, tmp_path, proposal: str, name: str):
    """A new dataset of `proposal` under tmp_path/root (any dataset still open ended first);
    returns the MetadataManager's proxy."""
    m = tango.DeviceProxy(site.url("livehist/metadata/1"))
    if m.state() == tango.DevState.RUNNING:
        m.EndDataset()
    (tmp_path / "root").mkdir()
    spock.run("meta_set", "proposal", proposal)
    spock.run("meta_set", "data_root", str(tmp_path / "root"))
    spock.run("dataset_start", f"{name}_{int(time.time())}")
    return m


def test_dataset_end_sets_scandir_back(spock, site, tmp_path):
    _start_a_dataset(spock, site, tmp_path, "20263333", "scandir")
    ms = tango.DeviceProxy(site.url("macroserver/livehist/1"))
    assert environment(ms)["ScanDir"].startswith(str(tmp_path / "root"))
    spock.run("dataset_end")
    # the next scans must not go on into the closed dataset's folder (its summary is written)
    assert environment(ms)["ScanDir"] == str(tmp_path)


def test_stream_without_a_consumer_ends_cleanly():
    # PUSH with nobody connected: the send blocked for good, then closing the socket under it
    # aborted the process in ZeroMQ (signaler.cpp assertion, SIGABRT) about 11 s later
    t0 = time.monotonic()
    r = run_cli("stream", "sim://?rate=1e5", "--seconds", "1", "--bind", f"tcp://127.0.0.1:{free_port()}",
                timeout=60)  # fmt: skip
    assert r.returncode == 0, (r.returncode, r.stderr[-500:])
    assert "sent 0 events" in r.stdout and time.monotonic() - t0 < 8


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_stream_and_listen_refuse_bad_seconds(value):
    for argv in (
        ["stream", "sim://?rate=1e5", "--seconds", value],
        ["listen", "tcp://127.0.0.1:1", "--seconds", value],
    ):
        r = run_cli(*argv, timeout=30)
        assert r.returncode == 1 and "--seconds must be a number >= 0" in r.stderr, r.stderr


def test_scan_with_integration_time_zero_is_refused_and_the_door_stays_usable(spock, site, tmp_path):
    # 0 is neither a time nor a monitor count: the device got no preset, counted for ever, and the
    # scan hung at its first point until aborted
    ms = tango.DeviceProxy(site.url("macroserver/livehist/1"))
    hooks = environment(ms)["_GeneralHooks"]
    with pytest.raises(LivehistError) as exc:
        spock.run("ascan", "mot01", "0", "1", "2", "0", timeout=30)
    assert "integration time 0" in str(exc.value)  # the pre-scan hook says why
    spock.env(_GeneralHooks=[])  # without the hook the controller still ends the acquisition
    try:
        with pytest.raises(LivehistError) as exc:
            spock.run("ascan", "mot01", "0", "1", "2", "0", timeout=30)
        assert "did not end" not in str(exc.value)
    finally:
        spock.env(_GeneralHooks=hooks)
    spock.run("ascan", "mot01", "0", "1", "2", "0.1", timeout=60)  # the next scan runs
    records = [json.loads(line) for line in (tmp_path / "scan.jsonl").read_text().splitlines()]
    assert records[-1]["status"] == "ok" and sum(r["record"] == "point" for r in records[-5:]) == 3


def test_histo_start_after_a_count_runs_until_histo_stop(spock, site):
    # the count's PresetTime (0.2 s) stayed on the device, so histo_start stopped by itself 0.2 s later
    h = tango.DeviceProxy(site.url("livehist/histogrammer/1"))
    spock.run("histo_count", "0.2")
    spock.run("histo_start")
    try:
        time.sleep(1.5)
        assert h.state() == tango.DevState.RUNNING
    finally:
        spock.run("histo_stop")
    assert h.ElapsedTime > 1.2 and h.PresetTime == 0


def test_histo_count_over_a_running_acquisition_says_it_ends_it(spock, site):
    h = tango.DeviceProxy(site.url("livehist/histogrammer/1"))
    spock.run("histo_start")
    time.sleep(0.5)
    spock.run("histo_count", "0.2")
    said = "\n".join(spock.lines[-30:])
    assert "was acquiring (" in said and "histo_count stopped it and counts from zero" in said, said
    assert h.state() == tango.DevState.ON


def test_a_scan_over_a_running_acquisition_is_refused_before_it_changes_anything(spock, site, tmp_path):
    # it failed with Sardana's "mg_livehist state is Moving ... Can not proceed to start"
    h = tango.DeviceProxy(site.url("livehist/histogrammer/1"))
    spock.env(ScanDir=str(tmp_path), ScanFile=["running.jsonl"])
    spock.run("histo_start")
    try:
        time.sleep(0.5)
        with pytest.raises(LivehistError) as exc:
            spock.run("ascan", "mot01", "0", "1", "1", "0.1", timeout=60)
        assert "is acquiring (" in str(exc.value) and "histo_stop first" in str(exc.value), exc.value
        counted = h.EventCount
        time.sleep(0.3)
        assert h.state() == tango.DevState.RUNNING and h.EventCount > counted  # still acquiring
    finally:
        spock.run("histo_stop")
    spock.run("ascan", "mot01", "0", "1", "1", "0.1", timeout=60)  # after histo_stop the scan runs
    records = [json.loads(line) for line in (tmp_path / "running.jsonl").read_text().splitlines()]
    assert records[-1]["status"] == "ok" and sum(r["record"] == "point" for r in records) == 2


def test_demo_with_an_unwritable_out_fails_before_starting_anything(tmp_path):
    state = tmp_path / "state"
    try:
        r = run_cli("demo", "--out", "/proc/livehist-demo", "--state-dir", str(state),
                    "--tango-host", f"127.0.0.1:{free_port()}", timeout=60)  # fmt: skip
    finally:
        if (state / "state.json").exists():  # it started a site (the bug): stop it
            run_cli("down", "--state-dir", str(state), timeout=60)
    assert r.returncode == 1 and "--out '/proc/livehist-demo' cannot be created" in r.stderr, r.stderr[-800:]
    assert "Traceback" not in r.stderr and not (state / "state.json").exists()  # nothing was started


def test_a_configure_that_keeps_the_shape_mid_scan_is_not_recorded_as_ok(spock, tmp_path):
    """A Configure halving the tof range (1000 bins kept) during an ascan: the lh_tof points after
    it hold another binning than those before, yet the files said status ok."""
    _configure_mid_scan(spock, tmp_path, "6", lambda tof: tof.update(stop=tof["stop"] // 2))
    time.sleep(0.3)
    said = [line for line in spock.lines if "reconfigured during the scan" in line]
    assert len(said) == 1 and "lh_tof" in said[0], spock.lines[-10:]  # once, not once per file
    with h5py.File(tmp_path / "scan.nxs") as f:
        entry = f[next(iter(f))]
        assert entry["data/lh_tof"].shape == (7, 1000)  # every point kept
        assert entry["livehist/status"][()] == b"interrupted"
        assert b"histogram tof" in entry["livehist/end_reason"][()]
    records = [json.loads(line) for line in (tmp_path / "scan.jsonl").read_text().splitlines()]
    assert records[-1]["status"] == "interrupted" and "lh_tof" in records[-1]["reason"]
    assert "#C scan interrupted" in (tmp_path / "scan.spec").read_text()


def test_the_same_file_twice_in_scanfile_is_recorded_once(spock, tmp_path):
    """ScanFile ['scan.nxs', 'scan.spec', 'scan.nxs']: the scan was refused ('being written by
    another scan of this server (another Door?)') and left a failed entry in scan.spec."""
    spock.env(ScanFile=["scan.nxs", "scan.spec", "scan.nxs"])
    spock.run("ascan", "mot01", "0", "1", "2", "0.1")
    assert sum("listed twice in ScanFile" in line for line in spock.lines) == 1
    with h5py.File(tmp_path / "scan.nxs") as f:
        assert len(f) == 1
        entry = f[next(iter(f))]
        assert entry["livehist/status"][()] == b"ok" and entry["data/lh_events"].shape == (3,)
    assert "#C scan ended at" in (tmp_path / "scan.spec").read_text()
    spock.run("histo_count", "0.2")  # the count was refused likewise
    assert sum("listed twice in ScanFile" in line for line in spock.lines) == 2
    with h5py.File(tmp_path / "scan.nxs") as f:
        assert len(f) == 2 and all(f[e]["livehist/status"][()] == b"ok" for e in f)


def test_end_dataset_is_refused_while_a_scan_writes_into_it(spock, site, tmp_path):
    """EndDataset from another client (a panel) during an ascan wrote a summary listing the files
    at half their final size, and the scan went on into the closed dataset."""
    m = _start_a_dataset(spock, site, tmp_path, "20264444", "busy")
    folder = Path(environment(tango.DeviceProxy(site.url("macroserver/livehist/1")))["ScanDir"])
    door = spock.door.proxy
    door.RunMacro(["ascan", "mot01", "0", "1", "6", "0.2"])
    try:
        wait_points(folder, 2)
        with pytest.raises(tango.DevFailed) as exc:
            m.EndDataset()
        assert "being written" in exc.value.args[0].desc and "scan.nxs" in exc.value.args[0].desc
        assert m.state() == tango.DevState.RUNNING and not (folder / "dataset.json").exists()
    finally:
        wait_state(door, (tango.DevState.ON, tango.DevState.ALARM), timeout=60)
    spock.run("dataset_end")  # once the scan has ended
    summary = json.loads((folder / "dataset.json").read_text())
    assert {f["path"]: f["size"] for f in summary["files"]} == {
        p.name: p.stat().st_size for p in folder.iterdir() if p.name != "dataset.json"
    }


def test_a_hung_metadata_manager_delays_a_scan_start_a_few_seconds_once(spock, site, tmp_path):
    """A MetadataManager that stopped answering (its server hung) held the start of each file of
    a scan for 12 s: a one-point ascan into .nxs, .spec and .jsonl took 37 s, warning 3 times."""
    import os
    import signal

    pid = json.loads((site.state_dir / "run" / "MetadataManager-livehist.json").read_text())["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        spock.run("ascan", "mot01", "0", "1", "1", "0.1")
        took = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    warned = [line for line in spock.lines if "no metadata from" in line]
    assert len(warned) == 1 and "files carry none" in warned[0], warned
    assert took < 15, took
    with h5py.File(tmp_path / "scan.nxs") as f:
        entry = f[next(iter(f))]
        assert entry["livehist/status"][()] == b"ok" and json.loads(entry["notes/data"][()])["metadata"] == {}


def test_a_door_that_does_not_answer_for_a_while_does_not_end_the_macro_run(spock, site, tmp_path):
    """A Door busy beyond a client's 3 s timeout (its server held up: here SIGSTOPped for 5 s) made
    the run raise CommunicationFailed while the macro went on, and every next macro was refused
    ('RunMacro not allowed when the device is in RUNNING state'), seen in CI under load."""
    import os
    import signal
    import threading

    pid = json.loads((site.state_dir / "run" / "Sardana-livehist.json").read_text())["pid"]
    door = tango.DeviceProxy(site.url("door/livehist/1"))
    done: dict = {}

    def scan():
        try:
            spock.run("ascan", "mot01", "0", "1", "3", "0.2")
            done["ok"] = True
        except Exception as exc:
            done["error"] = exc

    worker = threading.Thread(target=scan)
    worker.start()
    deadline = time.monotonic() + 30
    while door.state() != tango.DevState.RUNNING and "error" not in done:
        assert time.monotonic() < deadline, "the scan did not start"
        time.sleep(0.02)
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(5.0)
    finally:
        os.kill(pid, signal.SIGCONT)
    worker.join(timeout=120)
    assert done.get("ok"), done
    assert door.state() == tango.DevState.ON
    spock.run("ascan", "mot01", "0", "1", "1", "0.1")  # the Door takes the next macro


def test_ct_0_on_livehist_channels_is_refused_and_never_shows_an_earlier_count(spock, site):
    """Sardana's `ct 0` acquires nothing and prints the channels' last values: on mg_livehist those
    of the previous count (lh_timer 0.3 after a `ct 0.3`), as if just counted. Refused, naming the
    fix; channels of other controllers keep Sardana's behaviour."""
    first = "\n".join(spock.run("ct", "0.3"))
    assert "lh_events" in first
    for argv in (["ct", "0"], ["ct", "0", "lh_events"]):
        start = len(spock.lines)
        with pytest.raises(LivehistError) as exc:
            spock.run(*argv, timeout=60)
        said = str(exc.value) + "\n".join(spock.lines[start:])
        assert "acquires nothing" in said and "e.g. ct 0.1" in said, said
        assert not any(" = " in line for line in spock.lines[start:]), spock.lines[start:]  # no value shown
    assert any("ct01" in line for line in spock.run("ct", "0", "ct01"))  # Sardana's own counter: as before
    again = "\n".join(spock.run("ct", "0.2"))  # the next count runs
    assert "lh_events" in again and "0.2" in again


@pytest.mark.parametrize("scan_id", ["abc", -5])
def test_histo_count_with_an_unusable_scanid_refuses_before_counting(spock, site, scan_id):
    """ScanID 'abc' (or -5) made histo_count count the whole time, clearing the last count, then
    fail with "ValueError: invalid literal for int()" (or 'scan_number must be >= 0'): nothing
    recorded, the time lost. Refused before the device is touched, naming the fix."""
    h = tango.DeviceProxy(site.url("livehist/histogrammer/1"))
    ms = tango.DeviceProxy(site.url("macroserver/livehist/1"))
    spock.run("histo_count", "0.2")
    counted, before = h.EventCount, environment(ms)["ScanID"]
    spock.env(ScanID=scan_id)
    try:
        t0 = time.monotonic()
        with pytest.raises(LivehistError) as exc:
            spock.run("histo_count", "5")
        took = time.monotonic() - t0
    finally:
        spock.env(ScanID=before)
    assert f"ScanID is {scan_id!r}" in str(exc.value) and "senv ScanID" in str(exc.value), exc.value
    assert took < 4 and h.EventCount == counted  # refused at once; the last count is still there


def test_nothing_is_recorded_into_a_closed_dataset(spock, site, tmp_path):
    """A dataset ended by another client (a panel's EndDataset), or by dataset_end with no ScanDir
    to go back to, left ScanDir on its folder: the next histo_count and scans wrote there after
    its dataset.json was written, so the summary ICAT/SciCat take listed none of those files."""
    m = _start_a_dataset(spock, site, tmp_path, "20265656", "closed")
    ms = tango.DeviceProxy(site.url("macroserver/livehist/1"))
    folder = Path(environment(ms)["ScanDir"])
    spock.run("histo_count", "0.2")
    m.EndDataset()  # another client
    listed = {f["path"] for f in json.loads((folder / "dataset.json").read_text())["files"]}
    before = sorted(p.name for p in folder.iterdir())
    assert listed == {"scan.nxs", "scan.spec", "scan.jsonl"}
    for argv in (["histo_count", "0.2"], ["ascan", "mot01", "0", "1", "1", "0.1"]):
        with pytest.raises(LivehistError) as exc:
            spock.run(*argv, timeout=60)
        assert "closed" in str(exc.value) and "dataset_start" in str(exc.value), exc.value
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written after its summary
    assert json.loads((folder / "dataset.json").read_text())["files"]  # the summary as it was
    spock.env(ScanDir=str(tmp_path))
    (tmp_path / "dataset.json").write_text('{"name": "another program\'s file"}')  # not a summary of ours
    spock.run("histo_count", "0.2")  # elsewhere it records
    assert (tmp_path / "scan.nxs").exists()


def test_a_source_failing_mid_count_is_recorded_as_failed_not_lost(spock, site, tmp_path, own_kafka_broker):
    """The Kafka broker dying 1 s into `histo_count 60` put the device in FAULT (reconnecting, its
    histograms kept): histo_count raised 'is in FAULT' and recorded nothing, while the device went
    on acquiring unwatched once the broker was back. The count is stopped and recorded as failed,
    saying after how long and why."""
    from livehist.engine.events import encode_ev44
    from tests.conftest import kafka_topic
    from tests.test_kafka import producer, pulses

    name = "livehist/histogrammer/1"
    h = tango.DeviceProxy(site.url(name))
    h.set_timeout_millis(10_000)
    db = tango.Database(*site.host_port)
    source = list(db.get_device_property(name, "EventSource")["EventSource"])
    broker = own_kafka_broker.address
    topic = kafka_topic(broker, 1, prefix="histo-count-fault")
    p = producer(broker)
    for i in range(20):
        p.produce(topic, encode_ev44(pulses(i, 1, 1000, seed=i), i, "det"), partition=0)
    p.flush(30)
    db.put_device_property(name, {"EventSource": [f"kafka://{broker}/{topic}?start=earliest"]})
    h.Init()
    try:
        door = spock.door.proxy
        door.RunMacro(["histo_count", "60"])
        deadline = time.monotonic() + 30
        while h.EventCount < 20_000:  # start=earliest: every message produced is counted first
            assert time.monotonic() < deadline, (h.state(), h.status())
            time.sleep(0.1)
        own_kafka_broker.kill()
        wait_state(door, (tango.DevState.ON, tango.DevState.ALARM), timeout=60)
        assert door.state() == tango.DevState.ALARM  # the macro ends in error, having recorded
        time.sleep(0.3)
        said = "\n".join(spock.lines[-15:])
        assert "recorded as failed in" in said and "FAULT" in said, said
        assert h.state() not in (tango.DevState.RUNNING, tango.DevState.ALARM)  # not left acquiring
        with h5py.File(tmp_path / "scan.nxs", "r") as f:
            e = f[next(iter(f))]
            reason = e["livehist/end_reason"][()].decode()
            assert e["livehist/status"][()] == b"failed" and "FAULT" in reason and "of 60 s" in reason, reason
            assert e["tof/data"][()].sum() == 20_000 and e["livehist/tof/events"][()] == 20_000
        end = json.loads((tmp_path / "scan.jsonl").read_text().splitlines()[-1])
        assert end["record"] == "end" and end["status"] == "failed"
    finally:
        db.put_device_property(name, {"EventSource": source})
        h.Init()


def test_macros_on_a_device_of_another_kind_say_so(spock, site):
    """LivehistHistogrammer set to the MetadataManager (or LivehistMetadata to the histogrammer):
    the macros failed with 'Error: HistogramConfig', 'AttributeError: Start', 'AttributeError:
    SetMetadata'. They name the device, what it is and the variable to fix."""
    cases = {"LivehistHistogrammer": ("livehist/metadata/1", [["histo_count", "1"], ["histo_start"], ["histo_stop"],
                                                              ["histo_reset"]]),
             "LivehistMetadata": ("livehist/histogrammer/1", [["meta_set", "title", "x"], ["meta_show"],
                                                              ["dataset_start", "wrong_kind"], ["dataset_end"]])}  # fmt: skip
    for variable, (device, macros) in cases.items():
        spock.env(**{variable: device})
        try:
            for argv in macros:
                with pytest.raises(LivehistError) as exc:
                    spock.run(*argv, timeout=60)
                text = str(exc.value)
                assert f"{device} is not" in text and f"senv {variable}" in text, (argv, text)
        finally:
            spock.env(LivehistHistogrammer="livehist/histogrammer/1", LivehistMetadata="livehist/metadata/1")
