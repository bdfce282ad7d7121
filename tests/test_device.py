"""EventHistogrammer with a real Tango DB, real server processes and real clients.

One site runs three devices: two in server EventHistogrammer/banks and one in
EventHistogrammer/solo, so devices side by side (in one server and in separate ones) are
exercised by every test here.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import h5py
import numpy as np
import pytest
import tango
import zmq
from streaming_data_types import eventdata_ev42

from livehist.engine.events import EventBatch, encode_ev44
from livehist.site import control
from livehist.site.process import Managed
from tests.conftest import SANS2D, free_port

TOF = {"name": "tof", "kind": "tof", "tof": {"start": 0, "stop": 72_000_000, "bins": 1000}}
IMAGE = {"name": "image", "kind": "image", "pixels": {"first": 1, "shape": [128, 128]}}
DEVICES = {"banks": ["test/hist/a", "test/hist/b"], "solo": ["test/hist/c"]}


def _config() -> dict:
    props = {"EventSource": ["sim://?rate=1e6"], "Histograms": [json.dumps([TOF, IMAGE])],
             "PublishPeriod": ["0.2"]}  # fmt: skip
    return {"servers": {"EventHistogrammer": {
        inst: {"EventHistogrammer": {dev: {"properties": props} for dev in devs}}
        for inst, devs in DEVICES.items()}}}  # fmt: skip


@pytest.fixture(scope="module")
def site(sites) -> control.Site:
    return sites.up(_config())


def proxy(site: control.Site, dev: str) -> tango.DeviceProxy:
    p = tango.DeviceProxy(site.url(dev))
    p.set_timeout_millis(10_000)
    return p


def reinit(p: tango.DeviceProxy, **props) -> None:
    """Set properties in the DB and Init, as an operator would in Jive."""
    p.Stop()
    p.put_property({k: [v] for k, v in props.items()})
    p.Init()


def wait_for(pred, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def desc(exc: pytest.ExceptionInfo) -> str:
    return exc.value.args[0].desc


@pytest.fixture
def dev_a(site):
    p = proxy(site, "test/hist/a")
    yield p
    reinit(p, EventSource="sim://?rate=1e6", Histograms=json.dumps([TOF, IMAGE]))
    p.PresetTime = p.PresetEvents = p.PresetPulses = 0
    p.Reset()


def test_proxy_and_taurus_read_live_histograms_side_by_side(site):
    import taurus

    a, b, c = (proxy(site, d) for d in ("test/hist/a", "test/hist/b", "test/hist/c"))
    for p in (a, b, c):
        assert p.state() == tango.DevState.ON
        p.Reset()
        p.PresetTime = 1.0
        p.Start()
    assert a.state() == tango.DevState.RUNNING
    wait_for(lambda: all(p.state() == tango.DevState.ON for p in (a, b, c)), what="presets to end")
    for p in (a, b, c):
        events = p.EventCount
        assert 0.7e6 < events < 1.6e6, events
        assert p.tof.dtype == np.int64 and p.tof.shape == (1000,)
        assert p.image.shape == (128, 128)
        # no event is outside these ranges, so every histogram holds every event
        assert p.tof.sum() == p.image.sum() == events
        assert np.allclose(p.tof_edges, np.linspace(0, 72_000_000, 1001))
        assert "preset time reached" in p.status()
        config = p.get_attribute_config("tof")
        # max dims are one generous bound for every shape (see devices/histogrammer.py); the value has the shape
        assert (
            config.unit == "counts" and config.max_dim_x == 2**31 - 1 and "TOF spectrum" in config.description
        )
        assert p.get_attribute_config("tof_edges").unit == "ns"
    host, port = site.host_port
    t = taurus.Attribute(f"tango://{host}:{port}/test/hist/c/tof")
    assert np.array_equal(np.asarray(t.read().rvalue.magnitude), c.tof)
    assert (
        taurus.Attribute(f"tango://{host}:{port}/test/hist/c/EventCount").read().rvalue.magnitude
        == c.EventCount
    )


def test_sans2d_replay_through_the_device_equals_numpy(dev_a):
    hists = [{"name": "tof", "kind": "tof", "tof": {"start": 0, "stop": 100000, "bins": 500, "unit": "us"}},
             {"name": "image", "kind": "image", "pixels": {"first": 1, "shape": [1024, 121]}}]  # fmt: skip
    reinit(dev_a, EventSource=f"nexus://{SANS2D}?rate=max", Histograms=json.dumps(hists))
    assert dev_a.state() == tango.DevState.ON, dev_a.status()
    dev_a.Start()
    wait_for(lambda: dev_a.EventCount == 237_078, what="the whole file")
    time.sleep(0.5)
    assert dev_a.state() == tango.DevState.RUNNING  # a finished replay waits for Stop or a preset
    assert "replay finished" in dev_a.status()
    dev_a.Stop()
    with h5py.File(SANS2D) as f:
        g = f["/raw_data_1/detector_1_events"]
        tof, pid = g["event_time_offset"][()], g["event_id"][()]
    assert np.array_equal(dev_a.tof, np.histogram(tof, np.linspace(0, 100000, 501))[0])
    assert np.array_equal(dev_a.image.ravel(), np.bincount(pid - 1, minlength=1024 * 121)[: 1024 * 121])
    assert dev_a.PulseCount == 300 and dev_a.BadMessageCount == dev_a.DroppedMessageCount == 0


def test_zmq_exact_counts_with_malformed_messages_and_change_events(dev_a):
    port = free_port()
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.bind(f"tcp://127.0.0.1:{port}")
    reinit(dev_a, EventSource=f"zmq://127.0.0.1:{port}")
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def on_event(ev):
        if not ev.err:
            with lock:
                seen.append((int(ev.attr_value.value.sum()), time.monotonic()))

    ready: list[int] = []
    sub = dev_a.subscribe_event("tof", tango.EventType.CHANGE_EVENT, on_event)
    sub_ready = dev_a.subscribe_event("tof", tango.EventType.DATA_READY_EVENT,
                                      lambda ev: ready.append(ev.ctr) if not ev.err else None)  # fmt: skip
    archived: list[int] = []  # counters reach an archiver (HDB++ subscribes to archive events)
    sub_archive = dev_a.subscribe_event("EventCount", tango.EventType.ARCHIVE_EVENT,
                                        lambda ev: archived.append(ev.attr_value.value) if not ev.err else None)  # fmt: skip
    try:
        dev_a.Reset()
        dev_a.Start()
        rng = np.random.default_rng(11)
        sent, tofs = 0, []
        for i in range(60):
            n = int(rng.integers(1, 5000))
            good = EventBatch(rng.integers(0, 72_000_000, n, dtype=np.int32), rng.integers(1, 16385, n, dtype=np.int32),
                              np.array([i * 10, i * 10 + 5], np.int64), np.array([0, n // 2], np.int64))  # fmt: skip
            push.send(encode_ev44(good, i))
            sent += n
            tofs.append(good.tof)
            push.send([b"", b"\x00" * 3, rng.bytes(3000), encode_ev44(good, i)[:-40]][i % 4])
            if i % 20 == 0:
                time.sleep(0.3)  # a few publishes while data arrives
        push.send(bytes(eventdata_ev42.serialise_ev42("d", 1, 5, np.arange(7), np.arange(1, 8))))
        sent += 7
        tofs.append(np.arange(7))
        wait_for(lambda: dev_a.MessageCount == 121, what="all messages")
        assert dev_a.state() == tango.DevState.RUNNING
        assert dev_a.EventCount == sent and dev_a.BadMessageCount == 60 and dev_a.DroppedMessageCount == 0
        expected = np.histogram(np.concatenate(tofs), np.linspace(0, 72_000_000, 1001))[0]
        assert np.array_equal(dev_a.tof, expected)
        wait_for(lambda: seen and seen[-1][0] == sent, what="a change event with every event")
        sums = [s for s, _ in seen]
        assert len(set(sums)) >= 3 and sums == sorted(sums)  # several live updates, never going back
        assert len(ready) >= 3 and ready == sorted(ready)
        wait_for(lambda: archived and archived[-1] == sent, what="an archive event with every event")
        assert len(set(archived)) >= 3 and archived == sorted(archived)
    finally:
        dev_a.unsubscribe_event(sub)
        dev_a.unsubscribe_event(sub_ready)
        dev_a.unsubscribe_event(sub_archive)
        push.close(0)


def test_configure_while_running_and_bad_input_keep_the_device_usable(dev_a):
    dev_a.Start()
    wait_for(lambda: dev_a.EventCount > 0, what="events")
    bad = [
        ("[{", "not valid JSON"),
        ('[{"name": "x", "kind": "cube"}]', "Configure[0].kind"),
        ('[{"name": "t", "kind": "tof", "tof": {"start": 0, "stop": 10, "bins": 0}}]', "bins must be > 0"),
        ('[{"name": "t", "kind": "tof", "tof": {"start": 10, "stop": 10, "bins": 5}}]', "stop"),
        (
            '[{"name": "i", "kind": "image", "pixels": {"first": 1, "shape": [60000, 60000]}}]',
            "over the limit",
        ),
        ('[{"name": "EventCount", "kind": "tof", "tof": {"start": 0, "stop": 1, "bins": 1}}]', "EventCount"),
    ]
    for spec, message in bad:
        with pytest.raises(tango.DevFailed) as exc:
            dev_a.Configure(spec)
        assert message in desc(exc) and "previous histograms keep running" in desc(exc)
    assert dev_a.state() == tango.DevState.RUNNING and json.loads(dev_a.HistogramConfig) == [TOF, IMAGE]
    with pytest.raises(tango.DevFailed) as exc:
        dev_a.PresetTime = -2
    assert "PresetTime must be >= 0" in desc(exc)
    with pytest.raises(tango.DevFailed) as exc:
        dev_a.PresetEvents = 10
    assert "Stop first" in desc(exc)
    with pytest.raises(tango.DevFailed) as exc:
        dev_a.Start()
    assert "not allowed in RUNNING" in desc(exc)
    before = dev_a.EventCount
    roi = {"name": "beam", "kind": "roi", "pixels": {"first": 1, "shape": [128, 128]},
           "roi": {"rows": [56, 72], "cols": [56, 72]}, "tof": {"start": 0, "stop": 72_000_000, "bins": 50}}  # fmt: skip
    dev_a.Configure(json.dumps([TOF, roi]))
    attrs = set(dev_a.get_attribute_list())
    assert {"tof", "beam", "beam_edges", "beam_total"} <= attrs and "image" not in attrs
    wait_for(lambda: dev_a.beam_total > 0, what="roi counts")
    assert dev_a.beam_total == dev_a.beam.sum() and dev_a.EventCount >= before  # counters went on
    dev_a.Stop()
    with pytest.raises(tango.DevFailed) as exc:
        dev_a.PresetEvents = -1
    assert "PresetEvents must be >= 0" in desc(exc)
    reinit(dev_a, EventSource="kafka-ish://x")
    assert dev_a.state() == tango.DevState.FAULT and "unknown scheme" in dev_a.status()
    with pytest.raises(tango.DevFailed) as exc:
        dev_a.Start()
    assert "fix the EventSource property" in desc(exc)


def test_restart_brings_back_the_configuration_from_the_database(site):
    c = proxy(site, "test/hist/c")
    log_tof = {"name": "logtof", "kind": "tof",
               "tof": {"start": 1000, "stop": 72_000_000, "bins": 64, "scale": "log"}}  # fmt: skip
    c.Configure(json.dumps([log_tof]))
    proc = Managed(site.state_dir, "EventHistogrammer-solo")
    pid = proc.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: control.ping(site.url("test/hist/c"), 500) is None, what="the server to die")
    control.up(site.tango_host, site.config_path, site.state_dir, say=lambda s: None)
    c = proxy(site, "test/hist/c")
    assert json.loads(c.HistogramConfig) == [log_tof]
    assert "logtof" in c.get_attribute_list() and "tof" not in c.get_attribute_list()
    c.PresetTime = 0.5
    c.Start()
    wait_for(lambda: c.state() == tango.DevState.ON, what="preset")
    assert c.logtof.sum() > 0 and np.allclose(c.logtof_edges, np.geomspace(1000, 72_000_000, 65))
    c.Configure(json.dumps([TOF, IMAGE]))  # leave it as the other tests expect


def test_devices_in_one_server_keep_their_own_shapes_for_one_name(site):
    """Tango shares attribute definitions class-wide; each device must still get its own dims."""
    a, b = proxy(site, "test/hist/a"), proxy(site, "test/hist/b")
    wide = {"name": "image", "kind": "image", "pixels": {"first": 1, "shape": [64, 256]}}
    try:
        a.Configure(json.dumps([TOF, wide]))
        for p in (a, b):
            p.Reset()
            p.PresetTime = 0.3
            p.Start()
        wait_for(lambda: a.state() == b.state() == tango.DevState.ON, what="presets")
        assert a.image.shape == (64, 256) and json.loads(a.HistogramConfig)[1] == wide
        assert b.image.shape == (128, 128) and json.loads(b.HistogramConfig)[1] == IMAGE
        b.Configure(json.dumps([TOF]))  # b drops the shared name, a keeps it
        assert "image" not in b.get_attribute_list() and a.image.shape == (64, 256)
    finally:
        a.Configure(json.dumps([TOF, IMAGE]))
        b.Configure(json.dumps([TOF, IMAGE]))
    assert a.image.shape == b.image.shape == (128, 128)


def test_accumulating_threads_property(dev_a):
    """AccumulatingThreads: a bad value is FAULT naming it; 2 threads count exactly what 1 would."""
    try:
        reinit(dev_a, AccumulatingThreads="0")
        assert dev_a.state() == tango.DevState.FAULT
        assert "AccumulatingThreads must be an integer in 1..64 (1 = the default), got 0" in dev_a.status()
        with pytest.raises(tango.DevFailed) as exc:  # a preset on a FAULT device names the fault
            dev_a.PresetTime = 1.0
        assert "AccumulatingThreads must be an integer" in exc.value.args[0].desc
        reinit(dev_a, AccumulatingThreads="2", EventSource="sim://?rate=3e7&seed=4")  # 2e6 events per pulse
        dev_a.Reset()
        dev_a.Start()
        wait_for(lambda: dev_a.EventCount > 5_000_000, what="events with 2 accumulating threads")
        dev_a.Stop()
        image, tof = dev_a.image, dev_a.tof
        assert image.sum() == dev_a.EventCount  # every simulated pixel lies in the image
        assert 0 < tof.sum() <= dev_a.EventCount
    finally:
        reinit(dev_a, AccumulatingThreads="1")


def test_servers_leave_a_python_stack_in_their_log_if_native_code_crashes(site):
    """faulthandler is on in every server we start: a segfault in cppTango or numba names the
    Python line of every thread in logs/<server>.log instead of leaving only a dmesg line."""
    pid = Managed(site.state_dir, "EventHistogrammer-banks").pid()
    environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    assert b"PYTHONFAULTHANDLER=1" in environ


def test_concurrent_configure_and_init_of_two_devices_in_one_server_leave_both_usable(site):
    """Tango shares attribute definitions per class and server, and commands of different
    devices run at once: Configure and Init storms on two devices of one server, with names
    that clash in kind, must leave both devices repairable by Init and publishing."""
    a, b = proxy(site, "test/hist/a"), proxy(site, "test/hist/b")
    specs = [
        [TOF, IMAGE],
        [{**IMAGE, "name": "tof"}, {**TOF, "name": "image"}],  # the same names, the other format
        [{**TOF, "name": "h0"}],
        [{**IMAGE, "name": "h0"}, {**TOF, "name": "h1", "tof": {**TOF["tof"], "bins": 5}}],
        [{"name": "h1", "kind": "roi", "pixels": {"first": 1, "shape": [128, 128]},
          "roi": {"rows": [0, 64], "cols": [0, 64]}, "tof": {"start": 0, "stop": 72_000_000, "bins": 50}}],
    ]  # fmt: skip
    stop = threading.Event()
    refused: list[str] = []
    unexpected: list[str] = []

    def storm(p: tango.DeviceProxy, seed: int) -> None:
        i = seed
        while not stop.is_set():
            i += 1
            try:
                if i % 7 == 0:
                    p.put_property({"Histograms": [json.dumps(specs[i % len(specs)])]})
                    p.Init()
                else:
                    p.Configure(json.dumps(specs[i % len(specs)]))
            except tango.DevFailed as exc:  # a clash with the sibling is refused and named
                (refused if "already a" in exc.args[0].desc else unexpected).append(exc.args[0].desc)

    for p in (a, b):
        p.Start()
    threads = [threading.Thread(target=storm, args=(p, k)) for k, p in enumerate((a, b, a, b))]
    for t in threads:
        t.start()
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join(30)
    try:
        assert not unexpected, unexpected[:5]
        for p, name in ((a, "a_only"), (b, "b_only"), (a, "tof"), (b, "tof")):  # no name the sibling holds
            reinit(p, Histograms=json.dumps([{**TOF, "name": name}]))
            assert p.state() == tango.DevState.ON, p.status()
        for p in (a, b):
            reinit(p, Histograms=json.dumps([TOF, IMAGE]))
            assert p.state() == tango.DevState.ON, p.status()
            assert {"tof", "tof_edges", "image"} <= set(p.get_attribute_list())
            p.Reset()
            p.PresetTime = 0.3
            p.Start()
        wait_for(lambda: a.state() == b.state() == tango.DevState.ON, what="presets after the storm")
        for p in (a, b):
            assert p.tof.sum() == p.image.sum() == p.EventCount > 0
    finally:
        for p, name in ((a, "a_only"), (b, "b_only"), (a, "tof"), (b, "tof")):
            reinit(p, Histograms=json.dumps([{**TOF, "name": name}]))
        for p in (a, b):
            reinit(p, Histograms=json.dumps([TOF, IMAGE]))
            p.PresetTime = 0


def test_init_with_a_source_too_big_to_build_says_fault_and_why(dev_a):
    """A simulator model that cannot be allocated: FAULT naming it, never an UNKNOWN CORBA error
    from Init and a device claiming ON that refuses Start."""
    dev_a.Stop()
    dev_a.put_property({"EventSource": ["sim://?shape=100000x100000"]})
    dev_a.Init()  # raised "UNKNOWN CORBA system exception" (MemoryError)
    assert dev_a.state() == tango.DevState.FAULT and "shape must be NYxNX" in dev_a.status()
    for uri, message in [("sim://?rate=inf", "rate must be a finite number"),
                         ("sim://?peaks=-5", "peaks must be TOFs in ms (> 0)")]:  # fmt: skip
        dev_a.put_property({"EventSource": [uri]})
        dev_a.Init()
        assert dev_a.state() == tango.DevState.FAULT and message in dev_a.status(), dev_a.status()


def test_event_source_uri_beyond_latin1_reads(dev_a, tmp_path):
    """A replay of a file named beyond Latin-1 runs; reading EventSourceURI failed with UnicodeError."""
    odd = tmp_path / "数据.nxs"
    odd.symlink_to(SANS2D)
    dev_a.Stop()
    dev_a.put_property({"EventSource": [f"nexus://{odd}?rate=max"]})
    dev_a.Init()
    assert dev_a.state() == tango.DevState.ON, dev_a.status()
    # livehist's lossless escapes
    assert dev_a.EventSourceURI == f"nexus://{tmp_path}/\\u6570\\u636e.nxs?rate=max"
    dev_a.Start()
    wait_for(lambda: dev_a.EventCount == 237078, what="the replay")


def test_a_status_beyond_latin1_is_pushed_escaped_and_the_counters_go_on(dev_a, tmp_path):
    """A Status beyond Latin-1 (a replayed file named so) could not be pushed (UnicodeError): that
    ended each publish, so the counters' change events stopped with it. Status now carries such
    characters as \\u escapes, like EventSourceURI: its change events arrive, and nothing fails."""
    odd = tmp_path / "数据.nxs"
    odd.symlink_to(SANS2D)
    reinit(dev_a, EventSource=f"nexus://{odd}?rate=realtime&loop=0")
    assert dev_a.state() == tango.DevState.ON, dev_a.status()
    seen, statuses = [], []
    sub = dev_a.subscribe_event("EventCount", tango.EventType.CHANGE_EVENT,
                                lambda ev: None if ev.err else seen.append(ev.attr_value.value))  # fmt: skip
    sub_status = dev_a.subscribe_event("Status", tango.EventType.CHANGE_EVENT,
                                       lambda ev: None if ev.err else statuses.append(ev.attr_value.value))  # fmt: skip
    try:
        dev_a.Start()
        wait_for(lambda: len({v for v in seen if v > 0}) >= 3, what="EventCount change events")
        wait_for(
            lambda: any("\\u6570\\u636e.nxs" in s for s in statuses), what="a Status event naming the file"
        )
        assert dev_a.PushFailedCount == 0, dev_a.status()
        assert "\\u6570\\u636e.nxs" in dev_a.status() and "not sent" not in dev_a.status(), dev_a.status()
    finally:
        dev_a.unsubscribe_event(sub)
        dev_a.unsubscribe_event(sub_status)
        dev_a.Stop()


def test_push_failures_are_counted_named_and_forgotten(monkeypatch):
    """What a failed push leaves: a count, the attribute and the error in Status while recent."""
    from livehist.devices import events as device_events

    clock = [100.0]
    monkeypatch.setattr(device_events.time, "monotonic", lambda: clock[0])
    failures = device_events.PushFailures()
    assert failures.note() == ""
    failures.record("Status", UnicodeError("'latin-1' codec can't encode"))
    failures.record("Status", UnicodeError("'latin-1' codec can't encode"))
    failures.record("tof", ValueError("x" * 500))
    assert failures.count == 3
    note = failures.note()
    assert "change events of Status not sent (UnicodeError: 'latin-1' codec can't encode), 2 times" in note
    assert "change events of tof not sent (ValueError: " in note and len(note) < 600, note
    clock[0] += failures.RECENT + 1
    assert failures.note() == "" and failures.count == 3
