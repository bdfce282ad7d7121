"""MetadataManager with a real Tango DB and server: persistence, concurrency, events, bad input."""

from __future__ import annotations

import contextlib
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


def test_up_restarts_a_server_that_dies_while_up_waits_for_it(site):
    """A server alive but not answering when `up` looks (here a stand-in process under its pid
    record; in real life one killed a moment before and not yet gone, or still starting) is
    started again when it exits, not reported as failed. (A SIGSTOPped server, which stood in
    before, is now named at once as stopped: see test_site_faults.)"""
    m = proxy(site)
    m.SampleName = "kept-through-the-restart"
    record = Managed(site.state_dir, "MetadataManager-meta")
    old = record.pid()
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while record.pid() is not None:
        assert time.monotonic() < deadline, "the killed server did not go"
        time.sleep(0.05)
    stand_in = record.start([sys.executable, "-c", "import time; time.sleep(120)"])
    said: list[str] = []

    def say(line: str) -> None:
        said.append(line)
        if "alive but does not answer" in line:  # `up` has looked: now it dies
            os.kill(stand_in, signal.SIGKILL)

    try:
        control.up(site.tango_host, site.config_path, site.state_dir, say=say)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stand_in, signal.SIGKILL)
    assert any("alive but does not answer" in line for line in said), said
    assert any("the process found running had exited" in line for line in said), said
    assert record.pid() not in (None, old, stand_in)
    assert proxy(site).SampleName == "kept-through-the-restart"


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

        def metadata_has_it() -> bool:
            return any(md.get("title") == "edited elsewhere" for md in meta_seen)

        # two events, each on its own way to us: either may come first
        while not ("edited elsewhere" in seen and metadata_has_it()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "edited elsewhere" in seen
        assert metadata_has_it(), meta_seen
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


# --- issue 14 -----------------------------------------------------------------------------
ALPHA = "α-Fe2O3 – 5 K"


def test_any_unicode_round_trips_and_string_attributes_never_fail(site):
    m = proxy(site)
    seen: list = []
    sub = m.subscribe_event("SampleName", tango.EventType.CHANGE_EVENT,
                            lambda ev: seen.append(ev.err or ev.attr_value.value))  # fmt: skip
    try:
        m.SetMetadata(json.dumps({"sample": {"name": ALPHA}, "title": "q in Å⁻¹ at 4 °C",
                                  "users": [{"name": "Antonín Dvořák", "role": "PI"}, "Łukasz"]}))  # fmt: skip
        md = json.loads(m.GetMetadata())
        assert md["sample"]["name"] == ALPHA and md["title"] == "q in Å⁻¹ at 4 °C"
        assert [u["name"] for u in md["users"]] == ["Antonín Dvořák", "Łukasz"]
        # string attributes: Latin-1 as is, anything else as \u escapes (lossless)
        assert m.SampleName == "\\u03b1-Fe2O3 \\u2013 5 K" and m.Title == "q in Å\\u207b¹ at 4 °C"
        assert list(m.Users) == ["Anton\u00edn Dvo\\u0159\u00e1k (PI)", "\\u0141ukasz"]
        assert json.loads(m.Metadata)["sample"]["name"] == ALPHA
        assert json.loads(m.AuditTrail)[-1]["new"] in (ALPHA, "q in Å⁻¹ at 4 °C", md["users"])
        # the same escapes are accepted on write, and \N{...} names too
        m.SampleName = "\\N{GREEK SMALL LETTER BETA}-Ga2O3"
        m.Users = ["Dvo\\u0159\u00e1k (PI)"]
        md = json.loads(m.GetMetadata())
        assert md["sample"]["name"] == "β-Ga2O3" and md["users"] == [{"name": "Dvořák", "role": "PI"}]
        with pytest.raises(tango.DevFailed) as exc:
            m.SampleName = "\\N{NO SUCH LETTER}"
        assert "not a Unicode character name" in desc(exc)
        deadline = time.monotonic() + 10
        while "\\u03b2-Ga2O3" not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "\\u03b2-Ga2O3" in seen and not any(isinstance(v, bool) and v for v in seen)  # no error events
        assert m.state() == tango.DevState.ON
    finally:
        m.unsubscribe_event(sub)


def test_errors_keep_their_text_and_a_failing_command_changes_nothing(site):
    m = proxy(site)
    m.SetMetadata('{"proposal": "20261234", "sample": {"temperature": 10.0}}')
    before = m.GetMetadata()
    cases = [
        ('{"sample": {"temperature": "5 µK"}}', "got '5 µK'"),  # µ arrives as µ, not Âµ
        (json.dumps({"sample": {"temperature": "5 αK"}}), "got '5 \\u03b1K'"),
        ('{"sample": {"temperature": 1e999}}', "finite number of kelvin >= 0, got inf"),
        ('{"sample": {"temperature": -5}}', "finite number of kelvin >= 0, got -5"),
        ('{"x": Infinity}', "Infinity is not JSON"),
    ]
    for update, message in cases:
        with pytest.raises(tango.DevFailed) as exc:
            m.SetMetadata(update)
        assert message in desc(exc), desc(exc)
    assert m.GetMetadata() == before
    json.loads(before, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))


def test_attribute_names_as_keys_set_the_real_key_never_a_shadow(site):
    m = proxy(site)
    m.SetMetadata('{"Proposal": "20260001", "SampleName": "weld-08", "Title": "mapped"}')
    md = json.loads(m.GetMetadata())
    assert m.Proposal == "20260001" and md["sample"]["name"] == "weld-08" and md["title"] == "mapped"
    assert not {"Proposal", "SampleName", "Title"} & set(md)
    m.SetMetadata('{"beam_mm": 5}')
    with pytest.raises(tango.DevFailed) as exc:
        m.SetMetadata('{"Beam_mm": 6}')
    assert "did you mean 'beam_mm'?" in desc(exc)


def test_audit_trail_and_stored_property_stay_bounded(site):
    m = proxy(site)
    for i in range(40):  # 40 changes of a 28 KB value
        m.SetMetadata(json.dumps({"big": [str(i)] + ["x" * 4000] * 7}))
    trail = m.AuditTrail
    stored = tango.Database(*site.host_port).get_device_property(DEV, "StoredMetadata")["StoredMetadata"]
    assert len(trail) <= 32_000 and json.loads(trail)[-1]["new"].startswith('["39", "xxx')
    assert sum(len(s) for s in stored) < 100_000  # 60 KB metadata bound + 32 KB audit bound
    m.SetMetadata('{"big": null}')


def test_a_closed_dataset_name_is_refused_and_its_summary_kept(site):
    m = proxy(site)
    m.Proposal = "20261234"
    m.StartDataset("run_7")
    first = m.EndDataset()
    text = open(first).read()
    with pytest.raises(tango.DevFailed) as exc:
        m.StartDataset("run_7")
    assert "already recorded and closed" in desc(exc) and "'run_7_2'" in desc(exc)
    assert open(first).read() == text and m.state() == tango.DevState.ON


def test_writing_users_back_as_read_keeps_emails_and_orcids(site):
    """A panel or script that adds a user through the Users attribute (read, append, write)
    wiped the email, ORCID and affiliation of every user already there."""
    m = proxy(site)
    jane = {"name": "Jane Doe", "role": "PI", "email": "jane@lab.org", "orcid": "0000-0002-1825-0097"}
    m.SetMetadata(json.dumps({"users": [jane, {"name": "Li Wei", "affiliation": "ILL"}]}))
    m.Users = [*m.Users, "Ada Li (student)"]
    assert json.loads(m.GetMetadata())["users"] == [
        jane, {"name": "Li Wei", "affiliation": "ILL"}, {"name": "Ada Li", "role": "student"}]  # fmt: skip
    assert list(m.Users) == ["Jane Doe (PI)", "Li Wei", "Ada Li (student)"]


def test_a_broken_stored_metadata_is_named_and_kept_and_a_newer_one_is_read(site):
    """A StoredMetadata cut short or edited by hand left the device with 'cannot start: Expecting
    ',' delimiter...' (no word of which property), or, with one from a newer version (a field more
    in an audit entry), made Init fail with a Python TypeError; a sample that was not an object made
    every later SetMetadata fail with AttributeError. It is FAULT naming StoredMetadata, nothing is
    overwritten, and a newer one is read with its unknown keys kept."""
    m = proxy(site)
    m.Proposal = "20261234"
    m.SampleName = "weld-09"
    db = tango.Database(*site.host_port)

    def stored() -> list[str]:
        return list(db.get_device_property(DEV, "StoredMetadata")["StoredMetadata"])

    good = stored()
    cases = [
        (good[0][: len(good[0]) // 2], "StoredMetadata is not JSON"),
        ('{"metadata": {"proposal": "20261234", "sample": "Si"}}', "metadata.sample is 'Si', not an object"),
        ('{"metadata": {"proposal": 20261234}}', "metadata.proposal is 20261234, not a string"),
        ('{"metadata": {}, "dataset": "run_7"}', "dataset is 'run_7', not an object with name"),
        ("[1, 2]", "a JSON list, not an object"),
    ]
    try:
        for text, said in cases:
            db.put_device_property(DEV, {"StoredMetadata": [text]})
            m.Init()
            assert m.state() == tango.DevState.FAULT, (text, m.status())
            assert said in m.status() and "StoredMetadata" in m.status(), m.status()
            with pytest.raises(tango.DevFailed):
                m.SetMetadata('{"title": "not taken"}')
            assert stored() == [text]  # nothing overwritten: the value can still be repaired
        newer = json.loads(good[0])
        newer["format"] = 2
        newer["audit"][-1]["signature"] = "sha256:..."
        db.put_device_property(DEV, {"StoredMetadata": [json.dumps(newer)]})
        m.Init()
        assert m.state() == tango.DevState.ON, m.status()
        assert (m.Proposal, m.SampleName) == ("20261234", "weld-09")
        m.Title = "written by the older version"
        assert json.loads(stored()[0])["format"] == 2  # a newer version's key is not lost
    finally:
        db.put_device_property(DEV, {"StoredMetadata": good})
        m.Init()
    assert m.state() == tango.DevState.ON and m.SampleName == "weld-09"


@pytest.mark.parametrize(
    "prop, value, said",
    [
        ("DataMode", "rwxrwsr-x", "DataMode 'rwxrwsr-x' is not an octal mode of folders such as 2775"),
        ("DataMode", "77777", "DataMode '77777' is not an octal mode"),
        ("AuditLength", "-1", "AuditLength -1 must be at least 1"),
    ],
)
def test_an_unusable_property_is_named_in_the_status(site, prop, value, said):
    """DataMode 'rwxrwsr-x' left the device FAULT with "invalid literal for int() with base 8:
    'rwxrwsr-x'", naming no property; AuditLength -1 with 'maxlen must be non-negative'."""
    m = proxy(site)
    m.Proposal = "20261234"
    db = tango.Database(*site.host_port)
    before = list(db.get_device_property(DEV, prop)[prop])
    try:
        db.put_device_property(DEV, {prop: [value]})
        m.Init()
        assert m.state() == tango.DevState.FAULT and said in m.status(), m.status()
    finally:
        if before:
            db.put_device_property(DEV, {prop: before})
        else:
            db.delete_device_property(DEV, prop)
        m.Init()
    assert m.state() == tango.DevState.ON and m.Proposal == "20261234"
