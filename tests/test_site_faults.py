"""`livehist up / down / status` against what a crash, a full disk or an odd invocation leaves
behind, with a real embedded database and real device servers."""

from __future__ import annotations

import json
import os
import resource
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from livehist.site.process import managed_processes
from tests.conftest import run_cli

MM = {"servers": {"MetadataManager": {"sf": {"MetadataManager": {
    "test/sitefault/m": {"properties": {"DefaultDataRoot": ["/tmp"]}}}}}}}  # fmt: skip


def _up(state, host, cfg, *extra, **kw) -> subprocess.CompletedProcess:
    return run_cli("up", "--tango-host", host, "--config", str(cfg), "--state-dir", str(state), *extra, **kw)


def _limited_cli(limit: int, *args: str) -> subprocess.CompletedProcess:
    """`livehist ARGS` whose files (and its children's) cannot grow past `limit` bytes: a full disk
    that works unprivileged (Python ignores SIGXFSZ, so a write past it fails with EFBIG)."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "livehist.cli", *args],
        capture_output=True, text=True, timeout=180, preexec_fn=cap,
    )  # fmt: skip


def test_a_database_file_half_made_by_a_failed_start_does_not_block_up_for_good(sites):
    """A first `up` on a full disk left a sqlite file with some tables and no devices; every later
    `up` failed with 'device dserver/databaseds/2 not defined in the database' (and a 0-byte file
    with 'no such table: device'), after the space was freed too."""
    from tango.databaseds.db_access.sqlite3 import get_create_db_statements

    state, host, cfg = sites.new(MM)
    out = _limited_cli(64 * 1024, "up", "--tango-host", host, "--config", str(cfg), "--state-dir", str(state))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr.split("error:", 1)[0]
    assert not [p.name for p in managed_processes(state) if p.pid()], "a process survived the failed up"
    out = _up(state, host, cfg)  # the space is back
    assert out.returncode == 0, out.stdout + out.stderr
    assert "test/sitefault/m" in out.stdout and " STANDBY " in out.stdout, out.stdout
    assert run_cli("down", "--state-dir", str(state)).returncode == 0

    # what a crash during the creation leaves: some tables, no rows; and an empty file
    for partial in (get_create_db_statements()[:4], []):
        db = state / "tango_database.sqlite"
        db.unlink()
        with sqlite3.connect(db) as conn:
            for statement in partial:
                conn.execute(statement)
        out = _up(state, host, cfg)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"replaced {db}: an incomplete database file" in out.stdout, out.stdout
        assert " STANDBY " in out.stdout, out.stdout
        assert run_cli("down", "--state-dir", str(state)).returncode == 0


def test_a_full_disk_at_the_first_up_is_named_and_leaves_no_half_made_database(sites):
    state, host, cfg = sites.new(MM)
    out = _limited_cli(64 * 1024, "up", "--tango-host", host, "--config", str(cfg), "--state-dir", str(state))
    assert out.returncode == 1, out.stdout + out.stderr
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:"))
    assert f"cannot create the embedded Tango database file {state / 'tango_database.sqlite'}" in line, line
    assert "--state-dir" in line, line
    assert not (state / "tango_database.sqlite").exists() and not list(state.glob("*.new"))
    assert managed_processes(state) == []


def test_a_damaged_database_file_is_named_with_the_fix_and_kept(sites):
    state, host, cfg = sites.new(MM)
    assert _up(state, host, cfg).returncode == 0
    assert run_cli("down", "--state-dir", str(state)).returncode == 0
    db = state / "tango_database.sqlite"
    db.write_bytes(db.read_bytes()[:5000])  # torn: the header promises pages that are not there
    kept = db.read_bytes()
    out = _up(state, host, cfg)
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:"))
    assert out.returncode == 1 and f"the embedded Tango database file {db} is damaged" in line, line
    assert "move it away" in line and "livehist up" in line, line
    assert db.read_bytes() == kept  # the user's file, kept for whatever can be saved from it
    assert managed_processes(state) == []
    assert json.loads((state / "state.json").read_text())["tango_host"] == host
    assert os.path.isdir(state)


def test_relative_config_and_state_dir_still_work_from_another_folder(sites, tmp_path):
    """`up --config c.json --state-dir st` stored the relative paths: `status` from any other
    folder failed with 'cannot read config c.json', and the servers' DefaultDataRoot and
    Sardana's environment ($LIVEHIST_STATE_DIR) were folders relative to wherever `up` ran."""
    import tango

    _, host, _ = sites.new()
    work = tmp_path / "work"
    work.mkdir()
    state = work / "st"
    sites.dirs.append(state)  # downed at teardown whatever happens here
    config = {"servers": {"MetadataManager": {"rel": {"MetadataManager": {
        "test/relative/m": {"properties": {"DefaultDataRoot": ["$LIVEHIST_STATE_DIR/data"]}}}}}}}  # fmt: skip
    (work / "c.json").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k != "TANGO_HOST"}
    argv = [sys.executable, "-m", "livehist.cli"]
    out = subprocess.run([*argv, "up", "--tango-host", host, "--config", "c.json", "--state-dir", "st"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    status = subprocess.run([*argv, "status", "--state-dir", str(state)], cwd="/", env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert status.returncode == 0, status.stdout + status.stderr
    assert "test/relative/m" in status.stdout, status.stdout
    db = tango.Database(*host.split(":"))
    root = list(db.get_device_property("test/relative/m", "DefaultDataRoot")["DefaultDataRoot"])
    assert root == [f"{state}/data"], root
    down = subprocess.run([*argv, "down", "--state-dir", "st"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert down.returncode == 0 and "stopped tango-db" in down.stdout, down.stdout + down.stderr
    assert managed_processes(state) == []


def test_up_twice_with_non_latin1_properties_and_devices_without_alias_changes_nothing(sites):
    """The second `up` said 'configuration ...: 2 database changes' and rewrote the property (and
    'deleted' alias '') every time: dsconfig compared a Latin-1 reading of the UTF-8 value."""
    from livehist.site import control

    config = {"servers": {
        "MetadataManager": {"uni": {"MetadataManager": {
            "test/unicode/m": {"properties": {"DefaultDataRoot": ["/tmp/daten ☃ müller"]}}}}},
        "EventHistogrammer": {"uni": {"EventHistogrammer": {
            "test/unicode/h": {"properties": {"EventSource": ["sim://?rate=1e3"]}}}}}}}  # fmt: skip
    state, host, cfg = sites.new(config)
    first: list[str] = []
    site = control.up(host, cfg, state, timeout=60, say=first.append)
    assert any("database changes" in ln for ln in first), first
    for _ in range(2):
        again: list[str] = []
        control.up(host, cfg, state, timeout=60, say=again.append)
        assert f"configuration {cfg}: database already up to date" in again, again
    import tango

    db = tango.Database(*site.host_port)
    value = list(db.get_device_property("test/unicode/m", "DefaultDataRoot")["DefaultDataRoot"])
    assert value == ["/tmp/daten ☃ müller"], value


def test_up_names_each_property_edited_in_the_database_that_it_sets_back_from_the_config(sites):
    """A property changed in Jive (EventSource pointed at the real detector) was silently put back
    to the config's value by the next `up`: the device counted the simulator again."""
    import tango

    from livehist.site import control

    config = {"servers": {
        "MetadataManager": {"jive": {"MetadataManager": {
            "test/jive/m": {"properties": {"DefaultDataRoot": ["/tmp/daten ☃"]}}}}},
        "EventHistogrammer": {"jive": {"EventHistogrammer": {
            "test/jive/h": {"properties": {"EventSource": ["sim://?rate=1e3"], "PublishPeriod": ["0.5"]}}}}}}}  # fmt: skip
    state, host, cfg = sites.new(config)
    site = control.up(host, cfg, state, timeout=60, say=lambda s: None)
    db = tango.Database(*site.host_port)
    db.put_device_property("test/jive/h", {"EventSource": ["zmq://detector:5555"]})  # as Jive does
    db.put_device_property("test/jive/m", {"DefaultDataRoot": ["/data/ünï"]})
    said: list[str] = []
    control.up(host, cfg, state, timeout=60, say=said.append)
    lines = [ln for ln in said if "is set back to" in ln]
    assert len(lines) == 2, said
    h = next(ln for ln in lines if ln.startswith("test/jive/h property EventSource:"))
    assert "'zmq://detector:5555' in the database" in h and "'sim://?rate=1e3' from" in h, h
    assert str(cfg) in h and "put it in that file" in h, h
    m = next(ln for ln in lines if ln.startswith("test/jive/m property DefaultDataRoot:"))
    assert "'/data/ünï'" in m and "'/tmp/daten ☃'" in m, m
    assert list(db.get_device_property("test/jive/h", "EventSource")["EventSource"]) == ["sim://?rate=1e3"]
    again: list[str] = []
    control.up(host, cfg, state, timeout=60, say=again.append)  # nothing edited since: nothing said
    assert (
        not [ln for ln in again if "set back" in ln]
        and f"configuration {cfg}: database already up to date" in again
    )


def test_up_refuses_to_take_devices_and_aliases_of_others_and_names_tango_cannot_carry(sites):
    """A config naming a device of another server in the database (here the database's own
    sys/tg_test/1) moved it into ours without a word; an alias held by another device was taken
    from it; one alias on two devices ended in a traceback (DevFailed from DbPutDeviceAlias); a
    device name with a non-ASCII letter was written into the database and its server aborted."""
    import tango

    site = sites.up(MM)
    host = site.tango_host
    db = tango.Database(*site.host_port)
    db.put_device_alias("test/sitefault/m", "sf_meta")

    def refused(config: dict) -> str:
        cfg = site.state_dir / "hostile.json"
        cfg.write_text(json.dumps(config))
        before = sorted(db.get_server_list("*"))
        out = _up(site.state_dir, host, cfg, "--timeout", "20")
        assert out.returncode == 1, out.stdout + out.stderr
        assert "Traceback" not in out.stderr, out.stderr
        assert sorted(db.get_server_list("*")) == before  # nothing was written
        return next(ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:"))

    line = refused({"servers": {"MetadataManager": {"thief": {"MetadataManager": {"sys/tg_test/1": {}}}}}})
    assert "device sys/tg_test/1 is already in the Tango database" in line and "TangoTest/test" in line, line
    assert "does not take devices from other servers" in line, line
    assert db.get_device_info("sys/tg_test/1").ds_full_name == "TangoTest/test"

    line = refused({"servers": {"MetadataManager": {"thief": {"MetadataManager": {
        "test/thief/m": {"alias": "SF_META"}}}}}})  # fmt: skip
    assert "alias 'sf_meta' of test/thief/m is already the alias of test/sitefault/m" in line.lower(), line
    assert db.get_device_from_alias("sf_meta") == "test/sitefault/m"

    line = refused({"servers": {"MetadataManager": {"thief": {"MetadataManager": {
        "test/thief/a": {"alias": "twice"}, "test/thief/b": {"alias": "Twice"}}}}}})  # fmt: skip
    assert "alias 'Twice' is given to two devices, test/thief/a and test/thief/b" in line, line

    line = refused({"servers": {"MetadataManager": {"thief": {"MetadataManager": {"test/ğüx/m": {}}}}}})
    assert "device name 'test/ğüx/m' has characters Tango names cannot carry (üğ)" in line, line

    out = _up(site.state_dir, host, site.config_path)  # and the site itself still comes up
    assert out.returncode == 0 and "test/sitefault/m" in out.stdout, out.stdout + out.stderr


def test_a_frozen_server_is_named_by_status_and_up_instead_of_waiting_out_the_timeout(sites):
    """A SIGSTOPped server: `status` called its devices DOWN with nothing more, and `up` waited the
    whole --timeout (90 s by default, and then some) to say the device 'did not answer'."""
    import signal
    import time

    from livehist.site.process import Managed

    site = sites.up(MM)
    server = Managed(site.state_dir, "MetadataManager-sf")
    pid = server.pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = run_cli("status", "--state-dir", str(site.state_dir), timeout=120)
        assert r.returncode == 3, r.stdout + r.stderr
        row = next(ln for ln in r.stdout.splitlines() if ln.startswith("test/sitefault/m"))
        assert row.split()[3] == "DOWN" and f"server process {pid} is stopped" in row, row
        assert f"kill -CONT {pid}" in row, row
        assert time.monotonic() - t0 < 60
        t0 = time.monotonic()
        out = _up(site.state_dir, site.tango_host, site.config_path, timeout=240)
        took = time.monotonic() - t0
        line = next(ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:"))
        assert out.returncode == 1 and f"server MetadataManager/sf (pid {pid}) is stopped" in line, line
        assert f"kill -CONT {pid}" in line and "livehist down" in line, line
        assert took < 30, took  # not the 90 s timeout
        assert server.pid() == pid  # left as it was: the user decides
    finally:
        os.kill(pid, signal.SIGCONT)
    out = _up(site.state_dir, site.tango_host, site.config_path)
    assert out.returncode == 0 and "MetadataManager/sf: already running" in out.stdout, (
        out.stdout + out.stderr
    )


def test_a_server_frozen_while_up_waits_for_it_is_named_within_seconds(tmp_path):
    import signal
    import time

    from livehist.site.process import Managed, free_port

    state = tmp_path / "state"
    cfg = tmp_path / "c.json"
    cfg.write_text(
        json.dumps({"servers": {"EventHistogrammer": {"fz": {"EventHistogrammer": {"test/fz/h": {}}}}}})
    )
    env = {k: v for k, v in os.environ.items() if k != "TANGO_HOST"}
    argv = [sys.executable, "-m", "livehist.cli", "up", "--config", str(cfg), "--state-dir", str(state),
            "--tango-host", f"127.0.0.1:{free_port()}"]  # fmt: skip
    up = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    pid = None
    try:
        seen = []
        for line in up.stdout:
            seen.append(line)
            if line.startswith("EventHistogrammer/fz: started"):
                pid = Managed(state, "EventHistogrammer-fz").pid()
                os.kill(pid, signal.SIGSTOP)
                t0 = time.monotonic()
                break
        out = "".join(seen) + up.communicate(timeout=120)[0]
        took = time.monotonic() - t0
    finally:
        if up.poll() is None:
            up.kill()
        if pid:
            os.kill(pid, signal.SIGCONT)
        run_cli("down", "--state-dir", str(state))
    assert up.returncode == 1, out
    assert f"server EventHistogrammer/fz (pid {pid}) is stopped" in out and f"kill -CONT {pid}" in out, out
    assert took < 30, took  # the 90 s --timeout was waited out before
    assert managed_processes(state) == []


def test_a_frozen_embedded_database_is_called_ours_and_frozen_not_a_stranger(sites):
    """Its own SIGSTOPped database: `status` and `up` called the port 'taken by a program that is
    not a Tango database' and sent the user to another port (which `up` then refused)."""
    import signal

    from livehist.site.process import Managed

    site = sites.up(MM)
    db = Managed(site.state_dir, "tango-db")
    pid = db.pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        r = run_cli("status", "--state-dir", str(site.state_dir), timeout=120)
        assert r.returncode == 1, r.stdout + r.stderr
        assert (
            f"the embedded Tango database of {site.state_dir} (pid {pid}, at {site.tango_host}) is stopped"
            in (r.stdout)
        ), r.stdout
        assert f"kill -CONT {pid}" in r.stdout and "not a Tango database" not in r.stdout, r.stdout
        out = _up(site.state_dir, site.tango_host, site.config_path, timeout=120)
        assert out.returncode == 1 and f"kill -CONT {pid}" in out.stderr, out.stdout + out.stderr
        assert "not a Tango database" not in out.stderr and "another port" not in out.stderr, out.stderr
        assert db.pid() == pid
    finally:
        os.kill(pid, signal.SIGCONT)
    assert run_cli("status", "--state-dir", str(site.state_dir)).returncode == 0


def test_a_torn_state_file_does_not_start_a_second_database_on_the_same_file(sites):
    """state.json cut short (a full disk, a crash while writing it): `up` lost where the state
    dir's embedded database runs, started a second one on the same sqlite file at TANGO_HOST and
    overwrote the first one's record, so `down` could no longer stop it; `status` looked at
    TANGO_HOST (or 10000) and called a running site down; a state.json holding a list was a
    traceback."""
    from livehist.site.process import Managed, free_port

    site = sites.up(MM)
    db = Managed(site.state_dir, "tango-db")
    pid = db.pid()
    state_file = site.state_dir / "state.json"
    other = f"127.0.0.1:{free_port()}"
    for torn in ('{"tango_host": "127.0.0.1:5', "[1]", '{"tango_host": 5}'):
        state_file.write_text(torn)
        env = dict(os.environ, TANGO_HOST=other)
        out = run_cli("up", "--config", str(site.config_path), "--state-dir", str(site.state_dir), env=env)
        assert out.returncode == 1, out.stdout + out.stderr
        assert f"runs at {site.tango_host}, and this asks for {other}" in out.stderr, out.stderr
        assert db.pid() == pid and embedded_probe(other) == "closed"
        r = run_cli("status", "--state-dir", str(site.state_dir), "--config", str(site.config_path), env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"Tango database {site.tango_host} (embedded)" in r.stdout, r.stdout
    env = {k: v for k, v in os.environ.items() if k != "TANGO_HOST"}
    out = run_cli("up", "--config", str(site.config_path), "--state-dir", str(site.state_dir), env=env)
    assert out.returncode == 0 and f"Tango database at {site.tango_host}" in out.stdout, (
        out.stdout + out.stderr
    )
    assert db.pid() == pid
    assert json.loads(state_file.read_text())["tango_host"] == site.tango_host
    assert not list(site.state_dir.glob("state.json.*"))


def embedded_probe(host: str) -> str:
    from livehist.tangodb import embedded

    return embedded.probe(*embedded.parse_tango_host(host), timeout=1.0)


def test_a_bad_host_or_config_changes_nothing_and_names_the_fault(tmp_path):
    """A config with a non-UTF-8 byte or nested too deeply was a traceback; a malformed host or
    config left a new state dir with its lock file behind."""
    state = tmp_path / "state"
    binary = tmp_path / "binary.json"
    binary.write_bytes(b'{"servers": {"\xff": {}}}')
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    cases = [
        (["--tango-host", "127.0.0.1:70000"], "is not HOST:PORT"),
        (["--config", str(binary)], f"config {binary} is not UTF-8 text (byte 0xff at offset 14)"),
        (["--config", str(deep)], f"config {deep} is nested too deeply"),
        (["--config", str(tmp_path)], f"cannot read config {tmp_path}: Is a directory"),
    ]
    for args, message in cases:
        out = run_cli("up", "--state-dir", str(state), *args, env=dict(os.environ, TANGO_HOST="127.0.0.1:1"))
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        line = next(ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:"))
        assert message in line, line
        assert not state.exists(), list(state.rglob("*"))


def test_an_empty_state_dir_or_config_option_is_refused(tmp_path):
    """`--state-dir "$DIR"` with DIR unset meant the current folder: `up` filled it with a
    database, logs and pid files (in a checkout, say), and `down` looked there."""
    work = tmp_path / "work"
    work.mkdir()
    for command, option in (("up", "--state-dir"), ("down", "--state-dir"), ("status", "--state-dir"),
                            ("up", "--config")):  # fmt: skip
        host = [] if command == "down" else ["--tango-host", "no-such-host.invalid:1"]  # starts nothing
        argv = [sys.executable, "-m", "livehist.cli", command, option, "", *host]
        out = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stdout + out.stderr
        assert f"argument {option}: is empty" in out.stderr, out.stderr
    assert list(work.iterdir()) == []


def test_down_never_stops_a_process_that_took_over_a_recorded_pid(sites, tmp_path):
    """A record left by a crash (or from before a reboot) whose pid now belongs to another site's
    server of the same name: the command lines are equal, so `down` stopped that other server."""
    import signal
    import time

    from livehist.site.process import Managed

    site = sites.up(MM)
    ours = Managed(site.state_dir, "MetadataManager-sf")
    record = ours.record()
    os.kill(record["pid"], signal.SIGKILL)  # the crash: its record stays
    deadline = time.monotonic() + 30
    while ours.pid() is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    # another site's server, same command line (here a stand-in that just sleeps), given that pid
    other = Managed(tmp_path / "other-site", "MetadataManager-sf")
    stand_in = [sys.executable, "-c", "import time; time.sleep(120)", "sf"]
    pid = other.start(stand_in)
    try:
        ours.pidfile.write_text(json.dumps({**record, "pid": pid, "argv": stand_in}))
        assert ours.pid() is None, "a process started after the record is taken as ours"
        out = run_cli("down", "--state-dir", str(site.state_dir))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "stopped MetadataManager-sf" not in out.stdout, out.stdout
        assert other.pid() == pid, "down stopped another site's process"
    finally:
        other.stop(timeout=2)


def test_a_tango_host_name_that_does_not_resolve_is_called_a_name_problem(tmp_path):
    """It said 'does not answer (no route or timeout); check ... the network' for a typo in the
    name, and `status` sent the user to `livehist up`, which cannot start anything there."""
    state = tmp_path / "state"
    host = "no-such-host.invalid:12345"
    out = run_cli("up", "--tango-host", host, "--state-dir", str(state))
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:"))
    assert out.returncode == 1 and "the name 'no-such-host.invalid' does not resolve" in line, line
    r = run_cli("status", "--tango-host", host, "--state-dir", str(state))
    assert r.returncode == 1 and "the name 'no-such-host.invalid' does not resolve" in r.stdout, r.stdout
    assert "run `livehist up`" not in r.stdout
    assert managed_processes(state) == []


def test_a_state_dir_that_cannot_take_a_log_or_a_pid_record_leaves_no_process_behind(sites):
    """A full state dir: writing the server's log ended `up` in an OSError traceback; had the pid
    record failed instead, the server just started ran on with no record `down` could find."""
    import signal
    import time

    from livehist.site.process import Managed

    # an instance name of its own: the servers of the other tests' sites must not count below
    site = sites.up(
        {"servers": {"MetadataManager": {"logfull": {"MetadataManager": {"test/logfull/m": {}}}}}}
    )
    server = Managed(site.state_dir, "MetadataManager-logfull")
    os.kill(server.pid(), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while server.pid() is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    args = ["up", "--tango-host", site.tango_host, "--config", str(site.config_path), "--state-dir",
            str(site.state_dir)]  # fmt: skip
    with open(server.log, "ab") as log:  # a log past the file size limit: its next line cannot be written
        log.write(b"x" * 200_000)
    out = _limited_cli(150_000, *args)
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:"))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"cannot write {server.log}: File too large" in line and "--state-dir" in line, line
    assert server.pid() is None
    server.log.write_bytes(b"")

    server.pidfile.unlink(missing_ok=True)
    server.pidfile.mkdir()  # the record cannot be written there
    try:
        out = run_cli(*args)
        line = next(ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:"))
        assert out.returncode == 1 and f"cannot write {server.pidfile}" in line, out.stdout + out.stderr
        assert "MetadataManager-logfull was started and stopped again" in line, line
        left = [
            p
            for p in Path("/proc").glob("[0-9]*")
            if _cmdline(p).endswith("livehist.devices.metadata logfull")
        ]
        assert not left, "a server was left running without a record"
    finally:
        server.pidfile.rmdir()
    assert run_cli(*args).returncode == 0


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def test_a_port_bound_by_another_program_but_not_listening_is_named(sites):
    """A port another program holds without listening (or took between the probe and the start,
    as a second `up` on another state dir does) looked free: `up` said 'the embedded Tango database
    exited (code 0)' with a page of omniORB and traceback lines."""
    import socket

    state, host, cfg = sites.new(MM)
    port = int(host.rsplit(":", 1)[1])
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))  # bound, not listening: a connect is refused
    try:
        out = _up(state, host, cfg, "--timeout", "30")
    finally:
        holder.close()
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:"))
    assert out.returncode == 1 and f"port {port} on 127.0.0.1 is in use by another program" in line, line
    assert f"--tango-host 127.0.0.1:{port + 1}" in line, line
    assert "Traceback" not in out.stderr and managed_processes(state) == []
    # the loser of a port race kept the database file it had made for a database that never ran
    assert not (state / "tango_database.sqlite").exists(), sorted(p.name for p in state.iterdir())


def _without_port_privilege() -> list[str]:
    """The command prefix of a process that may not listen below 1024: this user if not root, else root
    without CAP_NET_BIND_SERVICE (setpriv), the real condition of an unprivileged user."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--inh-caps=-net_bind_service", "--bounding-set=-net_bind_service"]


def test_a_privileged_port_is_named_as_such_not_as_in_use(sites, tmp_path):
    """A port below 1024, for a user who may not listen there, was reported as 'in use by another
    program'; now `up` says it needs privileges and names a port >= 1024, before it makes anything."""
    import socket

    with socket.socket() as probe:
        port = next(p for p in range(999, 900, -1) if probe.connect_ex(("127.0.0.1", p)) != 0)
    state, _host, cfg = sites.new(MM)
    fresh = tmp_path / "new-state"
    out = subprocess.run(
        [*_without_port_privilege(), sys.executable, "-m", "livehist.cli", "up", "--tango-host",
         f"127.0.0.1:{port}", "--config", str(cfg), "--state-dir", str(fresh)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    [line] = [ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:")]
    assert f"port {port} on 127.0.0.1 is below 1024" in line and "needs privileges" in line, line
    assert "in use" not in line and "--tango-host 127.0.0.1:10000" in line, line
    assert not fresh.exists() and managed_processes(fresh) == []  # nothing made, nothing started


def test_demo_with_a_config_without_its_devices_is_refused_before_anything_starts(tmp_path):
    """`livehist demo --config site.json` (a site's own devices) started every server of it, then
    ended in a DevFailed traceback: the Door door/livehist/1 did not exist."""
    from livehist.site.process import free_port

    state, cfg = tmp_path / "state", tmp_path / "site.json"
    cfg.write_text(json.dumps(MM))
    out = run_cli("demo", "--tango-host", f"127.0.0.1:{free_port()}", "--config", str(cfg), "--state-dir",
                  str(state))  # fmt: skip
    try:
        line = next(ln for ln in out.stderr.splitlines() if ln.startswith("livehist demo: error:"))
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert (
            f"config {cfg} has no livehist/histogrammer/1, livehist/metadata/1, macroserver/livehist/1"
            in line
        )
        assert "door/livehist/1" in line and "without --config" in line, line
        assert not state.exists()  # nothing started
    finally:
        run_cli("down", "--state-dir", str(state))


def test_sigterm_during_up_stops_what_it_had_started(tmp_path):
    """`timeout 60 livehist up` (or a service manager giving up) sent SIGTERM: `up` died on the
    spot and left the database and the servers started so far running, without a word."""
    import signal

    from tests.test_cli_faults import interrupt_up

    interrupt_up(tmp_path, "term", signal.SIGTERM)


def _default_config() -> dict:
    from livehist.tangodb import DEFAULT_CONFIG

    return json.loads(DEFAULT_CONFIG.read_text())


def test_a_bad_sardana_section_is_named_before_starting_or_at_the_pool(sites, tmp_path):
    """The config's `livehist.sardana` section was not checked: a wrong type ended `up` in a
    TypeError traceback after every server had started; a measurement group with a channel the
    Pool does not have was 'created' (the Pool said nothing and made nothing) at every `up`, and
    scans then failed on an ActiveMntGrp that did not exist."""
    import tango

    state = tmp_path / "never"
    for change, message in (
        (lambda s: s.update(controllers="oops"), "livehist/sardana/controllers: 'oops' is not of type 'array'"),
        (lambda s: s.update(pool="pool/other/1"), "livehist/sardana/pool names 'pool/other/1', which is not a device"),
        (lambda s: s["measurement_groups"].update(mg_empty=[]), "livehist/sardana/measurement_groups/mg_empty"),
    ):  # fmt: skip
        config = _default_config()
        change(config["livehist"]["sardana"])
        cfg = tmp_path / "bad.json"
        cfg.write_text(json.dumps(config))
        out = run_cli(
            "up", "--tango-host", "no-such-host.invalid:1", "--config", str(cfg), "--state-dir", str(state)
        )
        line = next(ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:"))
        assert out.returncode == 1 and message in line, line
        assert not state.exists()

    config = _default_config()
    config["livehist"]["sardana"]["measurement_groups"]["mg_livehist"].append("nosuch_channel")
    state, host, cfg = sites.new(config)
    out = _up(state, host, cfg)
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:"))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "measurement group mg_livehist: Pool pool/livehist/1 has no channel 'nosuch_channel'" in line, line
    assert "lh_timer" in line and "livehist/sardana/measurement_groups" in line, line
    cfg.write_text(json.dumps(_default_config()))  # fixed
    out = _up(state, host, cfg)
    assert out.returncode == 0 and "Sardana: created measurement group mg_livehist" in out.stdout, out.stdout
    pool = tango.DeviceProxy(f"tango://{host}/pool/livehist/1")
    assert "mg_livehist" in {json.loads(v)["name"] for v in pool.MeasurementGroupList}
    out = _up(state, host, cfg)
    assert out.returncode == 0 and "Sardana: created" not in out.stdout, out.stdout


def test_a_database_file_locked_by_another_program_is_not_called_damaged(sites):
    """An sqlite tool (or a stray database server) holding the file's lock: `up` called the file
    damaged and told the user to move it away, which loses a good database."""
    state, host, cfg = sites.new(MM)
    assert _up(state, host, cfg).returncode == 0
    assert run_cli("down", "--state-dir", str(state)).returncode == 0
    db = state / "tango_database.sqlite"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        out = _up(state, host, cfg, "--timeout", "20")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:"))
    assert (
        out.returncode == 1 and f"the embedded Tango database file {db} is locked by another program" in line
    )
    assert "damaged" not in line and "move it away" not in line, line
    assert managed_processes(state) == []
    assert _up(state, host, cfg).returncode == 0


def test_a_server_script_whose_interpreter_is_missing_is_named(sites, tmp_path):
    """A server executable on PATH whose #! line names a missing interpreter (a tool removed
    since it was installed): `up` ended in a FileNotFoundError traceback naming the script,
    which was there."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "OrphanDS"
    script.write_text("#!/nonexistent/opt/bin/tcsh\necho never\n")
    script.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    state, host, cfg = sites.new({"servers": {"OrphanDS": {"x": {"Orphan": {"test/orphan/1": {}}}}}})
    out = _up(state, host, cfg, "--timeout", "10", env=env)
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:"))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert (
        f"cannot run {script}" in line
        and "its interpreter (#!/nonexistent/opt/bin/tcsh) is not there" in line
    )
    assert [p.name for p in managed_processes(state)] == ["tango-db"]  # no record of a server that never ran


def test_down_on_a_folder_up_never_used_leaves_it_as_it_was(tmp_path):
    """`livehist down --state-dir ~` (a slip) wrote a `lock` file into the home folder."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    out = run_cli("down", "--state-dir", str(home))
    assert out.returncode == 0 and f"nothing to stop in {home}" in out.stdout, out.stdout + out.stderr
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]


def test_blanks_around_the_tango_host_are_dropped(sites):
    """`--tango-host "$(cat host.txt)"` (a trailing newline) or a TANGO_HOST with a blank: the
    database started, then every server died at start: '"35151 " cannot be entirely parsed into int'."""
    state, host, cfg = sites.new(MM)
    out = _up(state, f" {host}\n", cfg, "--timeout", "30")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads((state / "state.json").read_text())["tango_host"] == host
    env = dict(os.environ, TANGO_HOST=f"{host} ")
    r = run_cli("status", "--state-dir", str(state), "--tango-host", f"{host} ", env=env)
    assert r.returncode == 0, r.stdout + r.stderr


def test_down_with_a_frozen_database_does_not_wait_out_each_server(sites):
    """With the embedded database SIGSTOPped, each server's exit waited on it (unexport) until
    `down` SIGKILLed it 10 s later, one server after the other: 20 s for two, 30 s for the default
    site."""
    import signal
    import time

    from livehist.site.process import Managed

    site = sites.up({"servers": {
        "MetadataManager": {"fdb": {"MetadataManager": {"test/fdb/m": {}}}},
        "EventHistogrammer": {"fdb": {"EventHistogrammer": {"test/fdb/h": {}}}}}})  # fmt: skip
    pids = {p.name: p.pid() for p in managed_processes(site.state_dir)}
    os.kill(Managed(site.state_dir, "tango-db").pid(), signal.SIGSTOP)
    t0 = time.monotonic()
    out = run_cli("down", "--state-dir", str(site.state_dir))
    took = time.monotonic() - t0
    assert out.returncode == 0 and all(f"stopped {name}" in out.stdout for name in pids), out.stdout
    assert took < 12, took
    assert all(not Path(f"/proc/{pid}").exists() or "Z" in _state(pid) for pid in pids.values())


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_a_config_that_never_ends_is_refused_without_eating_the_memory(tmp_path):
    """`--config /dev/zero` (a slip of completion) read until memory ran out: a MemoryError
    traceback, after the machine had swapped (here capped, so that a regression stays harmless)."""
    state = tmp_path / "state"

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    out = subprocess.run(
        [sys.executable, "-m", "livehist.cli", "up", "--tango-host", "no-such-host.invalid:1", "--config",
         "/dev/zero", "--state-dir", str(state)],
        capture_output=True, text=True, timeout=120, preexec_fn=cap,
    )  # fmt: skip
    line = next(
        (ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:")), out.stderr[-300:]
    )
    assert out.returncode == 1 and "config /dev/zero is larger than 16 MB" in line, line
    assert not state.exists()


def test_a_config_piped_through_dev_stdin_is_applied_once_and_kept_for_status(sites):
    """`... | livehist up --config /dev/stdin`: state.json named /dev/stdin, so a later `status`
    read the terminal (waiting for input) or nothing. (Checking the config before the state dir
    was made read the pipe twice: the second read found it empty.)"""
    state, host, _ = sites.new()
    text = json.dumps(MM)
    out = subprocess.run(
        [sys.executable, "-m", "livehist.cli", "up", "--tango-host", host, "--config", "/dev/stdin", "--state-dir",
         str(state)],
        input=text, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    kept = Path(json.loads((state / "state.json").read_text())["config"])
    assert kept.is_file() and json.loads(kept.read_text()) == MM, kept
    r = subprocess.run([sys.executable, "-m", "livehist.cli", "status", "--state-dir", str(state)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "test/sitefault/m" in r.stdout, r.stdout + r.stderr


def test_up_and_down_do_not_wait_for_ever_behind_a_stopped_up(tmp_path):
    """Ctrl-Z on a `livehist up` in one terminal: every later `up` and `down` of that state dir
    said 'another livehist up or down is working ...; waiting for it' and waited for ever, so
    the site could not even be stopped."""
    import signal
    import time

    from livehist.site.process import Managed, free_port

    state, cfg = tmp_path / "state", tmp_path / "c.json"
    cfg.write_text(json.dumps({"servers": {"EventHistogrammer": {"ctlz": {"EventHistogrammer": {
        "test/ctlz/h": {}}}}}}))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TANGO_HOST"}
    argv = [sys.executable, "-m", "livehist.cli", "up", "--config", str(cfg), "--state-dir", str(state),
            "--tango-host", f"127.0.0.1:{free_port()}"]  # fmt: skip
    up = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in up.stdout:
            if line.startswith("EventHistogrammer/ctlz: started"):
                up.send_signal(signal.SIGSTOP)  # Ctrl-Z, while it holds the state dir
                break
        t0 = time.monotonic()
        out = run_cli("down", "--state-dir", str(state), timeout=60)
        line = next(ln for ln in out.stderr.splitlines() if ln.startswith("livehist down: error:"))
        assert out.returncode == 1 and f"(pid {up.pid}) is stopped" in line, line
        assert f"kill -CONT {up.pid}" in line and time.monotonic() - t0 < 30, line
        assert Managed(state, "EventHistogrammer-ctlz").pid() is not None  # nothing was touched
        up.send_signal(signal.SIGCONT)
        assert up.wait(timeout=120) == 0
        out = run_cli("down", "--state-dir", str(state))
        assert out.returncode == 0 and "stopped EventHistogrammer-ctlz" in out.stdout, out.stdout + out.stderr
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGCONT)
            up.kill()
        for proc in managed_processes(state):
            proc.stop(timeout=2)


def test_control_characters_in_server_names_are_refused_before_anything_starts(tmp_path):
    """An instance name with a NUL ("\\u0000" in the JSON) ended `up` in a ValueError traceback
    (embedded null byte) after the database had been written; a newline split the table."""
    state = tmp_path / "state"
    for instance, shown in (("a\u0000b", "\\x00"), ("a b\nc", "\\n")):
        cfg = tmp_path / "c.json"
        cfg.write_text(
            json.dumps({"servers": {"MetadataManager": {instance: {"MetadataManager": {"t/c/m": {}}}}}})
        )
        out = run_cli(
            "up", "--tango-host", "no-such-host.invalid:1", "--config", str(cfg), "--state-dir", str(state)
        )
        line = next(
            (ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:")), out.stderr
        )
        assert out.returncode == 1 and f"has characters Tango names cannot carry ({shown})" in line, line
        assert not state.exists()


def test_a_short_timeout_is_quoted_as_given(sites, tmp_path):
    """`up --timeout 0.5` said the device 'did not answer within 0 s'."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "HushDS"
    script.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(600)\n")
    script.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    state, host, cfg = sites.new({"servers": {"HushDS": {"t": {"Hush": {"test/hush/1": {}}}}}})
    out = _up(state, host, cfg, "--timeout", "0.5", env=env)
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:"))
    assert out.returncode == 1 and "did not answer within 0.5 s" in line, line


def _as_another_users_dir(path: Path) -> list[str]:
    """Make `path` (and what is in it) another user's, and return the command prefix of a process
    that the file permissions bind: this user if not root (the folder stays its own), else root
    without the capabilities that bypass them (setpriv) and the folder given to `nobody` (65534)."""
    if os.geteuid() != 0:
        return []
    for folder, dirs, files in os.walk(path):
        for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
            os.chown(name, 65534, 65534)
    caps = "-dac_override,-dac_read_search,-fowner"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


@pytest.mark.parametrize("command", ["down", "status"])
def test_down_on_a_state_dir_it_cannot_read_names_the_folder_and_its_owner(tmp_path, command):
    """`down` on another user's state dir ended in a PermissionError traceback (the folder private),
    or said 'nothing to stop' (only run/ private) while that user's site ran on; `status` said no
    database answered and to run `livehist up`."""
    import pwd

    for private in ("state", "run"):
        state = tmp_path / f"theirs-{private}"
        (state / "run").mkdir(parents=True)
        (state / "lock").write_text("")
        (state / "run" / "tango-db.json").write_text("{}")
        prefix = _as_another_users_dir(state)
        (state if private == "state" else state / "run").chmod(0o700)
        if not prefix:  # not root: a folder of one's own made unreadable
            (state if private == "state" else state / "run").chmod(0o000)
        out = subprocess.run([*prefix, sys.executable, "-m", "livehist.cli", command, "--state-dir", str(state)],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        (state if private == "state" else state / "run").chmod(0o755)
        owner = pwd.getpwuid(state.stat().st_uid).pw_name
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        [line] = out.stderr.splitlines()
        where = state if private == "state" else state / "run"
        assert line.startswith(f"livehist {command}: error: {where} belongs to user {owner}"), line
        assert f"run `livehist {command} --state-dir {state}` as {owner}" in line, line
        assert (state / "run" / "tango-db.json").exists()  # nothing changed
