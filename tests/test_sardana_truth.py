"""What is written is true (issue 14), through the real Door, files read by outside readers:
Unicode from the MetadataManager into every file byte-exact, spock escapes, foreign files
refused, interrupted counts recorded as such, one scan number, datasets never overwritten."""

from __future__ import annotations

import json
import re
import time

import h5py
import numpy as np
import pytest
import tango
from PyMca5.PyMcaIO import specfile
from silx.io.specfile import SpecFile

from livehist.errors import LivehistError
from tests.test_recorders import run_tool
from tests.test_sardana import Session, site, wait_state  # noqa: F401 (the module's site fixture)

SAMPLE = "α-Fe2O3 – 5 K"
USER = "Łukasz Dvořák"
TITLE = "Magnons in β-Ga2O3: q in Å⁻¹ at 4 °C, 5 µs frames"


@pytest.fixture
def spock(site, tmp_path):  # noqa: F811
    s = Session(site)
    s.env(ScanDir=str(tmp_path), ScanFile=["u.nxs", "u.spec", "u.jsonl"], ActiveMntGrp="mg_livehist",
          ScanRecorder=["LivehistRecorder"] * 8, SharedMemory="")  # fmt: skip
    m = tango.DeviceProxy(site.url("livehist/metadata/1"))
    m.set_timeout_millis(10_000)
    if m.state() == tango.DevState.RUNNING:
        m.EndDataset()
    s.metadata = m
    yield s
    s.close()


def _scan_numbers(tmp_path):
    with h5py.File(tmp_path / "u.nxs", "r") as f:
        nexus = [int(f[e]["entry_identifier"][()]) for e in f]
    records = [json.loads(line) for line in (tmp_path / "u.jsonl").read_text().splitlines()]
    return nexus, [r["scan_number"] for r in records if r["record"] == "start"], records


def test_unicode_metadata_travels_through_a_scan_into_every_file_byte_exact(spock, tmp_path):
    spock.metadata.SetMetadata(json.dumps({"proposal": "20261414", "title": TITLE, "sample": {"name": SAMPLE},
                                           "users": [{"name": USER, "role": "PI"}]}))  # fmt: skip
    shown = "\n".join(spock.run("meta_show"))  # the Door's Output is Latin-1: escapes, no failure
    # the key column is as wide as the longest key, which earlier tests' free-form keys may widen
    assert re.search(r"^sample\.name +\\u03b1-Fe2O3 \\u2013 5 K$", shown, re.M), shown
    assert "\\u0141ukasz Dvo\\u0159\u00e1k (PI)" in shown
    spock.run("ascan", "mot01", "0", "1", "2", "0.1")

    with h5py.File(tmp_path / "u.nxs", "r") as f:
        e = f[next(iter(f))]
        assert e["sample/name"][()] == SAMPLE.encode("utf-8")  # NeXus strings are UTF-8
        assert e["user_1/name"][()] == USER.encode("utf-8")
        assert e["experiment_description"][()] == TITLE.encode("utf-8")
        assert e["sample/name"].asstr()[()] == SAMPLE
    check = run_tool("nxcheck", tmp_path / "u.nxs")
    assert "Total number of errors: 0" in check, check
    raw = (tmp_path / "u.spec").read_bytes()
    for line in (f"#C title: {TITLE}", f"#C sample.name: {SAMPLE}", f"#C user: name={USER}, role=PI"):
        assert line.encode("utf-8") in raw
    header = "\n".join(specfile.Specfile(str(tmp_path / "u.spec"))[0].header(""))
    assert f"#C sample.name: {SAMPLE}" in header
    silx_header = "\n".join(SpecFile(str(tmp_path / "u.spec"))[0].scan_header)
    assert f"#C user: name={USER}, role=PI" in silx_header
    raw = (tmp_path / "u.jsonl").read_bytes()
    assert SAMPLE.encode("utf-8") in raw and USER.encode("utf-8") in raw and TITLE.encode("utf-8") in raw
    start = json.loads(raw.decode("utf-8").splitlines()[0])
    assert start["metadata"]["sample"]["name"] == SAMPLE and start["metadata"]["users"][0]["name"] == USER
    assert start["metadata"]["title"] == TITLE


def test_spock_escapes_and_attribute_names_in_meta_set(spock):
    out = spock.run("meta_set", "SampleName", "\\N{GREEK SMALL LETTER BETA}-Ga2O3")
    assert 'sample.name = "\\u03b2-Ga2O3"' in out[-1]
    spock.run("meta_set", "users", "Anton\\u00edn Dvo\\u0159\\u00e1k (PI), \\u0141ukasz")
    spock.run("meta_set", "Proposal", "20260001")
    md = json.loads(spock.metadata.GetMetadata())
    assert md["sample"]["name"] == "β-Ga2O3" and md["proposal"] == "20260001" and "Proposal" not in md
    assert [u["name"] for u in md["users"]] == ["Antonín Dvořák", "Łukasz"]
    with pytest.raises(LivehistError) as exc:
        spock.run("meta_set", "sample.name", "\\N{GREEK LETTER NOTHING}")
    assert "\\u03b1" in str(exc.value) + "\n".join(spock.lines[-10:])  # the error shows the form to use


def test_histo_count_and_ascan_refuse_a_foreign_nexus_file(spock, tmp_path):
    foreign = tmp_path / "u.nxs"
    with h5py.File(foreign, "w") as f:
        f["counts"] = np.arange(5)
    before = foreign.read_bytes()
    with pytest.raises(LivehistError) as exc:
        spock.run("histo_count", "0.3")
    text = str(exc.value) + "\n".join(spock.lines[-10:])
    assert "not written by livehist" in text and "histograms not recorded" in text, text
    assert not any("recorded in" in line for line in spock.lines[-10:])
    mot = tango.DeviceProxy(spock.site.url("motor/motctrl01/1"))
    spock.run("mv", "mot01", "3")
    with pytest.raises(LivehistError):
        spock.run("ascan", "mot01", "0", "1", "2", "0.1")
    assert mot.Position == pytest.approx(3.0)  # refused before any motion
    assert foreign.read_bytes() == before
    assert not (tmp_path / "u.spec").exists() and not (tmp_path / "u.jsonl").exists()


@pytest.mark.parametrize("command", ["Stop", "Init"])
def test_a_count_stopped_by_another_client_is_recorded_as_interrupted(spock, tmp_path, command):
    h = tango.DeviceProxy(spock.site.url("livehist/histogrammer/1"))
    door = spock.door.proxy
    door.RunMacro(["histo_count", "20"])
    wait_state(h, (tango.DevState.RUNNING, tango.DevState.ALARM))
    time.sleep(1.5)
    other = tango.DeviceProxy(spock.site.url("livehist/histogrammer/1"))  # another client
    other.command_inout(command)
    wait_state(door, (tango.DevState.ON, tango.DevState.ALARM), timeout=60)
    time.sleep(0.3)
    assert any("recorded as interrupted" in line for line in spock.lines), spock.lines[-10:]
    with h5py.File(tmp_path / "u.nxs", "r") as f:
        e = f[next(iter(f))]
        reason = e["livehist/end_reason"][()].decode()
        counted = e["livehist/tof/acquisition_time"][()]
        assert e["livehist/status"][()] == b"interrupted"
        assert f"interrupted by {command} from" in reason and "of 20 s" in reason, reason
        if command == "Stop":
            assert 1.0 < counted < 19 and f"after {counted:.2f} s" in reason
        else:  # Init cleared the device: the record says so, and how long it had counted
            assert "histograms were cleared" in reason and counted < 0.5
            assert 1.0 < float(reason.split(" after ")[1].split(" s")[0]) < 19
    end = json.loads((tmp_path / "u.jsonl").read_text().splitlines()[-1])
    assert end["record"] == "end" and end["status"] == "interrupted" and f"{command} from" in end["reason"]
    assert "#C scan interrupted at" in (tmp_path / "u.spec").read_text()
    host, port = spock.site.host_port
    mg = tango.DeviceProxy(spock.site.url(tango.Database(host, port).get_device_alias("mg_livehist")))
    wait_state(mg, (tango.DevState.ON,), timeout=60)  # the measurement group recovers for the next scans


def test_two_counts_and_a_scan_have_one_number_in_every_file(spock, tmp_path):
    spock.run("histo_count", "0.3")
    spock.run("histo_count", "0.3")
    spock.run("ascan", "mot01", "0", "1", "1", "0.1")
    nexus, jsonl, _ = _scan_numbers(tmp_path)
    sf = SpecFile(str(tmp_path / "u.spec"))
    spec = sorted({int(k.split(".")[0]) for k in sf.keys()})
    assert nexus == jsonl == spec and len(nexus) == 3 and nexus == list(range(nexus[0], nexus[0] + 3))
    assert all(sf[k].scan_header_dict["S"].split()[0] == k.split(".")[0] for k in sf.keys())


def test_a_closed_dataset_is_never_overwritten_through_the_door(spock):
    spock.run("meta_set", "proposal", "20261515")
    spock.run("dataset_start", "run_truth")
    out = spock.run("dataset_end")
    summary_line = next(line for line in out if "summary" in line)
    path = summary_line.rsplit("summary ", 1)[1].strip()
    first = open(path).read()
    with pytest.raises(LivehistError) as exc:
        spock.run("dataset_start", "run_truth")
    assert "already recorded and closed" in str(exc.value) + "\n".join(spock.lines[-10:])
    assert open(path).read() == first and spock.metadata.state() == tango.DevState.ON


def test_device_errors_keep_micro_signs_intact(site):  # noqa: F811
    h = tango.DeviceProxy(site.url("livehist/histogrammer/1"))
    bad = [{"name": "t_µs", "kind": "tof", "tof": {"start": 0, "stop": 10, "bins": 10, "unit": "µs"}}]
    with pytest.raises(tango.DevFailed) as exc:
        h.Configure(json.dumps(bad, ensure_ascii=False))
    text = exc.value.args[0].desc
    assert "µs" in text and "Âµ" not in text, text


def test_a_file_failing_at_scan_start_ends_the_files_already_started(spock, tmp_path):
    (tmp_path / "full.jsonl").symlink_to("/dev/full")  # every write fails: No space left on device
    spock.env(ScanFile=["u.nxs", "full.jsonl"])
    mot = tango.DeviceProxy(spock.site.url("motor/motctrl01/1"))
    spock.run("mv", "mot01", "2")
    with pytest.raises(LivehistError) as exc:
        spock.run("ascan", "mot01", "0", "1", "2", "0.1")
    assert "No space left on device" in str(exc.value) + "\n".join(spock.lines[-10:])
    assert mot.Position == pytest.approx(2.0)
    with h5py.File(tmp_path / "u.nxs", "r") as f:  # closed and readable, claiming nothing
        e = f[next(iter(f))]
        assert e["livehist/status"][()] == b"failed" and e["data/lh_events"].shape == (0,)
        assert b"the scan did not start" in e["livehist/end_reason"][()]


def test_a_scan_dir_and_file_names_beyond_latin1_record(spock, tmp_path):
    """A ScanDir under a DataRoot such as /data/实验 failed every scan before it started:
    Sardana shows the file names in the Door's Output (Latin-1) and raised UnicodeError."""
    folder = tmp_path / "实验"
    spock.env(ScanDir=str(folder), ScanFile=["数据 α.nxs", "数据 α.spec", "数据 α.jsonl"])
    spock.run("ascan", "mot01", "0", "1", "2", "0.1")
    with h5py.File(folder / "数据 α.nxs", "r") as f:
        e = f[next(iter(f))]
        assert e["livehist/status"][()] == b"ok" and e["data/lh_events"].shape == (3,)
    assert specfile.Specfile(str(folder / "数据 α.spec"))[0].lines() == 3
    assert json.loads((folder / "数据 α.jsonl").read_text().splitlines()[-1])["status"] == "ok"


def test_a_histogram_reconfigured_during_a_count_is_not_recorded_as_the_whole_count(spock, tmp_path):
    """A Configure that changed the tof binning 1 s into `histo_count 3` restarted tof from zero;
    the file said status ok, 3 s and every event for a tof holding a fraction of them."""
    h = tango.DeviceProxy(spock.site.url("livehist/histogrammer/1"))
    original = h.HistogramConfig
    fewer = json.loads(original)
    fewer[0]["tof"]["bins"] = 10
    door = spock.door.proxy
    try:
        door.RunMacro(["histo_count", "3"])
        wait_state(h, (tango.DevState.RUNNING, tango.DevState.ALARM))
        time.sleep(1.0)
        h.Configure(json.dumps(fewer))  # another client (a panel) changes the binning
        wait_state(door, (tango.DevState.ON, tango.DevState.ALARM), timeout=60)
    finally:
        h.Configure(original)
    time.sleep(0.3)
    assert any("tof" in line and "reconfigured" in line for line in spock.lines), spock.lines[-10:]
    with h5py.File(tmp_path / "u.nxs", "r") as f:
        e = f[next(iter(f))]
        reason = e["livehist/end_reason"][()].decode()
        assert e["livehist/status"][()] == b"interrupted" and "tof" in reason and "reconfigured" in reason
        assert "image" not in reason.split("reconfigured")[0]  # kept its binning, and its counts
        assert e["tof/data"].shape == (10,) and e["tof/data"][()].sum() < e["image/data"][()].sum()
    end = json.loads((tmp_path / "u.jsonl").read_text().splitlines()[-1])
    assert end["status"] == "interrupted" and "tof" in end["reason"]
    assert "#C scan interrupted at" in (tmp_path / "u.spec").read_text()


@pytest.mark.parametrize("command", ["StopMacro", "AbortMacro"])
def test_a_count_stopped_or_aborted_by_the_user_records_what_it_counted(spock, tmp_path, command):
    """Ctrl-C in spock (StopMacro; AbortMacro the second time) during `histo_count 20` stopped the
    device and recorded nothing: the counts of the seconds acquired were lost, and no file said
    why. The count is recorded as aborted with the time it counted, and the ScanID is taken."""
    from livehist.site.sardana_setup import environment

    h = tango.DeviceProxy(spock.site.url("livehist/histogrammer/1"))
    ms = tango.DeviceProxy(spock.site.url("macroserver/livehist/1"))
    serial = int(environment(ms).get("ScanID", 0))
    door = spock.door.proxy
    door.RunMacro(["histo_count", "20"])
    wait_state(h, (tango.DevState.RUNNING, tango.DevState.ALARM))
    time.sleep(1.5)
    door.command_inout(command)  # what spock's Ctrl-C sends
    wait_state(door, (tango.DevState.ON, tango.DevState.ALARM), timeout=60)
    time.sleep(0.3)
    assert h.state() == tango.DevState.ON  # the device was stopped
    assert int(environment(ms)["ScanID"]) == serial + 1
    assert any("recorded as aborted" in line for line in spock.lines), spock.lines[-10:]
    word = "stopped" if command == "StopMacro" else "aborted"
    with h5py.File(tmp_path / "u.nxs", "r") as f:
        e = f[next(iter(f))]
        reason = e["livehist/end_reason"][()].decode()
        counted = e["livehist/tof/acquisition_time"][()]
        assert e["livehist/status"][()] == b"aborted" and int(e["entry_identifier"][()]) == serial + 1
        assert 1.0 < counted < 19 and f"{word} by the user" in reason and "of 20 s" in reason, reason
        assert f"after {counted:.2f} s" in reason, reason
        assert np.array_equal(e["tof/data"][()], h.tof) and e["tof/data"][()].sum() > 0
    end = json.loads((tmp_path / "u.jsonl").read_text().splitlines()[-1])
    assert end["record"] == "end" and end["status"] == "aborted" and "of 20 s" in end["reason"]
    text = (tmp_path / "u.spec").read_text()
    assert "#C scan aborted at" in text and f"{word} by the user" in text


def test_histo_count_spec_scan_has_one_row_that_pymca_and_silx_read(spock, tmp_path):
    """histo_count's own SPEC scan was '#N 0' with an empty '#L': PyMca's specfile failed on it
    ('cannot get lines for scan') and silx read no data. It has one row: the time counted, the
    device's counters and each histogram's total, the same numbers as in NeXus and JSON lines."""
    h = tango.DeviceProxy(spock.site.url("livehist/histogrammer/1"))
    spock.run("histo_count", "0.5")
    names = [s["name"] for s in json.loads(h.HistogramConfig)]
    expected = ["acquisition_time_s", "events", "messages", "bad_messages", "dropped_messages", "pulses",
                *(f"{n}_total" for n in names)]  # fmt: skip
    scan = specfile.Specfile(str(tmp_path / "u.spec"))[0]
    assert scan.command() == "histo_count 0.5" and scan.alllabels() == expected
    assert scan.lines() == 1 and scan.data().shape == (len(expected), 1)
    row = dict(zip(expected, scan.data()[:, 0].tolist(), strict=True))
    silx = SpecFile(str(tmp_path / "u.spec"))[0]
    assert silx.labels == expected and silx.data[:, 0].tolist() == list(row.values())
    with h5py.File(tmp_path / "u.nxs", "r") as f:
        e = f[next(iter(f))]
        assert row["events"] == e["livehist/tof/events"][()] == h.EventCount > 0
        assert row["acquisition_time_s"] == e["livehist/tof/acquisition_time"][()]
        for n in names:
            assert row[f"{n}_total"] == e[f"{n}/data"][()].sum() == h.read_attribute(n).value.sum()
    records = [json.loads(line) for line in (tmp_path / "u.jsonl").read_text().splitlines()]
    totals = {r["name"]: np.sum(r["counts"]) for r in records if r["record"] == "histogram"}
    assert totals == {n: row[f"{n}_total"] for n in names}


def test_histo_count_refuses_a_file_it_cannot_record_before_counting(spock, tmp_path):
    """A foreign file in ScanFile (here a user's text file named u.spec) was found only when the
    count was recorded: `histo_count 5` cleared the last count, counted 5 s, then said
    'histograms not recorded'. Each file is tried before the device is touched."""
    h = tango.DeviceProxy(spock.site.url("livehist/histogrammer/1"))
    spock.env(ScanFile=["other.jsonl"])
    spock.run("histo_count", "0.2")
    counted = h.EventCount
    foreign = tmp_path / "u.spec"
    foreign.write_text("my notes, not SPEC\n")
    spock.env(ScanFile=["u.nxs", "u.spec", "u.jsonl"])
    t0 = time.monotonic()
    with pytest.raises(LivehistError) as exc:
        spock.run("histo_count", "5")
    assert time.monotonic() - t0 < 4 and h.EventCount == counted  # at once; the last count kept
    assert "is not a SPEC file" in str(exc.value) and "nothing was counted" in str(exc.value), exc.value
    assert foreign.read_text() == "my notes, not SPEC\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.jsonl", "u.spec"]  # nothing left behind
