"""`livehist up / down / status / demo` with real database and server processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from livehist.tangodb import embedded

from livehist.site.process import managed_processes
from tests.conftest import run_cli


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def pids(state: Path) -> dict[str, int | None]:
    return {p.name: p.pid() for p in managed_processes(state)}


def test_up_status_down_with_real_processes(sites):
    state, host, _ = sites.new()
    port = int(host.rsplit(":", 1)[1])
    r = run_cli("up", "--tango-host", host, "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    assert "starting the embedded Tango database" in r.stdout
    for dev in (
        "pool/livehist/1",
        "macroserver/livehist/1",
        "door/livehist/1",
        "livehist/histogrammer/1",
        "livehist/metadata/1",
    ):
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith(dev))
        assert (" STANDBY " if "metadata" in dev else " ON ") in line, line  # STANDBY: no proposal yet
    first = pids(state)
    servers = {"Sardana-livehist", "EventHistogrammer-livehist", "MetadataManager-livehist"}
    assert set(first) == {"tango-db", *servers} and all(first.values())

    # a second terminal, knowing only TANGO_HOST, reaches the Door
    probe = subprocess.run(
        [sys.executable, "-c", "import tango; print(tango.DeviceProxy('door/livehist/1').state())"],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, TANGO_HOST=host),
    )  # fmt: skip
    assert probe.stdout.strip() == "ON", probe.stderr

    r = run_cli("status", "--state-dir", str(state))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "door/livehist/1" in r.stdout and "DOWN" not in r.stdout

    # up twice changes nothing
    r = run_cli("up", "--tango-host", host, "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    assert "Sardana/livehist: already running" in r.stdout
    assert "EventHistogrammer/livehist: already running" in r.stdout
    assert "database already up to date" in r.stdout
    assert pids(state) == first

    r = run_cli("down", "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    assert "stopped Sardana-livehist" in r.stdout and "stopped tango-db" in r.stdout
    assert "stopped EventHistogrammer-livehist" in r.stdout
    for pid in first.values():
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert not listening(port)
    assert managed_processes(state) == []
    r = run_cli("status", "--state-dir", str(state))
    assert r.returncode == 1 and "run `livehist up`" in r.stdout


def test_killed_server_is_reported_down_and_up_restarts_only_it(sites):
    state, host, _ = sites.new()
    assert run_cli("up", "--tango-host", host, "--state-dir", str(state)).returncode == 0
    before = pids(state)
    os.kill(before["Sardana-livehist"], 9)
    time.sleep(0.5)
    r = run_cli("status", "--state-dir", str(state))
    assert r.returncode == 3
    assert next(ln for ln in r.stdout.splitlines() if ln.startswith("door/livehist/1")).split()[3] == "DOWN"
    r = run_cli("up", "--tango-host", host, "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    assert "Sardana/livehist: started" in r.stdout
    after = pids(state)
    assert after["tango-db"] == before["tango-db"]
    assert after["EventHistogrammer-livehist"] == before["EventHistogrammer-livehist"]
    assert after["Sardana-livehist"] not in (None, before["Sardana-livehist"])
    assert run_cli("status", "--state-dir", str(state)).returncode == 0
    assert run_cli("down", "--state-dir", str(state)).returncode == 0


def test_port_taken_by_another_program(sites):
    state, host, _ = sites.new()
    port = int(host.rsplit(":", 1)[1])
    srv = socket.socket()
    srv.bind(("127.0.0.1", port))
    srv.listen()

    def answer_garbage():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
            conn.close()

    threading.Thread(target=answer_garbage, daemon=True).start()
    try:
        t0 = time.monotonic()
        r = run_cli("up", "--tango-host", host, "--state-dir", str(state))
        assert time.monotonic() - t0 < 30
    finally:
        srv.close()
    assert r.returncode == 1
    assert f"port {port} on 127.0.0.1 is taken by a program that is not a Tango database" in r.stderr
    assert "--tango-host" in r.stderr
    assert managed_processes(state) == []


def test_unreachable_and_malformed_tango_host(sites):
    state, _, _ = sites.new()
    r = run_cli("up", "--tango-host", "no-such-host.invalid:10000", "--state-dir", str(state))
    assert r.returncode == 1 and "no-such-host.invalid:10000 does not answer" in r.stderr
    r = run_cli("up", "--tango-host", "localhost", "--state-dir", str(state))
    assert r.returncode == 1 and "'localhost' is not HOST:PORT" in r.stderr
    r = run_cli("status", "--tango-host", "127.0.0.1:notaport", "--state-dir", str(state))
    assert r.returncode == 1 and "is not HOST:PORT" in r.stderr
    assert managed_processes(state) == []


def test_malformed_config_fails_before_starting_anything(sites, tmp_path):
    state, host, _ = sites.new()
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"servers": {"Sardana": }')
    r = run_cli("up", "--tango-host", host, "--state-dir", str(state), "--config", str(bad_json))
    assert r.returncode == 1
    assert "is not valid JSON (line 1, column 25" in r.stderr

    unknown_class = tmp_path / "class.json"
    unknown_class.write_text(json.dumps(
        {"servers": {"Sardana": {"x": {"Motr": {"a/b/c": {}}}}}}
    ))  # fmt: skip
    r = run_cli("up", "--tango-host", host, "--state-dir", str(state), "--config", str(unknown_class))
    assert r.returncode == 1
    assert "server Sardana has no device class 'Motr'" in r.stderr

    unknown_server = tmp_path / "server.json"
    unknown_server.write_text(json.dumps({"servers": {"NoSuchDS": {"x": {"C": {"a/b/c": {}}}}}}))
    r = run_cli("up", "--tango-host", host, "--state-dir", str(state), "--config", str(unknown_server))
    assert r.returncode == 1 and "unknown server 'NoSuchDS'" in r.stderr

    not_dsconfig = tmp_path / "list.json"
    not_dsconfig.write_text("[1, 2]")
    r = run_cli("up", "--tango-host", host, "--state-dir", str(state), "--config", str(not_dsconfig))
    assert r.returncode == 1 and 'has no "servers" object' in r.stderr

    r = run_cli(
        "up", "--tango-host", host, "--state-dir", str(state), "--config", str(tmp_path / "nope.json")
    )
    assert r.returncode == 1 and "cannot read config" in r.stderr
    assert managed_processes(state) == []
    assert not listening(int(host.rsplit(":", 1)[1]))


def _fake_server(tmp_path: Path, name: str, body: str) -> dict:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / name
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    script.chmod(0o755)
    return dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")


def test_server_crashing_at_start_is_named_with_its_log(sites, tmp_path):
    env = _fake_server(tmp_path, "CrashDS", "import sys\nprint('boom: no detector')\nsys.exit(3)\n")
    cfg = tmp_path / "crash.json"
    cfg.write_text(json.dumps({"servers": {"CrashDS": {"t": {"Crash": {"test/crash/1": {}}}}}}))
    state, host, _ = sites.new()
    r = run_cli("up", "--tango-host", host, "--state-dir", str(state), "--config", str(cfg), env=env)
    assert r.returncode == 1
    assert "server CrashDS/t exited (code 3) while starting" in r.stderr
    assert "boom: no detector" in r.stderr and "CrashDS-t.log" in r.stderr
    # the database stays up and down still cleans it
    r = run_cli("down", "--state-dir", str(state))
    assert "stopped tango-db" in r.stdout
    assert not listening(int(host.rsplit(":", 1)[1]))


def test_server_that_never_answers_times_out(sites, tmp_path):
    env = _fake_server(tmp_path, "MuteDS", "import time\ntime.sleep(600)\n")
    cfg = tmp_path / "mute.json"
    cfg.write_text(json.dumps({"servers": {"MuteDS": {"t": {"Mute": {"test/mute/1": {}}}}}}))
    state, host, _ = sites.new()
    t0 = time.monotonic()
    r = run_cli("up", "--tango-host", host, "--state-dir", str(state), "--config", str(cfg),
                "--timeout", "3", env=env)  # fmt: skip
    assert time.monotonic() - t0 < 30
    assert r.returncode == 1
    assert "device test/mute/1 of server MuteDS/t did not answer within 3 s" in r.stderr
    r = run_cli("down", "--state-dir", str(state))
    assert "stopped MuteDS-t" in r.stdout and "stopped tango-db" in r.stdout
    assert managed_processes(state) == []


def test_down_with_nothing_started(tmp_path):
    r = run_cli("down", "--state-dir", str(tmp_path))
    assert r.returncode == 0 and "nothing to stop" in r.stdout


def test_site_database_is_used_and_nothing_embedded_started(sites):
    """A site's own DB (here: one started outside livehist) is used as it is."""
    state, host, _ = sites.new()
    port = int(host.rsplit(":", 1)[1])
    db = subprocess.Popen(
        [sys.executable, "-m", "tango.databaseds.database", "2", "--host", "127.0.0.1", "--port", str(port)],
        # pytango ignores --port unless TANGO_HOST names the same port
        env=dict(os.environ, TANGO_HOST=host, PYTANGO_DATABASE_NAME=str(state / "site.sqlite")),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while embedded.probe("127.0.0.1", port) != "tango" and time.monotonic() < deadline:
            time.sleep(0.1)
        env = dict(os.environ, TANGO_HOST=host)
        r = run_cli("up", "--state-dir", str(state), env=env)
        assert r.returncode == 0, r.stderr
        assert "(site database)" in r.stdout and "starting the embedded" not in r.stdout
        assert set(pids(state)) == {
            "Sardana-livehist",
            "EventHistogrammer-livehist",
            "MetadataManager-livehist",
        }
        r = run_cli("down", "--state-dir", str(state))
        assert r.returncode == 0 and "tango-db" not in r.stdout
        assert db.poll() is None  # the site's database is not ours to stop
    finally:
        db.terminate()
        db.wait(10)


def test_demo_runs_the_whole_chain(sardana_site, tmp_path):
    import matplotlib.image
    from PyMca5.PyMcaIO import specfile

    from livehist.site.demo import demo

    lines: list[str] = []
    files = demo(sardana_site.tango_host, None, sardana_site.state_dir, tmp_path, say=lines.append)
    names = {p.name for p in files}
    assert {"demo.nxs", "demo.spec", "demo.jsonl", "live_histograms.png", "dataset.json"} <= names
    folder = files[0].parent
    assert folder.parent.parent.parent == tmp_path.resolve()  # DataRoot/year/proposal/dataset
    # the live part showed progress and ended by its preset, then drew the histograms
    assert any("events/s" in ln and "[RUNNING]" in ln for ln in lines)
    assert any("preset time reached" in ln for ln in lines)
    picture = matplotlib.image.imread(folder / "live_histograms.png")
    assert picture.shape[0] > 300 and picture[..., :3].std() > 0.05  # drawn, not blank
    assert any("spock> ascan mot01 0 10 10 0.1" in ln for ln in lines)
    assert sum(ln.startswith("  ok  ") for ln in lines) == 3
    assert any("open http://127.0.0.1:8050/ to watch" in ln for ln in lines)
    scan = specfile.Specfile(str(folder / "demo.spec"))[0]
    assert scan.lines() == 11 and scan.nbmca() == 11
    summary = json.loads((folder / "dataset.json").read_text())
    assert summary["metadata"]["proposal"] == "20260001"
    assert {"demo.nxs", "demo.spec", "demo.jsonl", "live_histograms.png"} <= {
        f["path"] for f in summary["files"]
    }


def test_stopping_a_frozen_server_does_not_wait_for_the_kill(tmp_path):
    # a SIGSTOPped process never handled the SIGTERM: `down` (and Ctrl-C in `up`) waited the
    # whole timeout, then SIGKILLed it
    import signal

    from livehist.site.process import Managed

    proc = Managed(tmp_path, "frozen")
    pid = proc.start([sys.executable, "-c", "import time; time.sleep(600)"])
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    assert proc.stop(timeout=20)
    # the SIGTERM is handled at once, not the SIGKILL at 20 s
    assert time.monotonic() - t0 < 10 and proc.pid() is None
