"""MetadataManager with a real Tango DB and server: persistence, concurrency, events, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import tango

from livehist.site import control
from livehist.site.process import Managed

DEV = "test/metadata/1"


@pytest.fixture(scope="module")
def site(sites, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    config = {"servers": {"MetadataManager": {"meta": {"MetadataManager": {DEV: {"properties": {
        "DefaultDataRoot": [str(root)], "ProposalPattern": ["^[0-9]{8}$"], "AuditLength": ["50"]}}}}}}}  # fmt: skip
    return sites.up(config)


def proxy(site) -> tango.DeviceProxy:
    p = tango.DeviceProxy(site.url(DEV))
    p.set_timeout_millis(10_000)
    return p


def desc(exc) -> str:
    return exc.value.args[0].desc


def test_metadata_survives_a_server_kill_and_restart(site):
    m = proxy(site)
    m.Proposal = "20261234"
    m.Title = "Residual stress in welds"
    m.SampleName = "weld-07"
    m.Users = ["Jane Doe (PI)", "Li Wei"]
    m.SetMetadata(json.dumps({"sample": {"temperature": 10.5}, "beam_size_mm": [5, 10]}))
    assert m.state() == tango.DevState.ON
    pid = Managed(site.state_dir, "MetadataManager-meta").pid()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while control.ping(site.url(DEV), 500) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    control.up(site.tango_host, site.config_path, site.state_dir, say=lambda s: None)
    m = proxy(site)
    assert m.state() == tango.DevState.ON
    assert (m.Proposal, m.Title, m.SampleName) == ("20261234", "Residual stress in welds", "weld-07")
    assert list(m.Users) == ["Jane Doe (PI)", "Li Wei"]
    md = json.loads(m.GetMetadata())
    assert md["sample"]["temperature"] == 10.5 and md["beam_size_mm"] == [5, 10]
    trail = json.loads(m.AuditTrail)
    assert any(c["key"] == "title" and c["new"] == "Residual stress in welds" for c in trail)
    assert trail[-1]["client"] not in ("", "local")  # the writer's address is recorded
    schema = json.loads(m.MetadataSchema)
    assert schema["properties"]["proposal"]["pattern"] == "^[0-9]{8}$"


WRITER = """
import json, sys, tango
p = tango.DeviceProxy(sys.argv[1])
for i in range(20):
    p.SetMetadata(json.dumps({f"writer{sys.argv[2]}_{i}": i, "last_writer": sys.argv[2]}))
"""


def test_concurrent_writers_from_several_processes_lose_no_key(site):
    env = dict(os.environ, TANGO_HOST=site.tango_host)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, DEV, str(k)], env=env) for k in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    md = json.loads(proxy(site).GetMetadata())
    assert {f"writer{k}_{i}" for k in range(4) for i in range(20)} <= set(md)
    assert md["last_writer"] in {"0", "1", "2", "3"}
    proxy(site).SetMetadata(json.dumps({f"writer{k}_{i}": None for k in range(4) for i in range(20)}))
    assert not any(k.startswith("writer") for k in json.loads(proxy(site).GetMetadata()))  # null removes


def test_change_events_follow_edits_by_another_client(site):
    m = proxy(site)
    seen: list[str] = []
    sub = m.subscribe_event("Title", tango.EventType.CHANGE_EVENT,
                            lambda ev: seen.append(ev.attr_value.value) if not ev.err else None)  # fmt: skip
    meta_seen: list[dict] = []
    sub2 = m.subscribe_event("Metadata", tango.EventType.CHANGE_EVENT,
                             lambda ev: meta_seen.append(json.loads(ev.attr_value.value)) if not ev.err else None)  # fmt: skip
    try:
        other = proxy(site)  # a second client
        other.Title = "edited elsewhere"
        deadline = time.monotonic() + 10
        while "edited elsewhere" not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "edited elsewhere" in seen
        assert any(md.get("title") == "edited elsewhere" for md in meta_seen)
    finally:
        m.unsubscribe_event(sub)
        m.unsubscribe_event(sub2)


def test_bad_input_is_refused_and_nothing_changes(site):
    m = proxy(site)
    m.Proposal = "20261234"
    before = m.GetMetadata()
    cases = [
        (lambda: setattr(m, "Proposal", "../etc/passwd"), "does not match the pattern '^[0-9]{8}$'"),
        (lambda: m.SetMetadata('{"sample": {"temperature": "warm"}}'), "sample.temperature must be a number"),
        (lambda: m.SetMetadata('{"users": [{"name": "A", "password": "x"}]}'), "users[0].password is not a user field"),
        (lambda: m.SetMetadata("{oops"), "not valid JSON"),
        (lambda: setattr(m, "Title", "x" * 5000), "over the limit of 4096"),
        (lambda: m.StartDataset("../escape"), "is not allowed"),
        (lambda: m.StartDataset("a/b"), "is not allowed"),
        (lambda: m.EndDataset(), "no dataset is open"),
    ]  # fmt: skip
    for action, message in cases:
        with pytest.raises(tango.DevFailed) as exc:
            action()
        assert message in desc(exc), desc(exc)
        assert m.state() == tango.DevState.ON
    assert m.GetMetadata() == before


def test_dataset_life_cycle_through_the_device(site):
    m = proxy(site)
    m.Proposal = "20261234"
    m.Instrument = "SANS2D"
    folder = m.StartDataset("sample_scan_1")
    assert m.state() == tango.DevState.RUNNING and m.DataFolder == folder and m.DatasetName == "sample_scan_1"
    assert os.path.isdir(folder) and folder.endswith("/20261234/sample_scan_1")
    assert json.loads(m.Metadata)["dataset"]["name"] == "sample_scan_1"
    with pytest.raises(tango.DevFailed) as exc:
        m.StartDataset("another")
    assert "EndDataset first" in desc(exc)
    with open(os.path.join(folder, "scan.spec"), "w") as f:
        f.write("#F scan.spec\n")
    summary = json.loads(open(m.EndDataset()).read())
    assert summary["dataset"] == "sample_scan_1" and summary["metadata"]["instrument"] == "SANS2D"
    assert [f["path"] for f in summary["files"]] == ["scan.spec"]
    assert m.state() == tango.DevState.ON and m.DataFolder == ""
