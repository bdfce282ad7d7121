"""CLI faults a new user meets (issue 14): one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import zmq

from livehist.site.process import free_port
from tests.conftest import run_cli
from tests.test_view import display  # noqa: F401 - the Xvfb fixture


def _one_line_error(out, command: str) -> str:
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and "ZMQError" not in out.stderr, out.stderr
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith(f"livehist {command}: error:"))
    return line


def test_listen_without_scheme_and_to_a_closed_port():
    line = _one_line_error(run_cli("listen", "127.0.0.1:5560", "--seconds", "1"), "listen")
    assert "has no scheme; write it like tcp://127.0.0.1:5560" in line
    port = free_port()
    line = _one_line_error(run_cli("listen", f"tcp://127.0.0.1:{port}", "--seconds", "1"), "listen")
    assert "nothing answers at" in line and "RestreamEndpoint" in line
    line = _one_line_error(run_cli("listen", "tcp://*:5560"), "listen")
    assert "is a bind address" in line


def test_listen_to_a_silent_publisher_exits_non_zero_with_a_hint():
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    try:
        line = _one_line_error(run_cli("listen", f"tcp://127.0.0.1:{port}", "--seconds", "1.5"), "listen")
        assert "no histogram arrived from" in line and "in 1.5 s" in line
    finally:
        pub.close(0)
        ctx.term()


def test_listen_skips_what_is_not_hs01_and_goes_on():
    """Another program's messages on the endpoint (or a truncated hs01) are named and skipped;
    the histograms after them are printed, and only they count towards --count."""
    good = _hs01()
    with _publishing([b"not hs01", good[:40], good]) as port:
        out = run_cli("listen", f"tcp://127.0.0.1:{port}", "--count", "2", "--seconds", "20", timeout=60)
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    assert "skipped a message of 8 bytes that is not a valid hs01 histogram" in out.stdout, out.stdout
    assert "skipped a message of 40 bytes" in out.stdout, out.stdout
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("test/h/1/tof: update 7")]
    assert len(lines) == 2 and "4 time_of_flight (us): 10 counts" in lines[0], out.stdout


def test_view_rates_out_of_range_are_refused_before_any_window():
    for option in ("--image-rate", "--rate"):
        for bad in ("0", "-1", "11", "nan", "inf"):
            line = _one_line_error(run_cli("view", option, bad, "--seconds", "1"), "view")
            assert f"{option} must be 0.1 to 10 refreshes per second, got {float(bad)!r}" in line, line
            assert "the default is 5" in line, line


def test_stream_bind_errors_and_a_failing_source_exit_non_zero(tmp_path):
    ctx = zmq.Context()
    busy = ctx.socket(zmq.PUB)
    port = busy.bind_to_random_port("tcp://127.0.0.1")
    try:
        out = run_cli("stream", "sim://", "--bind", f"tcp://127.0.0.1:{port}", "--seconds", "1")
        assert "address is already in use" in _one_line_error(out, "stream")
    finally:
        busy.close(0)
        ctx.term()
    out = run_cli("stream", "sim://", "--bind", "127.0.0.1:5599", "--seconds", "1")
    assert "has no scheme" in _one_line_error(out, "stream")
    # ZeroMQ binds port 99999 as 34463: nobody connecting to 99999 would hear anything
    out = run_cli("stream", "sim://", "--bind", "tcp://127.0.0.1:99999", "--seconds", "1")
    assert "port 99999 is past 65535" in _one_line_error(out, "stream") and "publishing" not in out.stdout
    bad = tmp_path / "bad_events.nxs"
    with h5py.File(bad, "w") as f:  # readable at open, fails while streaming
        g = f.create_group("entry/events")
        g.attrs["NX_class"] = "NXevent_data"
        g["event_id"] = np.arange(10, dtype="i8") + 2**32  # ev44 cannot carry it: fails at the first send
        g["event_time_offset"] = np.arange(10, dtype="i4")
        g["event_time_offset"].attrs["units"] = "ns"
        g["event_index"] = np.array([0, 5])
        g["event_time_zero"] = np.array([0.0, 0.1])
        g["event_time_zero"].attrs["units"] = "s"
    out = run_cli("stream", f"nexus://{bad}?rate=max", "--pub", "--bind", f"tcp://127.0.0.1:{free_port()}")
    assert "source failed: ValueError" in _one_line_error(out, "stream")
    assert "sent 0 events" in out.stdout  # what was sent is still said
    with h5py.File(bad, "r+") as f:  # text where numbers belong: refused at open, naming the dtype
        del f["entry/events/event_time_offset"]
        f["entry/events/event_time_offset"] = np.array([b"x"] * 10)
    out = run_cli("stream", f"nexus://{bad}?rate=max", "--pub", "--bind", f"tcp://127.0.0.1:{free_port()}")
    assert (
        "event_time_offset has dtype |S1" in _one_line_error(out, "stream") and "publishing" not in out.stdout
    )


def test_nexus_uri_with_two_slashes_names_the_host_mistake(tmp_path):
    out = run_cli("stream", "nexus://tmp/qa/x.nxs", "--pub", "--bind", f"tcp://127.0.0.1:{free_port()}")
    line = _one_line_error(out, "stream")
    assert "'tmp' was read as a host name" in line and "nexus:///tmp/qa/x.nxs" in line


def test_up_with_an_overlay_adding_a_device_to_a_running_server_fails_fast(sites):
    state, host, cfg = sites.new({"servers": {"MetadataManager": {"ov": {"MetadataManager": {
        "test/overlay/a": {"properties": {"DefaultDataRoot": ["/tmp"]}}}}}}})  # fmt: skip
    out = run_cli("up", "--tango-host", host, "--config", str(cfg), "--state-dir", str(state))
    assert out.returncode == 0, out.stderr
    overlay = state / "overlay.json"
    overlay.write_text(json.dumps({"servers": {"MetadataManager": {"ov": {"MetadataManager": {
        "test/overlay/a": {"properties": {"DefaultDataRoot": ["/tmp"]}},
        "test/overlay/b": {"properties": {"DefaultDataRoot": ["/tmp"]}}}}}}}))  # fmt: skip
    t0 = time.monotonic()
    out = run_cli("up", "--tango-host", host, "--config", str(overlay), "--state-dir", str(state))
    line = _one_line_error(out, "up")
    assert time.monotonic() - t0 < 60  # not the 90 s start timeout
    assert "MetadataManager/ov is running without test/overlay/b" in line
    assert "RestartServer of dserver/MetadataManager/ov" in line


def test_bench_only_names_the_sections():
    line = _one_line_error(run_cli("bench", "--quick", "--only", "engines"), "bench")
    from livehist.bench import SECTIONS

    assert f"--only 'engines' is not a section; choose from {', '.join(SECTIONS)}" in line
    assert len(SECTIONS) >= 5 and "engine" in SECTIONS
    usage = run_cli("bench", "--help").stdout
    assert all(name in usage for name in SECTIONS), usage  # 'web' was missing from the help


def test_up_keeps_a_state_dir_on_its_own_database(sites):
    """`up` without a host uses the one the state dir used (it started a second embedded
    database on the same sqlite file at TANGO_HOST or 10000, the first orphaned); another host
    while it runs is refused; two `up` at once leave one database; an empty host is refused."""
    from livehist.site.process import managed_processes

    config = {"servers": {"MetadataManager": {"ks": {"MetadataManager": {
        "test/keep/a": {"properties": {"DefaultDataRoot": ["/tmp"]}}}}}}}  # fmt: skip
    state, host, cfg = sites.new(config)
    env = {k: v for k, v in os.environ.items() if k != "TANGO_HOST"}
    runs = [subprocess.Popen([sys.executable, "-m", "livehist.cli", "up", "--tango-host", host, "--config", str(cfg),
                              "--state-dir", str(state)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]  # fmt: skip
    outs = [r.communicate(timeout=180) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outs
    assert sum("starting the embedded Tango database" in o for o, _ in outs) == 1, outs
    pids = {p.name: p.pid() for p in managed_processes(state)}
    server = next(n for n in pids if n.startswith("MetadataManager"))
    os.kill(pids[server], 9)
    out = run_cli("up", "--config", str(cfg), "--state-dir", str(state), env=env)  # no host given
    assert out.returncode == 0, out.stderr
    assert f"Tango database at {host}" in out.stdout and "starting the embedded" not in out.stdout, out.stdout
    assert {p.name: p.pid() for p in managed_processes(state)}["tango-db"] == pids["tango-db"]
    other = f"127.0.0.1:{free_port()}"
    line = _one_line_error(
        run_cli("up", "--tango-host", other, "--config", str(cfg), "--state-dir", str(state)), "up"
    )
    assert f"runs at {host}, and this asks for {other}" in line
    line = _one_line_error(run_cli("up", "--tango-host", "", "--state-dir", str(state)), "up")
    assert "--tango-host is empty" in line
    line = _one_line_error(
        run_cli("up", "--tango-host", "127.0.0.1:\u0664\u0660\u0669", "--state-dir", str(state)), "up"
    )
    assert "is not HOST:PORT" in line
    dup = state / "dup.json"
    dup.write_text(json.dumps({"servers": {"MetadataManager": {"ks": {"MetadataManager": {
        "test/keep/a": {}, "TEST/KEEP/A": {}}}}}}))  # fmt: skip
    assert "is listed twice" in _one_line_error(
        run_cli("up", "--config", str(dup), "--state-dir", str(state), env=env), "up"
    )
    assert run_cli("down", "--state-dir", str(state)).returncode == 0
    assert all(p.pid() is None for p in managed_processes(state))


def test_demo_out_that_tango_cannot_pass_is_refused_before_anything_starts(tmp_path):
    state = tmp_path / "state"
    line = _one_line_error(
        run_cli("demo", "--out", str(tmp_path / "out ☃"), "--state-dir", str(state)), "demo"
    )
    assert "Latin-1" in line and not state.exists()  # nothing started (it died in RunMacro, the site up)


def test_a_state_dir_that_is_a_file_is_called_a_file(tmp_path):
    # it said "File exists"
    state = tmp_path / "state"
    state.write_text("mine")
    for command in ("up", "demo"):
        line = _one_line_error(run_cli(command, "--state-dir", str(state)), command)
        assert f"state dir {state}: is a file, not a folder; give a writable folder" in line, line
    assert state.read_text() == "mine"


def test_a_state_dir_with_non_ascii_characters_works(tmp_path):
    """The DB probe asked DbInfo, whose reply carries the sqlite path: pytango could not encode
    it, so `up` waited 30 s for a database that was running ('did not answer')."""
    from livehist.site import control

    state = tmp_path / "müller ☃"
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"servers": {"MetadataManager": {"uni": {"MetadataManager": {
        "test/uni/a": {"properties": {"DefaultDataRoot": ["/tmp"]}}}}}}}))  # fmt: skip
    try:
        t0 = time.monotonic()
        site = control.up(f"127.0.0.1:{free_port()}", cfg, state, timeout=60, say=lambda s: None)
        assert time.monotonic() - t0 < 30 and control.ping(site.url("test/uni/a")) is not None
    finally:
        control.down(state, say=lambda s: None)


def test_status_names_a_device_in_fault_and_exits_4(sites):
    """A histogrammer that answers but is FAULT is not "all up": status says why, exit 4."""
    config = {"servers": {"EventHistogrammer": {"faulty": {"EventHistogrammer": {
        "test/faulty/1": {"properties": {"EventSource": ["zmq://127.0.0.1:notaport"]}},
        "test/fine/1": {"properties": {"EventSource": ["sim://?rate=1e3"]}}}}}}}  # fmt: skip
    site = sites.up(config)
    r = run_cli("status", "--state-dir", str(site.state_dir), "--config", str(site.config_path))
    assert r.returncode == 4, r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("test/faulty/1"))
    assert line.split()[3] == "FAULT" and "notaport" in line, line
    assert next(ln for ln in r.stdout.splitlines() if ln.startswith("test/fine/1")).split()[3] == "ON"


def test_up_with_a_device_in_fault_exits_4_naming_it_and_leaves_the_servers_running(tmp_path):
    """`up` printed the FAULT row and exited 0: `livehist up && start-the-run` went on with a
    histogrammer that counts nothing. The servers stay up (the device says why; Init after a fix)."""
    from livehist.site import control

    state, cfg = tmp_path / "state", tmp_path / "c.json"
    cfg.write_text(json.dumps({"servers": {"EventHistogrammer": {"upfault": {"EventHistogrammer": {
        "test/upfault/bad": {"properties": {"EventSource": ["zmq://127.0.0.1:notaport"]}},
        "test/upfault/good": {"properties": {"EventSource": ["sim://?rate=1e3"]}}}}}}}))  # fmt: skip
    host = f"127.0.0.1:{free_port()}"
    try:
        r = run_cli("up", "--config", str(cfg), "--state-dir", str(state), "--tango-host", host)
        assert r.returncode == 4, r.stdout + r.stderr
        assert "Traceback" not in r.stderr, r.stderr
        said = next(ln for ln in r.stdout.splitlines() if "in FAULT:" in ln)
        assert said.startswith("1 device(s) in FAULT: test/upfault/bad ") and "Init the device" in said, said
        row = next(ln for ln in r.stdout.splitlines() if ln.startswith("test/upfault/bad"))
        assert "notaport" in row, row
        site = control.Site.from_state(state)
        assert control.ping(site.url("test/upfault/good")) == "ON"  # nothing was stopped
        r = run_cli("up", "--config", str(cfg), "--state-dir", str(state), "--tango-host", host)
        assert r.returncode == 4 and "already running" in r.stdout, (
            r.stdout + r.stderr
        )  # the same answer again
    finally:
        control.down(state, say=lambda s: None)


def test_up_of_workers_and_a_sum_started_together_exits_0(tmp_path):
    """A HistogramSum starts beside its members and sees them only at its next look: `up` must not
    call that moment's FAULT a broken device (exit 4) in a scaled-out site that works."""
    from livehist.site import control
    from tests.test_scaling import group_config

    state, cfg = tmp_path / "state", tmp_path / "c.json"
    workers = {"upsum-a": ["test/upsum/a"], "upsum-b": ["test/upsum/b"]}
    cfg.write_text(
        json.dumps(group_config(workers, {"EventSource": ["sim://?rate=1e3"]}, "upsum", "test/upsum/sum"))
    )
    try:
        r = run_cli(
            "up", "--config", str(cfg), "--state-dir", str(state), "--tango-host", f"127.0.0.1:{free_port()}"
        )
        assert r.returncode == 0 and "in FAULT" not in r.stdout, r.stdout + r.stderr
        row = next(ln for ln in r.stdout.splitlines() if ln.startswith("test/upsum/sum"))
        assert row.split()[3] == "ON", row
    finally:
        control.down(state, say=lambda s: None)


def test_status_of_a_state_dir_never_used_says_where_it_looked(tmp_path):
    """With no `up` in that folder, status looked at TANGO_HOST (or the default host) and only
    said 'no Tango database answers there': nothing said that it was the wrong folder."""
    env = dict(os.environ, TANGO_HOST=f"127.0.0.1:{free_port()}")
    r = run_cli("status", "--state-dir", str(tmp_path / "never"), env=env)
    assert r.returncode == 1 and "no Tango database answers" in r.stdout, r.stdout + r.stderr
    assert f"no `livehist up` has used {tmp_path / 'never'}, so this looked at TANGO_HOST" in r.stdout, (
        r.stdout
    )
    assert "--state-dir or --tango-host" in r.stdout, r.stdout
    assert not (tmp_path / "never").exists()  # status made nothing there


def test_up_timeout_that_cannot_work_is_refused_before_anything_starts(tmp_path):
    """`up --timeout -1` started every server and then gave up on them at once; nan waited for ever."""
    for bad in ("-1", "0", "nan", "inf"):
        state = tmp_path / f"state{bad}"
        out = run_cli(
            "up", "--timeout", bad, "--state-dir", str(state), "--tango-host", f"127.0.0.1:{free_port()}"
        )
        line = _one_line_error(out, "up")
        assert "--timeout must be a number of seconds > 0" in line and "the default is 90" in line, line
        assert not state.exists(), list(state.rglob("*"))  # no database, no server, no state


def test_view_without_a_display_or_with_bad_seconds_says_so_instead_of_aborting():
    """Without an X display Qt aborted the process (exit 134) with a page of plugin names."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "QT_QPA_PLATFORM", "WAYLAND_DISPLAY")}
    line = _one_line_error(run_cli("view", "--seconds", "1", env=env), "view")
    assert "DISPLAY is not set" in line and "xvfb-run" in line, line
    n = next(k for k in range(300, 400) if not os.path.exists(f"/tmp/.X11-unix/X{k}"))
    line = _one_line_error(run_cli("view", "--seconds", "1", env={**env, "DISPLAY": f":{n}"}), "view")
    assert f"no X server answers on DISPLAY=:{n}" in line, line
    for bad in ("-1", "nan"):
        line = _one_line_error(run_cli("view", "--seconds", bad, env=env), "view")
        assert "--seconds must be a number >= 0" in line, line


def interrupt_up(tmp_path, name: str, sig) -> tuple[str, dict]:
    """Start `livehist up` of a metadata manager and a histogrammer (server instance `name`), send
    `sig` once the histogrammer is started, and check that `up` stopped all it had started.
    Returns up's output and the environment it ran in (no TANGO_HOST)."""
    from livehist.site.process import Managed, managed_processes

    state, cfg = tmp_path / "state", tmp_path / "c.json"
    cfg.write_text(json.dumps({"servers": {
        "MetadataManager": {name: {"MetadataManager": {f"test/{name}/m": {}}}},
        "EventHistogrammer": {name: {"EventHistogrammer": {f"test/{name}/h": {}}}}}}))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TANGO_HOST"}
    argv = [sys.executable, "-m", "livehist.cli", "up", "--config", str(cfg), "--state-dir", str(state),
            "--tango-host", f"127.0.0.1:{free_port()}"]  # fmt: skip
    up = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        seen = []
        for line in up.stdout:
            seen.append(line)
            if line.startswith(f"EventHistogrammer/{name}: started"):
                # frozen, it cannot answer: `up` is surely still waiting for it (under load, `up`
                # had sometimes finished before the signal came)
                os.kill(Managed(state, f"EventHistogrammer-{name}").pid(), signal.SIGSTOP)
                up.send_signal(sig)
                break
        out = "".join(seen) + up.communicate(timeout=60)[0]
    finally:
        if up.poll() is None:
            up.kill()
        for proc in managed_processes(state):  # whatever the outcome, nothing of ours survives the test
            proc.stop(timeout=2)
    assert up.returncode == 130, out
    assert "interrupted: stopped what this `livehist up` had started:" in out, out
    assert "tango-db" in out and f"MetadataManager-{name}" in out and f"EventHistogrammer-{name}" in out, out
    assert not managed_processes(state), [p.name for p in managed_processes(state)]
    return out, env


def test_ctrl_c_during_up_stops_what_it_had_started(tmp_path):
    """Ctrl-C halfway through `up` left the database and the servers started so far running,
    and said only 'interrupted'."""
    _, env = interrupt_up(tmp_path, "ctrlc", signal.SIGINT)
    r = run_cli("status", "--state-dir", str(tmp_path / "state"), env=env)
    assert r.returncode == 1 and "no Tango database answers" in r.stdout, r.stdout


def test_stream_on_any_free_port_says_which_one():
    """`--bind tcp://127.0.0.1:0` (or :*) printed 'on PUSH tcp://127.0.0.1:0', a port nobody can connect to."""
    for bind in ("tcp://127.0.0.1:0", "tcp://127.0.0.1:*"):
        out = run_cli("stream", "sim://?rate=1e3", "--bind", bind, "--seconds", "0.5")
        assert out.returncode == 0, out.stderr
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("publishing"))
        port = line.split(" on PUSH tcp://127.0.0.1:")[1].split()[0]
        assert port.isdigit() and 0 < int(port) < 65536, line


def test_view_on_a_tango_host_that_is_not_tango_says_so_instead_of_hanging(display):  # noqa: F811
    """A TANGO_HOST where a program that does not speak Tango listens: the panel hung for minutes
    (each Taurus widget waiting out its own 9 s timeouts) and never closed after --seconds."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(50)  # accepts, never answers
    port = silent.getsockname()[1]
    try:
        env = dict(os.environ, DISPLAY=display, TANGO_HOST=f"127.0.0.1:{port}", QT_QPA_PLATFORM="xcb")
        t0 = time.monotonic()
        out = run_cli("view", "--seconds", "2", env=env, timeout=60)
        line = _one_line_error(out, "view")
        assert f"127.0.0.1:{port} does not answer as a Tango database" in line and "TANGO_HOST" in line, line
        assert time.monotonic() - t0 < 20
    finally:
        silent.close()


def test_status_on_a_port_taken_by_something_else_does_not_send_the_user_to_up(tmp_path):
    """It said 'no Tango database answers; run `livehist up`', and `up` then refused the port."""
    import socket

    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen(5)  # accepts and never speaks Tango
    port = other.getsockname()[1]
    try:
        r = run_cli("status", "--state-dir", str(tmp_path / "s"), "--tango-host", f"127.0.0.1:{port}")
    finally:
        other.close()
    assert r.returncode == 1 and "is taken by a program that is not a Tango database" in r.stdout, r.stdout
    assert "run `livehist up`" not in r.stdout


@contextlib.contextmanager
def _publishing(messages: list):
    """A PUB on a free port (yielded) publishing `messages` again and again (PUB drops until a
    subscriber has joined) until the block ends."""
    import threading

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def send():
        while not stop.wait(0.05):
            for msg in messages:
                pub.send(msg)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        yield port
    finally:
        stop.set()
        sender.join()
        pub.close(0)
        ctx.term()


def _listen_to(messages: list, count: int) -> list[str]:
    """`listen` in this process (what it says), while `messages` are published again and again."""
    from livehist.components.restream import listen

    said: list[str] = []
    with _publishing(messages) as port:
        listen(f"tcp://127.0.0.1:{port}", count, 20.0, say=said.append)
    return said


def _hs01(info: str = '{"update": 7}', data=None, source: str = "test/h/1/tof") -> bytes:
    from livehist.components.restream import serialise_hs01

    data = np.array([1, 2, 3, 4], np.int64) if data is None else data
    return bytes(serialise_hs01({
        "source": source, "timestamp": 1, "current_shape": [len(data)], "info": info,
        "dim_metadata": [{"length": len(data), "bin_boundaries": np.arange(len(data) + 1.0), "unit": "us",
                          "label": "time_of_flight"}],
        "data": data,
    }))  # fmt: skip


def test_listen_skips_an_hs01_without_data():
    """An hs01 flatbuffer whose data table is absent (valid identifier, garbage after it, or
    another program's half-filled message) is named and skipped: it ended listen in an
    AttributeError traceback."""
    import flatbuffers
    from streaming_data_types.fbschemas.histogram_hs01 import EventHistogram as EH

    builder = flatbuffers.Builder(64)
    name = builder.CreateString("nodata")
    EH.EventHistogramStart(builder)
    EH.EventHistogramAddSource(builder, name)
    builder.Finish(EH.EventHistogramEnd(builder), file_identifier=b"hs01")
    nodata = bytes(builder.Output())
    zeros = b"\0\0\0\0hs01" + bytes(64)
    said = _listen_to([nodata, zeros, _hs01()], 2)
    assert any(f"skipped a message of {len(nodata)} bytes" in s and "has no data" in s for s in said), said
    assert any(f"skipped a message of {len(zeros)} bytes" in s for s in said), said
    assert sum(s.startswith("test/h/1/tof: update 7") for s in said) == 2, said


def test_listen_prints_an_hs01_whose_info_is_not_livehists():
    """hs01's info is free text: another sender's (plain text, a JSON list, an update or event
    count that is not a number) and float data holding NaN are printed without those fields;
    each ended listen in a traceback (JSONDecodeError, AttributeError, TypeError, ValueError)."""
    odd = [
        _hs01(info="hello world", source="a"),
        _hs01(info="[1, 2]", source="b"),
        _hs01(info='{"update": "7", "counters": 5}', source="c"),
        _hs01(info='{"update": "9", "counters": {"events": "many"}}', source="c"),
        _hs01(info='{"update": 2}', data=np.array([1.0, np.nan, np.inf, 2.0]), source="d"),
    ]
    said = _listen_to([*odd, _hs01()], 12)
    for source in "abcd":
        assert any(s.startswith(f"{source}: update ") for s in said), (source, said)
    assert any(s.startswith("test/h/1/tof: update 7") for s in said), said
