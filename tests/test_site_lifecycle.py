"""`livehist up / down / status` against a hostile user: host names the resolver cannot even
encode, state dirs deleted or made unwritable under a running site, odd server instance names.
Real embedded databases and real device servers on free ports."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from livehist.site.process import managed_processes
from tests.conftest import run_cli

MM = {"servers": {"MetadataManager": {"lc": {"MetadataManager": {
    "test/lifecycle/m": {"properties": {"DefaultDataRoot": ["/tmp"]}}}}}}}  # fmt: skip


def test_a_tango_host_name_the_resolver_cannot_encode_is_named_not_a_traceback(tmp_path):
    """`a..b:PORT` (an empty label, a typo) made Python's idna codec raise UnicodeError out of the
    connection attempt: `up` and `status` ended in a traceback instead of naming the host."""
    state = tmp_path / "state"
    for command in ("up", "status"):
        out = run_cli(command, "--tango-host", "beamline..example:12345", "--state-dir", str(state))
        text = out.stdout + out.stderr
        assert out.returncode == 1 and "Traceback" not in text, text
        assert "the name 'beamline..example' does not resolve" in text, text
        assert "check TANGO_HOST / --tango-host" in text, text
    assert not state.exists()
    env = dict(os.environ, TANGO_HOST="beamline..example:12345")
    out = run_cli("status", "--state-dir", str(state), env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "the name 'beamline..example' does not resolve" in out.stdout, out.stdout


def _make_unwritable(*paths) -> None:
    """A state dir that can no longer be written (a disk remounted read-only after an error, a
    folder of another user): `chattr +i` as root, who ignores modes; else the modes."""
    for path in paths:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "+i", str(path)], check=True)
        else:
            path.chmod(0o555 if path.is_dir() else 0o444)


def _make_writable(*paths) -> None:
    for path in paths:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_down_of_a_state_dir_that_cannot_be_written_stops_everything_and_says_what_it_left(sites):
    """`down` on a state dir whose records cannot be removed (nor its lock opened for writing)
    stopped the first server, then ended in a PermissionError traceback: the embedded database
    ran on, and `down` could not be run at all once the lock file was read-only."""
    site = sites.up(MM)
    procs = {p.name: p.pid() for p in managed_processes(site.state_dir)}
    assert set(procs) == {"MetadataManager-lc", "tango-db"} and None not in procs.values(), procs
    frozen = [site.state_dir / "run", site.state_dir / "lock", site.state_dir]
    _make_unwritable(*frozen)
    try:
        out = run_cli("down", "--state-dir", str(site.state_dir))
    finally:
        _make_writable(*frozen)
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 0, out.stdout + out.stderr
    assert "stopped MetadataManager-lc" in out.stdout and "stopped tango-db" in out.stdout, out.stdout
    for name, pid in procs.items():
        assert not _alive(pid), f"{name} (pid {pid}) still runs"
    left = next(ln for ln in out.stdout.splitlines() if ln.startswith("could not remove"))
    assert str(site.state_dir / "run" / "tango-db.json") in left and "the processes are stopped" in left, left
    # what it left is stale and harmless: nothing is taken as running any more
    assert all(p.pid() is None for p in managed_processes(site.state_dir))
    out = run_cli("status", "--state-dir", str(site.state_dir))
    assert out.returncode == 1 and "run `livehist up`" in out.stdout, out.stdout


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_state_dir_deleted_under_a_running_site_is_neither_forgotten_nor_doubled(sites):
    """`rm -rf` of the state dir (or of its run/) while the site ran: `down` said 'nothing to stop'
    and exited 0, leaving the database and servers running for good; `up` called the orphaned
    database 'site database' and went on, so no command could ever stop them again."""
    import shutil
    import signal

    state, host, cfg = sites.new(MM)
    cfg = cfg.rename(state.parent / f"{state.name}-config.json")  # kept: the state dir goes
    out = run_cli("up", "--tango-host", host, "--config", str(cfg), "--state-dir", str(state))
    assert out.returncode == 0, out.stdout + out.stderr
    pids = {p.name: p.pid() for p in managed_processes(state)}
    assert set(pids) == {"MetadataManager-lc", "tango-db"} and None not in pids.values(), pids
    # a detached child of a server inherits its environment (the record's path in it) and is no orphan
    import sys

    server_env = Path(f"/proc/{pids['MetadataManager-lc']}/environ").read_bytes().split(b"\0")
    env = dict(item.decode(errors="surrogateescape").split("=", 1) for item in server_env if b"=" in item)
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], env=env, start_new_session=True
    )
    try:
        out = run_cli("up", "--tango-host", host, "--config", str(cfg), "--state-dir", str(state))
        assert out.returncode == 0 and "already running" in out.stdout, out.stdout + out.stderr
        shutil.rmtree(state)
        out = run_cli("up", "--tango-host", host, "--config", str(cfg), "--state-dir", str(state))
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stdout + out.stderr
        line = next(ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:"))
        for name, pid in pids.items():
            assert f"{name} (pid {pid})" in line, line
        assert f"livehist down --state-dir {state}" in line, line
        assert all(_alive(pid) for pid in pids.values())  # refused, not stopped behind the user's back
        assert managed_processes(state) == []  # and nothing new started
        out = run_cli("down", "--state-dir", str(state))
        assert out.returncode == 0, out.stdout + out.stderr
        for name, pid in pids.items():
            assert f"stopped {name} (pid {pid}" in out.stdout, out.stdout
            assert not _alive(pid), f"{name} (pid {pid}) still runs"
        out = run_cli("down", "--state-dir", str(state))
        assert out.returncode == 0 and "nothing to stop" in out.stdout, out.stdout
        assert child.poll() is None  # not taken for one of the site's processes
    finally:
        child.kill()
        child.wait()
        for pid in pids.values():
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)


def test_bad_or_clashing_server_instance_names_are_refused_before_anything(tmp_path):
    """An instance `-h` was written into the database and its server died printing its usage; `a\\b`
    started a server that never answered (up waited out --timeout); an empty one made a server
    `MetadataManager/`; `a/b` beside `a-b` shared one pid record, so the second was never started and
    up blamed it after --timeout."""

    def config(*instances: str) -> dict:
        return {"servers": {"MetadataManager": {
            inst: {"MetadataManager": {f"test/lifecycle/m{i}": {}}} for i, inst in enumerate(instances)}}}  # fmt: skip

    cases = [
        (config("-h"), "server instance '-h' of MetadataManager"),
        (config("a\\b"), "server instance 'a\\\\b' of MetadataManager"),
        (config(""), "server instance '' of MetadataManager"),
        (config("a/b"), "server instance 'a/b' of MetadataManager"),
        (config("a-b", "A-B"), "servers MetadataManager/a-b and MetadataManager/A-B"),
    ]
    state = tmp_path / "state"
    for cfg, message in cases:
        path = tmp_path / "config.json"
        path.write_text(json.dumps(cfg))
        out = run_cli(
            "up", "--tango-host", "no-such-host.invalid:1", "--config", str(path), "--state-dir", str(state)
        )
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stdout + out.stderr
        line = next(ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:"))
        assert message in line, line
        assert "rename" in line, line
        assert not state.exists()  # refused before the state dir, the database or any server


def test_dsconfig_server_instance_keys_work_and_a_devices_section_is_refused_without_a_traceback(sites):
    """dsconfig also reads `"Executable/instance"` server keys (its "v1" format): `up` refused them,
    calling the device a class. Its top-level `"devices"` (edits of devices already in a database)
    made the schema check open $TANGO_HOST's database, whichever --tango-host was given: a
    traceback when TANGO_HOST was unset."""
    v1 = {"servers": {"MetadataManager/lc1": {"MetadataManager": {"test/lifecycle/v1": {}}}}}
    state, host, cfg = sites.new(v1)
    out = run_cli("up", "--tango-host", host, "--config", str(cfg), "--state-dir", str(state))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "test/lifecycle/v1" in out.stdout and "MetadataManager/lc1" in out.stdout, out.stdout
    out = run_cli("up", "--tango-host", host, "--config", str(cfg), "--state-dir", str(state))
    assert out.returncode == 0 and "database already up to date" in out.stdout, out.stdout
    assert "MetadataManager/lc1: already running" in out.stdout, out.stdout

    both = {"servers": {"MetadataManager/lc1": {"MetadataManager": {"test/lifecycle/v1": {}}},
                        "MetadataManager": {"lc1": {"MetadataManager": {"test/lifecycle/v2": {}}}}}}  # fmt: skip
    devices = {**MM, "devices": {"test/lifecycle/m": {"properties": {"Title": ["x"]}}}}
    cases = [
        (both, "server MetadataManager/lc1 is given twice"),
        (devices, 'the top-level "devices" of dsconfig'),
    ]
    env = {k: v for k, v in os.environ.items() if k != "TANGO_HOST"}
    for config, message in cases:
        cfg.write_text(json.dumps(config))
        out = run_cli("up", "--tango-host", host, "--config", str(cfg), "--state-dir", str(state), env=env)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stdout + out.stderr
        line = next(ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:"))
        assert message in line, line
    assert [p.name for p in managed_processes(state)] == ["MetadataManager-lc1", "tango-db"]


def test_a_frozen_tango_database_of_another_state_dir_is_named_with_its_pid_not_called_a_stranger(sites):
    """Another state dir's (or any) Tango database stopped with SIGSTOP at the port: `up` and
    `status` called it 'a program that is not a Tango database' and told the user to stop it."""
    import signal

    site = sites.up(MM)
    db = next(p for p in managed_processes(site.state_dir) if p.name == "tango-db")
    pid = db.pid()
    other, _, cfg = sites.new(MM)
    os.kill(pid, signal.SIGSTOP)
    try:
        up = run_cli("up", "--tango-host", site.tango_host, "--config", str(cfg), "--state-dir", str(other))
        status = run_cli("status", "--tango-host", site.tango_host, "--state-dir", str(other))
    finally:
        os.kill(pid, signal.SIGCONT)
    assert up.returncode == 1 and "Traceback" not in up.stderr, up.stdout + up.stderr
    line = next(ln for ln in up.stderr.splitlines() if ln.startswith("livehist up: error:"))
    assert status.returncode == 1, status.stdout + status.stderr
    for text in (line, status.stdout):
        assert "not a Tango database" not in text, text
        assert f"process {pid} (" in text and f"kill -CONT {pid}" in text, text
    assert managed_processes(other) == []


def test_a_state_dir_name_too_long_for_the_file_system_is_named_not_a_traceback(tmp_path):
    """A folder name past the file system's 255 bytes (a path pasted twice, a generated name):
    `up`, `status` and `down` each ended in an OSError traceback (File name too long)."""
    state = tmp_path / ("s" * 300)
    for command in ("up", "status", "down"):
        host = [] if command == "down" else ["--tango-host", "no-such-host.invalid:1"]  # starts nothing
        out = run_cli(command, "--state-dir", str(state), *host)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stdout + out.stderr
        line = next(ln for ln in out.stderr.splitlines() if ln.startswith(f"livehist {command}: error:"))
        assert f"state dir {state}: File name too long" in line and "--state-dir" in line, line
    assert list(tmp_path.iterdir()) == []


def test_a_tilde_the_shell_did_not_expand_means_the_home_folder(tmp_path):
    """`--state-dir=~/x` (bash leaves the ~ of `--opt=~` alone) or `LIVEHIST_STATE_DIR='~/x'` (quoted
    in a profile or a unit file) made a folder named `~` in the current folder and ran the site there."""
    import sys

    from livehist.site import control
    from livehist.site.process import free_port

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (tmp_path / "c.json").write_text(json.dumps(MM))
    env = dict(os.environ, HOME=str(home))

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "livehist.cli", *args]
        return subprocess.run(
            argv, cwd=work, env={**env, **extra}, capture_output=True, text=True, timeout=180
        )

    try:
        out = cli("up", f"--tango-host=127.0.0.1:{free_port()}", "--config=~/../c.json", "--state-dir=~/lh")
        assert out.returncode == 0, out.stdout + out.stderr
        assert {p.name for p in managed_processes(home / "lh")} == {"MetadataManager-lc", "tango-db"}
        out = cli("down", LIVEHIST_STATE_DIR="~/lh")
        assert out.returncode == 0 and "stopped tango-db" in out.stdout, out.stdout + out.stderr
    finally:
        control.down(home / "lh", say=lambda s: None)
    assert list(work.iterdir()) == []


def test_an_empty_out_or_file_option_is_refused_before_anything_starts(tmp_path):
    """`livehist demo --out "$DATA"` with DATA unset brought the site up and wrote the dataset into
    the current folder (a checkout, say); `plot --out ""` put the PNGs there instead of beside the
    file. `--state-dir ""` and `--config ""` were already refused."""
    state = tmp_path / "state"
    work = tmp_path / "work"
    work.mkdir()
    cases = [
        ("demo", "--out", ["--state-dir", str(state), "--tango-host", "no-such-host.invalid:1"]),
        ("plot", "--out", [str(tmp_path / "scan.nxs")]),
        ("view", "--screenshot", []),
        ("web", "--layout", ["--tango-host", "no-such-host.invalid:1"]),
    ]
    import sys

    for command, option, rest in cases:
        argv = [sys.executable, "-m", "livehist.cli", command, *rest, option, ""]
        out = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stdout + out.stderr
        assert f"argument {option}: is empty" in out.stderr, out.stderr
    assert list(work.iterdir()) == [] and not state.exists()


def test_an_up_that_fails_half_way_says_what_it_left_running(sites, tmp_path):
    """A server dying at its start ended `up` with its log, and nothing said that the embedded
    database and the other servers this `up` had started were still running."""
    from tests.test_foundation import _fake_server

    env = _fake_server(tmp_path, "CrashDS", "import sys\nprint('boom: no detector')\nsys.exit(3)\n")
    config = {"servers": {**MM["servers"], "CrashDS": {"t": {"Crash": {"test/lifecycle/crash": {}}}}}}
    state, host, cfg = sites.new(config)
    out = run_cli("up", "--tango-host", host, "--state-dir", str(state), "--config", str(cfg), env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stdout + out.stderr
    assert "server CrashDS/t exited (code 3) while starting" in out.stderr, out.stderr
    running = sorted(p.name for p in managed_processes(state) if p.pid())
    assert running == ["MetadataManager-lc", "tango-db"], running
    last = out.stderr.strip().splitlines()[-1]
    assert "this `livehist up` left running: MetadataManager-lc, tango-db" in last, last
    assert f"livehist down --state-dir {state}" in last, last
    # an up that fails before it starts anything says nothing of the kind
    out = run_cli("up", "--tango-host", host, "--state-dir", str(state), "--config", str(cfg), env=env)
    assert out.returncode == 1 and "left running" not in out.stderr, out.stderr


def test_an_up_that_fails_on_a_new_state_dir_leaves_no_folder_behind(tmp_path):
    """A typo in the host (or a port another program holds) left the new state dir behind, with a
    lock file in it; a state dir that existed before is kept as it was."""
    import socket

    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen(5)
    taken = f"127.0.0.1:{other.getsockname()[1]}"
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(MM))
    try:
        for host, message in (
            ("no-such-host.invalid:1", "does not resolve"),
            (taken, "not a Tango database"),
        ):
            state = tmp_path / "new" / "state"
            out = run_cli("up", "--tango-host", host, "--config", str(cfg), "--state-dir", str(state))
            assert out.returncode == 1 and message in out.stderr, out.stdout + out.stderr
            assert not (tmp_path / "new").exists(), list((tmp_path / "new").rglob("*"))
            kept = tmp_path / "kept"
            kept.mkdir(exist_ok=True)
            out = run_cli("up", "--tango-host", host, "--config", str(cfg), "--state-dir", str(kept))
            assert out.returncode == 1 and kept.is_dir(), out.stderr
    finally:
        other.close()


def test_an_embedded_database_that_could_not_listen_is_not_taken_for_the_one_answering_there(sites):
    """Two `up`s of two state dirs on one port at once: the second one's database failed to bind,
    but another database (the first one's) answered at the port, so the second `up` took it for
    its own, wrote its config there and started its servers against it (they died: 'This server
    is already running'), and its state dir recorded an embedded database it did not have."""
    import pytest
    from livehist.tangodb import embedded

    from livehist.errors import LivehistError

    first = sites.up(MM)
    second, _, _ = sites.new()
    host, port = first.host_port
    with pytest.raises(LivehistError) as info:
        embedded.start_embedded(host, port, second)
    message = str(info.value)
    assert f"port {port} on {host} is in use by another program" in message, message
    assert "a Tango database answers there now" in message, message
    assert managed_processes(second) == []
    assert [p.name for p in managed_processes(first.state_dir) if p.pid()] == [
        "MetadataManager-lc",
        "tango-db",
    ]


def test_a_state_dir_whose_name_is_not_utf8_is_refused_where_tango_would_have_to_store_it(sites, tmp_path):
    """A folder named in another encoding (bytes that are not UTF-8): with a config that puts
    $LIVEHIST_STATE_DIR into a property (the default one does), `up` started the database, then ended
    in a TypeError traceback from pytango half way through writing the config."""
    state = Path(os.fsdecode(bytes(tmp_path) + b"/state-\xe9t\xe9"))
    cfg = tmp_path / "c.json"
    config = json.loads(json.dumps(MM))
    config["servers"]["MetadataManager"]["lc"]["MetadataManager"]["test/lifecycle/m"]["properties"][
        "DefaultDataRoot"
    ] = ["$LIVEHIST_STATE_DIR/data"]
    cfg.write_text(json.dumps(config))
    import sys

    from livehist.site.process import free_port

    sites.dirs.append(state)  # downed at the end of the session
    host = f"127.0.0.1:{free_port()}"

    def up() -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "livehist.cli", "up", "--tango-host", host, "--config", str(cfg)]
        argv += ["--state-dir", os.fsencode(state)]
        return subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=180)

    out = up()
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stdout + out.stderr
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:"))
    assert "test/lifecycle/m property DefaultDataRoot" in line and "not UTF-8" in line, line
    assert "--state-dir" in line, line
    assert not state.exists()
    # the same folder with a config that does not store it works
    cfg.write_text(json.dumps(MM))
    out = up()
    assert out.returncode == 0, out.stdout + out.stderr


def test_dollar_signs_in_property_values_reach_the_database_as_written(sites):
    """Placeholders went through string.Template, whose `$$` is an escape: a property value `a$$b`
    (a regex's end, a shell's pid) was stored as `a$b`, silently. Only $LIVEHIST_... names are replaced."""
    import tango

    values = ["ends$$", "$HOME/x", "${LIVEHIST_STATE_DIR}/a", "$LIVEHIST_STATE_DIR/b", "$LIVEHIST_STATE_DIRx"]
    config = json.loads(json.dumps(MM))
    props = config["servers"]["MetadataManager"]["lc"]["MetadataManager"]["test/lifecycle/m"]["properties"]
    props["Note"] = values
    site = sites.up(config)
    stored = list(tango.Database(*site.host_port).get_device_property("test/lifecycle/m", ["Note"])["Note"])
    state = str(site.state_dir)
    assert stored == ["ends$$", "$HOME/x", f"{state}/a", f"{state}/b", "$LIVEHIST_STATE_DIRx"], stored


def test_up_and_down_do_their_work_when_their_output_cannot_be_written(sites):
    """`livehist up > up.log` on a full disk, or run with stdout closed (`>&-`, some service
    managers): the first progress line ended `up` in a traceback (OSError: No space left on device,
    AttributeError: 'NoneType' object has no attribute 'write'), half way through starting the site."""
    import sys

    state, host, cfg = sites.new(MM)

    def cli(*args: str, closed: bool) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "livehist.cli", *args]
        if closed:
            return subprocess.run(
                argv, stderr=subprocess.PIPE, text=True, timeout=180, preexec_fn=lambda: os.close(1)
            )
        with open("/dev/full", "w") as full:
            return subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, text=True, timeout=180)

    for closed in (False, True):
        out = cli("up", "--tango-host", host, "--config", str(cfg), "--state-dir", str(state), closed=closed)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        assert "standard output cannot be written" in out.stderr or closed, out.stderr
        assert all(p.pid() for p in managed_processes(state)) and len(managed_processes(state)) == 2
        out = cli("status", "--state-dir", str(state), closed=closed)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        out = cli("down", "--state-dir", str(state), closed=closed)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        assert managed_processes(state) == []


def test_an_ipv6_tango_host_is_refused_naming_what_works(tmp_path):
    """cppTango cannot parse an IPv6 TANGO_HOST ('::1:PORT': syntax incorrect; '[::1]:PORT': cannot be
    parsed into int). `up` called ::1 'not this machine' and [::1] 'a name that does not resolve'."""
    state = tmp_path / "state"
    for host in ("::1:12345", "[::1]:12345", "fe80::1%eth0:12345"):
        for command in ("up", "status"):
            out = run_cli(command, "--tango-host", host, "--state-dir", str(state))
            assert out.returncode == 1 and "Traceback" not in out.stderr, out.stdout + out.stderr
            text = out.stdout + out.stderr
            assert "IPv6" in text and "--tango-host localhost:12345" in text, text
    assert not state.exists()


def test_up_on_another_tango_host_while_the_servers_run_against_the_first_is_refused_at_once(sites):
    """A state dir whose servers run against one site database, brought up against another: `up`
    wrote the config into the second database, then waited out --timeout for servers that answer only
    at the first, and blamed a device ('did not answer within 90 s'). The embedded case was refused."""
    import time

    import tango

    empty = {"servers": {}}
    db1, db2 = sites.up(empty), sites.up(empty)  # two 'site' databases, from state dirs of their own
    state, _, cfg = sites.new(MM)
    up = ("up", "--config", str(cfg), "--state-dir", str(state), "--tango-host")
    out = run_cli(*up, db1.tango_host)
    assert out.returncode == 0, out.stdout + out.stderr
    t0 = time.monotonic()
    out = run_cli(*up, db2.tango_host)
    assert time.monotonic() - t0 < 30
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stdout + out.stderr
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:"))
    assert f"run against the Tango database at {db1.tango_host}" in line, line
    assert f"--tango-host {db1.tango_host}" in line and "livehist down" in line, line
    assert list(tango.Database(*db2.host_port).get_server_list("MetadataManager/*")) == []  # nothing written
    out = run_cli(*up, db1.tango_host)
    assert out.returncode == 0 and "MetadataManager/lc: already running" in out.stdout, (
        out.stdout + out.stderr
    )


def test_the_embedded_database_dying_while_up_waits_is_named_at_once(sites, tmp_path):
    """The embedded database killed while `up` waited for the servers (here by a server that kills it
    at its start): `up` waited out --timeout, then blamed a device ('did not answer within ...')."""
    import time

    from tests.test_foundation import _fake_server

    body = """
        import json, os, signal, time
        record = os.path.join(os.environ["LIVEHIST_STATE_DIR"], "run", "tango-db.json")
        os.kill(json.load(open(record))["pid"], signal.SIGKILL)
        time.sleep(120)
    """
    env = _fake_server(tmp_path, "KillerDS", body)
    state, host, cfg = sites.new({"servers": {"KillerDS": {"t": {"Killer": {"test/lifecycle/killer": {}}}}}})
    t0 = time.monotonic()
    out = run_cli(
        "up",
        "--tango-host",
        host,
        "--state-dir",
        str(state),
        "--config",
        str(cfg),
        "--timeout",
        "60",
        env=env,
    )
    assert time.monotonic() - t0 < 40, out.stderr
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stdout + out.stderr
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:"))
    assert f"the embedded Tango database at {host} stopped while `up` waited for the servers" in line, line
    assert "tango-db.log" in line, line


def test_up_without_config_keeps_the_state_dirs_own_configuration(sites):
    """`up` without --config applied livehist's default configuration to a site brought up with its
    own: 10 database changes, Sardana and an EventHistogrammer started beside the site's servers,
    and state.json switched to the default, so `status` no longer listed the site's devices."""
    site = sites.up(MM)
    before = {p.name for p in managed_processes(site.state_dir)}
    out = run_cli("up", "--state-dir", str(site.state_dir))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"configuration {site.config_path}: the one this state dir was brought up with" in out.stdout, (
        out.stdout
    )
    assert "database already up to date" in out.stdout, out.stdout
    assert {p.name for p in managed_processes(site.state_dir)} == before == {"MetadataManager-lc", "tango-db"}
    assert json.loads((site.state_dir / "state.json").read_text())["config"] == str(site.config_path)
    moved = site.config_path.with_name("moved.json")
    site.config_path.rename(moved)
    try:  # the file gone: refused, naming it and the fix; nothing changes
        out = run_cli("up", "--state-dir", str(site.state_dir))
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stdout + out.stderr
        assert f"was brought up with the configuration {site.config_path}, which is gone; give --config" in (
            out.stdout + out.stderr
        )
        assert {p.name for p in managed_processes(site.state_dir)} == before
    finally:
        moved.rename(site.config_path)


def test_a_state_dir_on_a_file_system_without_locks_is_named_not_a_traceback(tmp_path, monkeypatch):
    """flock fails with ENOLCK on a file system without locks (an NFS mount whose lock daemon is not
    running): `up` ended in an OSError traceback. No such file system can be mounted here, so the
    kernel's answer is given to livehist's one flock call; `up` refuses naming the problem and the
    fix, `down` goes on without the lock (refusing would leave the site with no way to stop it)."""
    import errno
    import fcntl

    import pytest

    from livehist.errors import LivehistError
    from livehist.site import control

    def flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", flock)
    from livehist.site.process import free_port

    state = tmp_path / "nfs-state"
    with pytest.raises(LivehistError) as exc:
        control.up(f"127.0.0.1:{free_port()}", None, state, say=print)
    assert not state.exists()  # the folder it had made is gone again
    assert str(exc.value) == (
        f"state dir {state} is on a file system without file locks (flock: No locks available; an NFS "
        "mount without its lock daemon, say); give a state dir on a local disk with --state-dir "
        "(or LIVEHIST_STATE_DIR)"
    )
    (state / "run").mkdir(parents=True)  # a site made before the lock daemon stopped
    said = []
    assert control.down(state, say=said.append) == []
    assert said == [f"cannot lock {state / 'lock'} (No locks available): going on without it",
                    f"nothing to stop in {state}"]  # fmt: skip


def test_a_lock_or_state_json_that_is_a_folder_is_named_before_anything_starts(tmp_path):
    """A folder named `lock` gave 'state dir X: Is a directory' (the state dir is one, and fine); one
    named `state.json` let `up` start the database, then fail with 'free some space there', leaving
    the database running. Both are now named before anything starts."""
    from livehist.site.process import free_port

    for name in ("lock", "state.json"):
        state = tmp_path / f"with-{name}"
        (state / name).mkdir(parents=True)
        out = run_cli("up", "--tango-host", f"127.0.0.1:{free_port()}", "--state-dir", str(state))
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        [line] = [ln for ln in out.stderr.splitlines() if ln.startswith("livehist up: error:")]
        assert f"{state / name} is a folder, not a file" in line and "give another --state-dir" in line, line
        assert managed_processes(state) == [] and sorted(p.name for p in state.iterdir()) == [name]
    state = tmp_path / "status-with-state.json"
    (state / "state.json").mkdir(parents=True)  # `status` listed the default devices as DOWN
    out = run_cli("status", "--state-dir", str(state))
    [line] = [ln for ln in out.stderr.splitlines() if ln.startswith("livehist status: error:")]
    assert out.returncode == 1 and f"{state / 'state.json'} is a folder, not a file" in line, out
