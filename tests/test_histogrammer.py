"""The histogrammer component (engine + source + publisher + states) without any Tango DB."""

from __future__ import annotations

import json
import os
import re
import threading
import time

import h5py
import numpy as np
import pytest
import zmq

from livehist.components.histogrammer import Histogrammer, Update
from livehist.engine.events import EventBatch, encode_ev44
from livehist.engine.spec import SpecError
from livehist.errors import LivehistError
from tests.conftest import free_port

TOF = {"name": "tof", "kind": "tof", "tof": {"start": 0, "stop": 71_400_000, "bins": 100}}
IMAGE = {"name": "image", "kind": "image", "pixels": {"first": 1, "shape": [128, 128]}}


class Updates:
    """Collects what the publisher hands to a shell."""

    def __init__(self) -> None:
        self.items: list[Update] = []
        self.cond = threading.Condition()

    def __call__(self, update: Update) -> None:
        with self.cond:
            self.items.append(update)
            self.cond.notify_all()

    def wait(self, pred, timeout: float = 10.0) -> Update:
        with self.cond:
            assert self.cond.wait_for(lambda: any(pred(u) for u in self.items), timeout), self.items[-3:]
            return next(u for u in self.items if pred(u))


def wait_for(pred, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def make():
    made: list[Histogrammer] = []

    def _make(uri: str, hists=(TOF, IMAGE), **kw) -> Histogrammer:
        h = Histogrammer(uri, json.dumps(list(hists)), **kw)
        made.append(h)
        return h

    yield _make
    for h in made:
        h.close()


def test_publishes_while_running_and_final_data_on_stop(make):
    updates = Updates()
    h = make("sim://?rate=2e6&seed=3", publish_period=0.1, on_update=updates)
    assert h.state == "ON" and "Start" in h.status
    h.start()
    assert h.state == "RUNNING"
    first = updates.wait(lambda u: True)
    assert first.configured  # the first publish tells the shell to push edges too
    updates.wait(
        lambda u: u.snapshot.events > 0, timeout=30
    )  # after the kernel's compile (seconds when loaded)
    later = updates.wait(lambda u: u.counter > first.counter + 2)
    assert later.snapshot.events >= first.snapshot.events and not later.configured
    counters = [u.counter for u in updates.items]
    assert counters == sorted(counters) and len(set(counters)) == len(counters)
    h.stop()
    assert h.state == "ON" and "stopped" in h.status
    final = h.last
    assert final.events == h.engine.events > 0
    assert final.counts["tof"].sum() + final.out_of_range["tof"] == final.events
    assert final.counts["image"].sum() + final.out_of_range["image"] == final.events
    updates.wait(lambda u: u.state == "ON" and u.snapshot.events == final.events)
    with pytest.raises(LivehistError, match="PresetTime must be >= 0"):
        h.set_presets(time_s=-1)


def test_preset_ends_running_with_final_data_published(make):
    updates = Updates()
    h = make("sim://?rate=1e6&seed=4", publish_period=0.2, on_update=updates)
    h.set_presets(events=123_457)
    h.start()
    with pytest.raises(LivehistError, match="RUNNING"):
        h.set_presets(events=5)
    with pytest.raises(LivehistError, match="already RUNNING"):
        h.start()
    wait_for(lambda: h.state == "ON", what="preset end")
    assert h.last.events == 123_457 and "preset events reached" in h.status
    updates.wait(lambda u: u.state == "ON" and u.snapshot.events == 123_457)
    h.start()  # the preset counts again from this Start
    wait_for(lambda: h.state == "ON", what="second preset end")
    assert h.last.events == 2 * 123_457


def test_configure_swaps_atomically_and_a_bad_spec_keeps_the_old_list(make):
    h = make("sim://?rate=1e6", publish_period=0.1)
    h.start()
    before = h.config_json()
    for bad, match in [("[{", "not valid JSON"), ('[{"name": "x", "kind": "cube"}]', "kind"),
                       ('[{"name": "t", "kind": "tof", "tof": {"start": 5, "stop": 5, "bins": 3}}]', "stop"),
                       ('[{"name": "i", "kind": "image", "pixels": {"first": 0, "shape": [100000, 100000]}}]',
                        "MiB")]:  # fmt: skip
        with pytest.raises(SpecError, match=match):
            h.configure(bad)
        assert h.config_json() == before and h.state == "RUNNING"
    roi = {"name": "beam", "kind": "roi", "pixels": {"first": 1, "shape": [128, 128]},
           "roi": {"rows": [56, 72], "cols": [56, 72]}, "tof": {"start": 0, "stop": 7.14e7, "bins": 50}}  # fmt: skip
    h.configure([TOF, roi])
    assert set(h.last.counts) == {"tof", "beam"} and h.state == "RUNNING"
    wait_for(lambda: h.last.counts["beam"].sum() > 0, what="roi counts")
    h.stop()


@pytest.mark.parametrize("threads", [0, -1, 65, 2.5, True, "2"])
def test_bad_accumulating_threads_name_the_property(threads):
    with pytest.raises(LivehistError, match=r"AccumulatingThreads must be an integer in 1\.\.64"):
        Histogrammer("sim://", json.dumps([TOF]), threads=threads)


def test_bad_event_source_is_fault_and_start_explains(make):
    h = make("zmq://nohostport")
    assert h.state == "FAULT" and "EventSource" in h.status and "HOST:PORT" in h.status
    with pytest.raises(LivehistError, match="fix the EventSource property"):
        h.start()
    h = make("sim://", hists=[{"name": "t", "kind": "tof", "tof": {"bins": 0}}])
    assert h.state == "FAULT" and "Histograms[0].tof" in h.status
    h.configure([TOF])  # Configure repairs a bad Histograms property
    assert h.state == "ON"
    with pytest.raises(LivehistError, match="PublishPeriod"):
        Histogrammer("sim://", "[]", publish_period=0)


def test_a_slow_consumer_goes_to_alarm_and_counts_every_drop(make, monkeypatch):
    """A consumer slower than its producer by construction, whatever the machine's speed or load.

    The network source gets no grace for a full queue (max_wait 0, normally 0.5 s to absorb a
    burst), the queue holds 2 messages and the sender keeps ZeroMQ's buffers full. Keeping up
    would mean decoding and histogramming 10^6 events (12 histograms of 10^4 explicit edges, a
    binary search per event) in the time the source takes to receive the next buffered message,
    so whole messages are dropped however fast the kernels are.
    """
    from livehist.engine.sources.zmq import ZmqSource

    monkeypatch.setattr(ZmqSource, "max_wait", 0.0)  # a real setting of the source, not a stand-in
    edges = np.cumsum(np.random.default_rng(0).integers(1, 20, 10_001)).tolist()
    slow = [{"name": f"s{i}", "kind": "tof", "tof": {"edges": edges}} for i in range(12)]
    port = free_port()
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 2)
    push.bind(f"tcp://127.0.0.1:{port}")
    h = make(f"zmq://127.0.0.1:{port}", hists=slow, publish_period=0.1, max_queue_items=2)
    h.start()
    rng = np.random.default_rng(1)
    n = 1_000_000
    msg = encode_ev44(EventBatch(rng.integers(0, edges[-1], n, dtype=np.int32), np.ones(n, np.int32),
                                 np.zeros(1, np.int64), np.zeros(1, np.int64)), 0, "slow")  # fmt: skip
    sent, alarm_status = 0, None
    deadline = time.monotonic() + 30  # generous: the machine may be loaded; drops go on until ALARM is seen
    while time.monotonic() < deadline and (h.engine.dropped_messages < 3 or alarm_status is None):
        try:
            push.send(msg, flags=zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            time.sleep(0.01)
        if h.state == "ALARM":
            alarm_status = h.status
    assert alarm_status is not None and "dropping messages" in alarm_status
    e = h.engine
    # the sender stops; every message it sent is histogrammed or counted as dropped, none silently lost
    wait_for(
        lambda: e.messages + e.dropped_messages == sent, timeout=60, what=f"{sent} messages accounted for"
    )
    push.close(linger=0)
    h.stop()
    assert h.state == "ON"
    assert e.dropped_messages >= 3 and e.messages >= 1 and e.bad_messages == 0
    assert e.messages + e.dropped_messages == sent
    assert e.events == e.messages * n  # every message taken was histogrammed whole


def _external_events_file(tmp_path, n_pulses: int = 40, per_pulse: int = 1000):
    """An NXevent_data whose event arrays live in raw files beside it (HDF5 external storage)."""
    rng = np.random.default_rng(5)
    tof = rng.integers(0, 70_000, n_pulses * per_pulse, dtype=np.int32)
    ids = rng.integers(1, 128 * 128 + 1, n_pulses * per_pulse, dtype=np.int32)
    raw_tof, raw_id = tmp_path / "tof.raw", tmp_path / "id.raw"
    tof.tofile(raw_tof)
    ids.tofile(raw_id)
    path = tmp_path / "external.nxs"
    with h5py.File(path, "w") as f:
        g = f.create_group("entry/events")
        g.attrs["NX_class"] = "NXevent_data"
        g.create_dataset(
            "event_time_offset", shape=tof.shape, dtype="i4", external=[(str(raw_tof), 0, tof.nbytes)]
        )
        g["event_time_offset"].attrs["units"] = "us"
        g.create_dataset("event_id", shape=ids.shape, dtype="i4", external=[(str(raw_id), 0, ids.nbytes)])
        g["event_time_zero"] = np.arange(n_pulses) * 0.05
        g["event_time_zero"].attrs["units"] = "s"
        g["event_index"] = np.arange(n_pulses, dtype=np.int64) * per_pulse
    return path, raw_id


def test_a_failing_source_is_fault_then_reconnects_keeping_histograms(make, tmp_path):
    path, raw_id = _external_events_file(tmp_path)
    h = make(f"nexus://{path}?rate=realtime&loop=0", publish_period=0.1,
             reconnect_delays=(0.2, 0.8))  # fmt: skip
    h.start()
    wait_for(lambda: h.last.events > 5000, what="events")
    hidden = raw_id.with_suffix(".gone")
    os.rename(raw_id, hidden)  # the data file vanishes (an unmounted disk, a moved file)
    wait_for(lambda: h.state == "FAULT", what="FAULT")
    assert "failed" in h.status and "reconnecting" in h.status and "histograms kept" in h.status
    kept = h.last.events
    time.sleep(1.0)  # several reconnect attempts fail while the file is away
    assert h.state == "FAULT" and h.last.events >= kept
    os.rename(hidden, raw_id)
    wait_for(lambda: h.state == "RUNNING", what="reconnect")
    wait_for(lambda: h.last.events > kept + 2000, what="events after reconnect")
    h.stop()
    assert h.last.counts["tof"].sum() + h.last.out_of_range["tof"] == h.last.events


US = {"name": "tof", "kind": "tof", "tof": {"start": 0, "stop": 70_000, "bins": 70, "unit": "us"}}


def _file_counts(tmp_path) -> np.ndarray:
    tof = np.fromfile(tmp_path / "tof.raw", np.int32)
    return np.histogram(tof, np.linspace(0, 70_000, 71))[0]


def test_a_replay_stopped_and_started_again_goes_on_without_counting_a_pulse_twice(make, tmp_path):
    """Start after Stop (no Reset) replayed the file from its first pulse: 55,000 events counted
    from a file of 40,000. It goes on where it stopped; after Reset it begins again."""
    path, _ = _external_events_file(tmp_path)  # 40 pulses of 1000 events, 10 Hz
    h = make(f"nexus://{path}?rate=realtime", hists=[US], publish_period=0.1)
    h.start()
    wait_for(lambda: h.last.events >= 5000, what="part of the replay")
    h.stop()
    assert 0 < h.last.events < 40_000
    h.start()
    wait_for(lambda: h.last.events >= 40_000, timeout=30, what="the rest of the replay")
    time.sleep(0.5)  # a replay from the start would go on counting here
    h.stop()
    assert h.last.events == 40_000
    assert np.array_equal(h.last.counts["tof"], _file_counts(tmp_path))
    h.reset()
    h.start()
    wait_for(lambda: h.last.events >= 40_000, timeout=30, what="the replay after Reset")
    h.stop()
    assert h.last.events == 40_000 and np.array_equal(h.last.counts["tof"], _file_counts(tmp_path))


def test_a_replay_reconnected_after_a_failure_goes_on_from_the_pulse_that_failed(make, tmp_path):
    path, raw_id = _external_events_file(tmp_path)
    h = make(f"nexus://{path}?rate=realtime", hists=[US], publish_period=0.1, reconnect_delays=(0.2, 0.8))
    h.start()
    wait_for(lambda: h.last.events >= 5000, what="events")
    hidden = raw_id.with_suffix(".gone")
    os.rename(raw_id, hidden)
    wait_for(lambda: h.state == "FAULT", what="FAULT")
    os.rename(hidden, raw_id)
    wait_for(lambda: h.state == "RUNNING", what="reconnect")
    wait_for(lambda: h.last.events >= 40_000, timeout=30, what="the rest of the replay")
    time.sleep(0.5)
    h.stop()
    assert h.last.events == 40_000  # a reconnect replayed the file from its first pulse
    assert np.array_equal(h.last.counts["tof"], _file_counts(tmp_path))


def _seconds_file(tmp_path, units: str = "s"):
    """An NXevent_data whose event_time_offset is float seconds (a unit ev44 never uses)."""
    rng = np.random.default_rng(9)
    tof = rng.uniform(0, 0.07, 20 * 500)
    ids = rng.integers(1, 128 * 128 + 1, tof.size, dtype=np.int32)
    path = tmp_path / "seconds.nxs"
    with h5py.File(path, "w") as f:
        g = f.create_group("entry/events")
        g.attrs["NX_class"] = "NXevent_data"
        g["event_time_offset"] = tof
        g["event_time_offset"].attrs["units"] = units
        g["event_id"] = ids
        g["event_time_zero"] = np.arange(20) * 0.05
        g["event_time_zero"].attrs["units"] = "s"
        g["event_index"] = np.arange(20, dtype=np.int64) * 500
    return path, tof


def test_a_replay_in_seconds_histograms_like_numpy(make, tmp_path):
    """On main the engine thread died on KeyError: 's' and the device stayed RUNNING with 0 events."""
    path, tof = _seconds_file(tmp_path)
    us = {"name": "tof", "kind": "tof", "tof": {"start": 0, "stop": 70_000, "bins": 700, "unit": "us"}}
    h = make(f"nexus://{path}?rate=max", hists=[us], publish_period=0.1)
    h.set_presets(events=tof.size)
    h.start()
    wait_for(lambda: h.state != "RUNNING", what="the preset")
    assert h.state == "ON", h.status
    assert np.array_equal(h.last.counts["tof"], np.histogram(tof * 1e6, np.linspace(0, 70_000, 701))[0])


def test_any_failure_in_the_accumulating_thread_is_fault_naming_it_and_ends_a_preset(make):
    h = make("sim://?rate=1e5&seed=1", publish_period=0.1)
    h.set_presets(time_s=30)
    h.start()
    wait_for(lambda: h.last.events > 0, what="events")
    one = np.ones(3, np.int32)
    # a batch no histogram can take (an unknown TOF unit): the thread fails on it
    h.engine.feed(EventBatch(one, one, np.zeros(1, np.int64), np.zeros(1, np.int64), "furlongs"), block=True)
    wait_for(lambda: h.state == "FAULT", timeout=10, what="FAULT")  # the 30 s preset ends now
    assert not h.running and "histogramming failed: KeyError: 'furlongs'" in h.status
    assert "histograms kept" in h.status
    kept = h.last.events
    assert kept > 0 and h.last.counts["image"].sum() > 0
    h.stop()  # harmless; the fault stays until the next Start
    assert h.state == "FAULT" and h.last.events == kept
    h.set_presets(time_s=0.3)
    h.start()
    wait_for(lambda: h.state == "ON", what="a clean acquisition after the fault")
    assert h.last.events > kept


def test_a_silent_network_source_says_so_in_status(make):
    port = free_port()  # nothing sends there: ZeroMQ cannot tell a dead peer from a quiet one
    h = make(f"zmq://127.0.0.1:{port}", publish_period=0.1)
    h.start()
    wait_for(lambda: "no message for" in h.status, timeout=15, what="the silence in Status")
    assert h.state == "RUNNING" and "is the sender running?" in h.status
    h.stop()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"publish_period": 1e-6}, "PublishPeriod must be 0.02 to 3600 s"),
     ({"max_queue_bytes": -5}, "MaxQueueBytes must be >= 1048576"),
     ({"max_histogram_bytes": 0}, "MaxHistogramBytes must be > 0"),
     ({"max_queue_bytes": 10**30}, r"MaxQueueBytes must be >= 1048576 \(1 MiB\) and < 2\*\*63, got 10{30}"),
     ({"max_histogram_bytes": 10**30}, r"MaxHistogramBytes must be > 0 and < 2\*\*63"),
     ({"max_histogram_bytes": 100}, "Histograms.0..tof.bins=1000 needs 8008 bytes, over the limit of 100 bytes")],
)  # fmt: skip
def test_bad_numbers_are_refused_naming_them(kwargs, message):
    if "Histograms" in message:  # a bad Histograms property is FAULT with a Status, not an exception
        h = Histogrammer("sim://", [{"name": "t", "kind": "tof", "tof": {"start": 0, "stop": 1, "bins": 1000}}],
                         **kwargs)  # fmt: skip
        assert re.search(message, h.status) and h.state == "FAULT", h.status
        h.close()
        return
    with pytest.raises(LivehistError, match=message):
        Histogrammer("sim://", "[]", **kwargs)


def test_the_memory_cap_counts_staging_and_every_accumulating_thread():
    """MaxHistogramBytes counted only the int64 counts: a 512x512 image (2 MiB of them) passed a
    2 MiB cap while each of 4 threads held its own counts and staging (9 MiB in all)."""
    image = [{"name": "i", "kind": "image", "pixels": {"first": 0, "shape": [512, 512]}}]
    tof = [{"name": "t", "kind": "tof", "tof": {"start": 0, "stop": 1000, "bins": 100}}]
    h = Histogrammer("sim://", image, max_histogram_bytes=2 * 2**20 + 8, threads=4)
    assert h.state == "FAULT", h.status
    assert "Histograms need 9 MiB of memory" in h.status and "4 accumulating threads" in h.status, h.status
    assert "use fewer bins/pixels or AccumulatingThreads, or raise MaxHistogramBytes" in h.status, h.status
    h.close()
    h = Histogrammer("sim://", tof, max_histogram_bytes=3 * 2**20, threads=4)
    assert h.state == "ON", h.status
    with pytest.raises(
        SpecError, match=r"Configure need 9 MiB of memory .* over the MaxHistogramBytes limit of 3 MiB"
    ):
        h.configure(image)
    assert [s.name for s in h.engine.specs] == ["t"]  # nothing changed: the TOF spectrum still there
    h.configure(tof + [{"name": "small", "kind": "image", "pixels": {"first": 0, "shape": [64, 64]}}])
    h.close()


def _pulses_file(path, n_pulses: int, per_pulse: int, seed: int) -> np.ndarray:
    """An NXevent_data file of n_pulses pulses at 10 Hz; returns its TOFs (ns)."""
    rng = np.random.default_rng(seed)
    tof = rng.integers(0, 71_400_000, n_pulses * per_pulse)
    with h5py.File(path, "w") as f:
        g = f.create_group("entry/events")
        g.attrs["NX_class"] = "NXevent_data"
        g["event_id"] = rng.integers(1, 128 * 128 + 1, tof.size)
        g["event_time_offset"] = tof
        g["event_time_offset"].attrs["units"] = "ns"
        g["event_time_zero"] = np.arange(n_pulses) * 0.1
        g["event_time_zero"].attrs["units"] = "s"
        g["event_index"] = np.arange(n_pulses) * per_pulse
    return tof


def test_a_replay_of_a_file_replaced_between_acquisitions_counts_the_new_file(make, tmp_path):
    """The source kept the index read at Init: after the file was replaced, Reset + Start replayed it
    with the old index (a file of 1000 events in 100 pulses counted 100 events in 10 pulses, one of 3
    events counted 3 events in 10 pulses). A replay stopped half-way went on in the new file as if it
    were the old one; it now says so (FAULT) until Stop, Reset and Start replay the new file."""
    path = tmp_path / "run.nxs"
    _pulses_file(path, 10, 10, seed=1)
    h = make(f"nexus://{path}?rate=max", hists=[TOF], publish_period=0.1)
    h.start()
    wait_for(lambda: h.last.events == 100, what="the first file")
    h.stop()
    os.remove(path)
    tof = _pulses_file(path, 100, 10, seed=2)
    h.reset()
    h.start()
    wait_for(lambda: h.engine.source.finished, what="the second file")
    h.stop()
    assert (h.last.events, h.last.pulses) == (1000, 100)
    assert np.array_equal(h.last.counts["tof"], np.histogram(tof, np.linspace(0, 71_400_000, 101))[0])

    slow = make(f"nexus://{path}?rate=realtime", hists=[TOF], publish_period=0.1)
    slow.start()  # 100 pulses at 10 Hz: 10 s; stopped after the first few
    wait_for(lambda: slow.last.pulses >= 2, what="the first pulses")
    slow.stop()
    assert 0 < slow.last.pulses < 100
    os.remove(path)
    tof = _pulses_file(path, 5, 7, seed=3)
    slow.start()
    wait_for(lambda: slow.state == "FAULT", what="FAULT")
    assert "was replaced or rewritten after" in slow.status and "Stop, Reset and Start" in slow.status
    slow.stop()
    slow.reset()
    slow.start()
    wait_for(lambda: slow.last.events == 35 and slow.engine.source.finished, what="the new file")
    slow.stop()
    assert slow.last.pulses == 5
    assert np.array_equal(slow.last.counts["tof"], np.histogram(tof, np.linspace(0, 71_400_000, 101))[0])


def test_a_replay_goes_on_in_a_copy_of_its_file_or_the_file_grown_by_more_pulses(make, tmp_path):
    """A file copied back over itself (a restore from backup), or grown by more pulses (still being
    written), holds the pulses counted so far: the replay goes on from where it stopped, exactly."""
    path = tmp_path / "run.nxs"
    _pulses_file(path, 30, 10, seed=4)
    h = make(f"nexus://{path}?rate=realtime", hists=[TOF], publish_period=0.1)
    h.start()
    wait_for(lambda: h.last.pulses >= 2, what="the first pulses")
    h.stop()
    assert 0 < h.last.pulses < 30
    copy = tmp_path / "copy.nxs"
    copy.write_bytes(path.read_bytes())
    os.replace(copy, path)  # another inode, the same pulses
    h.start()
    wait_for(lambda: h.last.pulses >= 6 or h.state == "FAULT", what="the replay going on")
    assert h.state == "RUNNING", h.status
    h.stop()
    os.remove(path)
    tof = _pulses_file(path, 40, 10, seed=4)  # the same 30 pulses and 10 more
    h.start()
    wait_for(lambda: h.last.events == 400, timeout=30, what="the grown file")
    time.sleep(0.3)
    h.stop()
    assert (h.last.events, h.last.pulses) == (400, 40)
    assert np.array_equal(h.last.counts["tof"], np.histogram(tof, np.linspace(0, 71_400_000, 101))[0])


@pytest.mark.parametrize("scheme", ["zmq", "zmq+sub"])
def test_a_zmq_message_over_max_message_bytes_is_refused_counted_and_the_stream_goes_on(make, scheme):
    """One ZeroMQ message had no size limit: a huge one took all the memory it asked for. Now one over
    max_message_bytes is refused by ZeroMQ itself (ZMQ_MAXMSGSIZE), counted as dropped and named in
    Status, and the source reconnects (libzmq drops that connection for good), so what follows counts."""
    ctx = zmq.Context.instance()
    sender = ctx.socket(zmq.PUSH if scheme == "zmq" else zmq.PUB)
    sender.setsockopt(zmq.SNDTIMEO, 5000)
    port = sender.bind_to_random_port("tcp://127.0.0.1")
    bad = make(f"{scheme}://127.0.0.1:{port}?max_message_bytes=1e9x", hists=[TOF])
    assert bad.state == "FAULT" and "max_message_bytes must be an integer, got '1e9x'" in bad.status
    h = make(f"{scheme}://127.0.0.1:{port}?max_message_bytes=100000", hists=[TOF], publish_period=0.1)
    h.start()

    def ev44(n: int, message_id: int) -> bytes:
        tof = np.full(n, 1000, np.int32)
        return encode_ev44(EventBatch(tof, np.ones(n, np.int32), np.zeros(1, np.int64), np.zeros(1, np.int64)),
                           message_id, "det")  # fmt: skip

    e = h.engine
    if scheme == "zmq+sub":  # a PUB sends nothing before the subscription arrives
        wait_for(
            lambda: sender.send(ev44(10, 0)) or time.sleep(0.1) or e.messages >= 1, what="the subscription"
        )
        time.sleep(0.5)
    base = e.messages
    for i in range(1, 4):
        sender.send(ev44(10, i))
    sender.send(ev44(100_000, 4))  # about 800 kB: over the limit
    wait_for(lambda: e.dropped_messages == 1 and e.messages == base + 3, what="the refused message counted")
    wait_for(lambda: "1 messages over max_message_bytes=100000 refused" in h.status, what="Status naming it")
    assert h.state == "ALARM", h.status
    deadline = time.monotonic() + 20
    while e.messages < base + 6 and time.monotonic() < deadline:  # reconnected: later messages count
        sender.send(ev44(10, 5 + e.messages - base - 3))
        time.sleep(0.2)
    assert e.messages >= base + 6, h.status
    assert e.dropped_messages == 1 and e.bad_messages == 0  # a SUB's message-id gap is not counted twice
    assert e.events == 10 * e.messages
    sender.close(linger=0)
