"""Scaling out (issue 19): three consumer-group workers in two servers and a HistogramSum over a
6-partition topic on a real Kafka-protocol broker (Tansu); a worker server SIGKILLed
mid-stream and brought back with `livehist up`; the sum must still equal numpy of
everything produced, with no message lost or counted twice."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import tango
from confluent_kafka import Producer

from livehist.engine.events import EventBatch, encode_ev44
from livehist.site import control
from livehist.site.process import Managed
from tests.conftest import kafka_topic

PARTITIONS = 6
TOF = {"name": "tof", "kind": "tof", "tof": {"start": 0, "stop": 70_000_000, "bins": 350}}
IMAGE = {"name": "image", "kind": "image", "pixels": {"first": 0, "shape": [32, 32]}}
WORKERS = {"ga": ["test/kw/1", "test/kw/2"], "gb": ["test/kw/3"]}
T0 = 1_763_800_000_000_000_000
PULSE = 71_428_571


def wait_for(pred, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def proxy(site, dev: str) -> tango.DeviceProxy:
    p = tango.DeviceProxy(site.url(dev))
    p.set_timeout_millis(10_000)
    return p


@pytest.fixture(scope="module")
def group_site(sites, kafka_broker):
    topic = kafka_topic(kafka_broker, PARTITIONS)
    uri = f"kafka://{kafka_broker}/{topic}?group=g-{topic}&start=earliest"
    props = {"EventSource": [uri], "Histograms": [json.dumps([TOF, IMAGE])], "PublishPeriod": ["0.3"]}
    return sites.up(group_config(WORKERS, props, "scale", "test/ksum/1")), topic


def paced_producer(broker: str, topic: str, partitions: int, messages: int, seed: int):
    """A started thread producing `messages` ev44 messages of 200-2000 events, 50 a second,
    round-robin over the partitions; and the list of the batches sent (filled as it goes)."""
    producer = Producer({"bootstrap.servers": broker, "linger.ms": 5})
    sent: list[EventBatch] = []
    rng = np.random.default_rng(seed)

    def produce() -> None:
        for i in range(messages):
            n = int(rng.integers(200, 2000))
            b = EventBatch(rng.integers(0, 70_000_000, n, dtype=np.int32), rng.integers(0, 1024, n, dtype=np.int32),
                           np.array([T0 + i * PULSE], np.int64), np.array([0], np.int64))  # fmt: skip
            producer.produce(topic, encode_ev44(b, i, "det"), partition=i % partitions)
            sent.append(b)
            producer.poll(0)
            time.sleep(0.02)
        producer.flush(30)

    t = threading.Thread(target=produce)
    t.start()
    return t, sent


def group_config(workers: dict[str, list[str]], props: dict, sum_server: str, sum_device: str) -> dict:
    """Worker servers (server -> its devices, all with `props`) and a HistogramSum over them all."""
    members = [d for devs in workers.values() for d in devs]
    return {"servers": {
        "EventHistogrammer": {s: {"EventHistogrammer": {d: {"properties": props} for d in devs}}
                              for s, devs in workers.items()},
        "HistogramSum": {sum_server: {"HistogramSum": {sum_device: {"properties": {
            "Members": members, "PublishPeriod": ["0.3"]}}}}},
    }}  # fmt: skip


def test_three_workers_and_a_sum_stay_exact_across_a_sigkill(group_site, kafka_broker, tmp_path):
    site, topic = group_site
    s = proxy(site, "test/ksum/1")
    workers = {d: proxy(site, d) for devs in WORKERS.values() for d in devs}
    wait_for(lambda: s.state() == tango.DevState.ON, what=f"the sum: {s.status()}")
    s.Start()
    # the group settles (every worker gets partitions) before the data comes
    wait_for(lambda: all(json.loads(w.KafkaOffsets)["assigned"] for w in workers.values()), timeout=60,
             what="every worker to get partitions")  # fmt: skip
    messages = 600
    t, sent = paced_producer(kafka_broker, topic, PARTITIONS, messages, seed=16)  # ~12 s of stream
    try:
        wait_for(
            lambda: workers["test/kw/3"].EventCount > 0 and len(sent) > messages // 3, what="kw/3 at work"
        )
        pid = Managed(site.state_dir, "EventHistogrammer-gb").pid()
        os.kill(pid, signal.SIGKILL)  # mid-stream
        wait_for(lambda: "test/kw/3" in s.status(), what="the sum to name the dead worker")
        assert s.state() == tango.DevState.ALARM
        control.up(site.tango_host, site.config_path, site.state_dir, say=lambda x: None)
    finally:
        t.join()
    total = sum(len(b) for b in sent)
    wait_for(lambda: s.EventCount >= total and s.state() == tango.DevState.RUNNING, timeout=90,
             what=f"the sum to reach every event ({total})")  # fmt: skip
    time.sleep(2.0)  # anything counted twice would show now
    s.Stop()
    counted = s.EventCount
    tof = np.concatenate([b.tof for b in sent])
    pix = np.concatenate([b.pixel_id for b in sent])
    per_worker = {d: w.EventCount for d, w in workers.items()}
    print(f"\nproduced {total} events in {messages} messages; counted {counted} in {s.MessageCount} messages; "
          f"lost/duplicated messages: {messages - s.MessageCount}; per worker {per_worker}")  # fmt: skip
    assert s.MessageCount == messages and counted == total
    assert np.array_equal(s.tof, np.histogram(tof, np.linspace(0, 70_000_000, 351))[0])
    assert np.array_equal(s.image.ravel(), np.bincount(pix, minlength=1024))
    assert all(n > 0 for n in per_worker.values()), per_worker
    prov = json.loads(s.Provenance)
    covered = {}
    for member in prov["members"].values():
        for part, (first, last) in member["offsets"].items():
            covered.setdefault(part, []).append((first, last))
    assert sorted(covered) == sorted(f"{topic}/{p}" for p in range(PARTITIONS))
    # a NeXus snapshot of the sum names the members and the offsets each one counted
    import h5py

    from livehist.components.capture import record_histograms

    record_histograms(s, [tmp_path / "sum.nxs"], "sum snapshot", 1)
    notes = []
    with h5py.File(tmp_path / "sum.nxs") as f:
        f.visititems(lambda n, o: notes.append(o[()]) if n.endswith("notes/data") else None)
    config = json.loads(notes[0])["config"]
    assert config["Members"] == list(workers)
    assert config["provenance"]["members"]["test/kw/3"]["offsets"]


def _events(n: int, seed: int) -> EventBatch:
    rng = np.random.default_rng(seed)
    return EventBatch(rng.integers(0, 70_000_000, n, dtype=np.int32), rng.integers(0, 1024, n, dtype=np.int32),
                      np.array([T0 + seed * PULSE], np.int64), np.array([0], np.int64))  # fmt: skip


def _send(producer, topic: str, batches: list[EventBatch], first: int = 0, partitions: int = 2) -> None:
    """Message i (numbered from `first`) to partition i % partitions, all acknowledged."""
    for i, b in enumerate(batches, first):
        producer.produce(topic, encode_ev44(b, i), partition=i % partitions)
    producer.flush(30)


def _crash(h) -> None:
    """As SIGKILL leaves a worker: nothing more written, no hand-over, no commit."""
    h.checkpoint = None
    h._source.handover = None
    h.close()


def test_a_worker_restarts_from_its_checkpoint_and_refuses_foreign_or_damaged_ones(kafka_broker, tmp_path):
    from livehist.components.checkpoint import path_for
    from livehist.components.histogrammer import Histogrammer

    topic = kafka_topic(kafka_broker, 2)
    uri = f"kafka://{kafka_broker}/{topic}?group=g-{topic}&start=earliest"
    hists = json.dumps([TOF, IMAGE])
    path = path_for("test/ck/1", tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PK\x03\x04 not a checkpoint")  # damaged: set aside, the worker starts anyway
    h1 = Histogrammer(uri, hists, publish_period=0.2, name="test/ck/1", checkpoint_dir=str(tmp_path))
    assert h1.state == "ON" and path.with_suffix(".damaged").exists()
    producer = Producer({"bootstrap.servers": kafka_broker})
    sent = [_events(500 + i, i) for i in range(20)]
    _send(producer, topic, sent[:10])
    h1.start()
    wait_for(lambda: h1.engine.events == sum(len(b) for b in sent[:10]), what="the first half")
    wait_for(lambda: path.exists() and h1.checkpoint.written >= 2, what="a checkpoint")
    time.sleep(0.5)  # a publish (checkpoint + commit) after the last message
    _crash(h1)
    _send(producer, topic, sent[10:], 10)
    # a write SIGKILLed before its rename left its temporary file: the restart removes it, not
    # another worker's (whose write may be under way)
    left, theirs = path.parent / f"{path.name}k1ll3d.tmp", path.parent / f"{path.name[:-4]}0.npzabc.tmp"
    left.write_bytes(b"half")
    theirs.write_bytes(b"half")
    h2 = Histogrammer(uri, hists, publish_period=0.2, name="test/ck/1", checkpoint_dir=str(tmp_path))
    try:
        assert not left.exists() and theirs.exists()
        assert h2.running  # it was acquiring: it goes on
        total = sum(len(b) for b in sent)
        wait_for(lambda: h2.engine.events >= total, what="everything")
        time.sleep(1.0)
        snap = h2.engine.snapshot()
        assert snap.events == total and snap.messages == 20  # nothing lost, nothing twice
        tof = np.concatenate([b.tof for b in sent])
        assert np.array_equal(snap.counts["tof"], np.histogram(tof, np.linspace(0, 70_000_000, 351))[0])
    finally:
        h2.close()
    other = Histogrammer(uri.replace("group=", "group=other-"), hists, name="test/ck/1",
                         checkpoint_dir=str(tmp_path))  # fmt: skip
    try:  # another group's checkpoint is not loaded: set aside, named
        assert other.engine.events == 0 and path.with_suffix(".stale").exists()
    finally:
        other.close()


def test_a_survivor_starts_after_what_a_killed_worker_checkpointed_but_never_committed(
    kafka_broker, tmp_path
):
    """The window of issue 19's test: a worker killed after its checkpoint is renamed and before its
    commit reaches the broker. Its partitions go to a survivor, which must read on from the
    checkpoint (the killed worker adds those counts back when it restarts), not from the commit."""
    from livehist.components.histogrammer import Histogrammer

    topic = kafka_topic(kafka_broker, 2)
    uri = f"kafka://{kafka_broker}/{topic}?group=g-{topic}&start=earliest"
    hists = json.dumps([TOF, IMAGE])
    producer = Producer({"bootstrap.servers": kafka_broker})
    sent = [_events(300 + i, 100 + i) for i in range(20)]
    _send(producer, topic, sent[:10])
    a = Histogrammer(uri, hists, publish_period=0.2, name="test/ck/a", checkpoint_dir=str(tmp_path))
    a.start()
    a._source.commit = lambda *args, **kw: None  # the kill comes before any commit reaches the broker
    wait_for(lambda: a.engine.events == sum(len(b) for b in sent[:10]), what="the first half")
    first = sum(len(b) for b in sent[:10])
    wait_for(lambda: a.checkpoint.read()["counters"]["events"] == first, what="a checkpoint of it")
    _crash(a)
    _send(producer, topic, sent[10:], 10)
    b = Histogrammer(uri, hists, publish_period=0.2, name="test/ck/b", checkpoint_dir=str(tmp_path))
    a2 = None
    try:
        b.start()
        total = sum(len(x) for x in sent)
        wait_for(lambda: b.engine.events >= total - first, what="the survivor to read the second half")
        time.sleep(1.0)  # anything counted twice would show now
        assert b.engine.messages == 10 and b.engine.events == total - first
        notes = " ".join(b._source.notes)
        assert "test_ck_a" in notes and "did not land" in notes, notes
        # the killed worker comes back: its checkpoint goes into the total, nothing twice
        a2 = Histogrammer(uri, hists, publish_period=0.2, name="test/ck/a", checkpoint_dir=str(tmp_path))
        assert a2.running
        time.sleep(2.0)  # a rebalance between the two; nothing is left to read
        sa, sb = a2.engine.snapshot(), b.engine.snapshot()
        assert sa.messages + sb.messages == 20 and sa.events + sb.events == total
        tof = np.concatenate([x.tof for x in sent])
        want = np.histogram(tof, np.linspace(0, 70_000_000, 351))[0]
        assert np.array_equal(sa.counts["tof"] + sb.counts["tof"], want)
    finally:
        b.close()
        if a2 is not None:
            a2.close()


def test_the_group_checkpoints_a_survivor_trusts_and_those_it_does_not(kafka_broker, tmp_path):
    """A checkpoint past a partition's end (a topic made anew), one of a worker that stopped in
    order (it committed), another group's, and a file that is not a checkpoint: none moves where
    a worker starts; each partition is read from its start here (no commit, start=earliest)."""
    from livehist.components.checkpoint import group_offsets, path_for
    from livehist.components.histogrammer import Histogrammer

    topic = kafka_topic(kafka_broker, 2)
    uri = f"kafka://{kafka_broker}/{topic}?group=g-{topic}&start=earliest"

    def fake(device: str, uri: str, running: bool, last: int) -> None:
        meta = {
            "version": 1,
            "uri": uri,
            "running": running,
            "offsets": [[topic, 0, 0, last], [topic, 1, 0, last]],
        }
        path = path_for(device, tmp_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))

    fake("test/old/1", uri, True, 10**6)  # past the end: the topic was made anew
    fake("test/done/1", uri, False, 3)  # stopped in order: its commit says it all
    fake("test/other/1", uri.replace("group=", "group=x-"), True, 3)  # another group
    path_for("test/junk/1", tmp_path).write_bytes(b"not a zip")
    assert group_offsets(tmp_path, uri) == {
        (topic, 0): (10**6 + 1, "test_old_1"),
        (topic, 1): (10**6 + 1, "test_old_1"),
    }
    producer = Producer({"bootstrap.servers": kafka_broker})
    sent = [_events(100 + i, 200 + i) for i in range(8)]
    _send(producer, topic, sent)
    w = Histogrammer(
        uri, json.dumps([TOF]), publish_period=0.2, name="test/ck/c", checkpoint_dir=str(tmp_path)
    )
    try:
        w.start()
        wait_for(lambda: w.engine.messages >= 8, what="every message")
        time.sleep(0.5)
        assert w.engine.messages == 8 and w.engine.events == sum(len(b) for b in sent)
    finally:
        w.close()


class _Member:
    """A HistogramSum member over an in-process Histogrammer, read as the device serves it;
    `down` makes it answer as a killed server does."""

    def __init__(self, h) -> None:
        self.h, self.down = h, False

    def read(self, names: list[str]) -> dict:
        from livehist.components.histsum import SUMMED, MemberError

        if self.down:
            raise MemberError("its server is not running")
        h, fields = self.h, {**SUMMED, "EventRate": "event_rate", "ElapsedTime": "elapsed"}
        special = {"UpdateCounter": lambda: h.update_counter, "State": lambda: h.state, "Status": lambda: h.status,
                   "HistogramConfig": h.config_json, "KafkaOffsets": lambda: json.dumps(h.provenance()),
                   "PresetTime": lambda: h.engine.preset_time, "PresetEvents": lambda: h.engine.preset_events,
                   "PresetPulses": lambda: h.engine.preset_pulses}  # fmt: skip
        return {n: special[n]() if n in special else getattr(h.last, fields[n]) if n in fields else h.last.counts[n]
                for n in names}  # fmt: skip

    def command(self, name: str, arg=None) -> None:
        from livehist.components.histsum import MemberError

        if self.down:
            raise MemberError("its server is not running")
        {"Start": self.h.start, "Stop": self.h.stop, "Reset": self.h.reset}[name]()

    def write(self, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def test_members_reading_one_topic_outside_a_group_are_named_as_counted_twice(kafka_broker):
    from livehist.components.histogrammer import Histogrammer
    from livehist.components.histsum import HistogramSum

    topic = kafka_topic(kafka_broker, 2)
    producer = Producer({"bootstrap.servers": kafka_broker})
    sent = [_events(300, i) for i in range(6)]
    _send(producer, topic, sent)
    total = sum(len(b) for b in sent)
    for query, twice in (("start=earliest", True), (f"group=g-{topic}&start=earliest", False)):
        hs = {f"test/twice/{i}": Histogrammer(f"kafka://{kafka_broker}/{topic}?{query}", json.dumps([TOF]),
                                              publish_period=0.2, name=f"test/twice/{i}") for i in (1, 2)}  # fmt: skip
        s = HistogramSum(list(hs), lambda name, on_event, hs=hs: _Member(hs[name]), publish_period=0.2)
        try:
            s.start()
            goal = 2 * total if twice else total
            wait_for(lambda hs=hs, goal=goal: sum(h.engine.events for h in hs.values()) >= goal and
                     all(h.last.events == h.engine.events for h in hs.values()), what=f"counted ({query})")  # fmt: skip
            s.refresh()
            if twice:  # each private consumer sees every message: the sum holds them twice, and says so
                assert s.last.events == 2 * total
                assert s.state == "ALARM" and "counted twice" in s.status and "group=" in s.status, s.status
            else:
                assert s.last.events == total and "counted twice" not in s.status, s.status
        finally:
            s.close()
            for h in hs.values():
                h.close()


def _group_of_two(kafka_broker: str, prefix: str, checkpoint_dir: str):
    """Two in-process workers of one consumer group on a new 2-partition topic, and their sum:
    (producer, topic, make(name) -> a new worker, {name: _Member}, HistogramSum)."""
    from livehist.components.histogrammer import Histogrammer
    from livehist.components.histsum import HistogramSum

    topic = kafka_topic(kafka_broker, 2)
    uri = f"kafka://{kafka_broker}/{topic}?group=g-{topic}&start=earliest"
    producer = Producer({"bootstrap.servers": kafka_broker})

    def make(name: str) -> Histogrammer:
        return Histogrammer(
            uri, json.dumps([TOF]), publish_period=0.2, name=name, checkpoint_dir=checkpoint_dir
        )

    members = {name: _Member(make(name)) for name in (f"{prefix}/1", f"{prefix}/2")}
    return producer, topic, make, members, HistogramSum(list(members), lambda name, on_event: members[name],
                                                        publish_period=0.2)  # fmt: skip


def test_a_worker_down_at_a_reset_of_the_sum_comes_back_without_its_old_counts(kafka_broker, tmp_path):
    """It restarts from its checkpoint acquiring, with counts from before the Reset: the sum resets it."""
    producer, topic, make, members, s = _group_of_two(kafka_broker, "test/rs", str(tmp_path))
    a, b = members.values()
    try:
        s.start()
        first = [_events(400, i) for i in range(6)]
        _send(producer, topic, first)
        wait_for(lambda: a.h.last.events + b.h.last.events == sum(len(x) for x in first), what="first events")
        assert b.h.last.events > 0, "the group gave b no partition"
        time.sleep(0.5)  # a checkpoint after them
        old = b.h.engine.events
        _crash(b.h)
        b.down = True
        s.refresh()
        assert s.state == "ALARM" and "test/rs/2" in s.status
        s.reset()  # b is down: pending for it
        assert s.last.events == 0
        b.h, b.down = make("test/rs/2"), False  # restarted from its checkpoint: acquiring, old counts
        assert b.h.running and b.h.engine.events == old
        s.refresh()  # the sum reaches it: reset; its old counts never enter the sum
        s.refresh()
        assert s.last.events == 0 and b.h.engine.events == 0, s.status
        later = [_events(250, 10 + i) for i in range(4)]
        _send(producer, topic, later, 6)
        wait_for(lambda: a.h.last.events + b.h.last.events == sum(len(x) for x in later), timeout=90,
                 what="the later events")  # fmt: skip
        s.refresh()
        assert s.last.events == sum(len(x) for x in later)
        tof = np.concatenate([x.tof for x in later])
        assert np.array_equal(s.last.counts["tof"], np.histogram(tof, np.linspace(0, 70_000_000, 351))[0])
    finally:
        s.close()
        for m in members.values():
            m.h.close()


def test_a_group_worker_back_with_fewer_counts_is_not_called_lost(kafka_broker):
    """A consumer-group worker restarted without its counts (here: no checkpoints) is no loss:
    the group hands its uncommitted partitions to the others, who count them again. The sum
    names lost events only for members outside a group (tests/test_histsum.py)."""
    producer, topic, make, members, s = _group_of_two(kafka_broker, "test/nl", "")  # no checkpoints
    a, b = members.values()
    try:
        s.start()
        sent = [_events(300, i) for i in range(6)]
        _send(producer, topic, sent)
        total = sum(len(x) for x in sent)
        wait_for(lambda: a.h.last.events + b.h.last.events == total, what="the events")
        s.refresh()
        assert b.h.last.events > 0, "the group gave b no partition"
        _crash(b.h)
        b.down = True
        s.refresh()
        assert s.state == "ALARM" and "test/nl/2" in s.status
        b.h, b.down = make("test/nl/2"), False  # restarted, idle, from 0: its partitions go to a
        s.refresh()
        assert "lost" not in s.status and "idle" not in s.status, s.status
        wait_for(
            lambda: (s.refresh(), s.last.events)[1] == total, timeout=90, what="a to count b's share again"
        )
        # and no more: a read its own partition again from the start after the rebalance (no commits
        # without checkpoints, so the group's position was `start=earliest`); the sum was 1.5 x total
        wait_for(lambda: sorted(a.h.engine.offsets.values()) == [(0, 2), (0, 2)], what="a to read both")
        time.sleep(1.0)  # anything read again would show now
        s.refresh()
        assert (s.last.events, s.last.messages, a.h.last.messages) == (total, 6, 6), s.status
        assert s.state == "RUNNING", s.status
    finally:
        s.close()
        for m in members.values():
            m.h.close()


def _committed_all(h) -> bool:
    """Has the group taken the commit of everything `h` (a group worker) has counted?"""
    source = h._source
    return not source._commit_in_flight and all(
        source.committed.get(k, -1) > last for k, (_, last) in h.engine.snapshot().offsets.items()
    )


def _pair_and_sum(uri: str, tag: str, checkpoints) -> tuple[dict, object]:
    """Two in-process group workers test/<tag>/1 and 2 on `uri` (checkpoints in one folder) and a
    HistogramSum over them (not started)."""
    from livehist.components.histogrammer import Histogrammer
    from livehist.components.histsum import HistogramSum

    members = {n: _Member(Histogrammer(uri, json.dumps([TOF]), publish_period=0.2, name=n, checkpoint_dir=str(checkpoints),
                                       reconnect_delays=(0.5, 2.0))) for n in (f"test/{tag}/1", f"test/{tag}/2")}  # fmt: skip
    return members, HistogramSum(list(members), lambda name, on_event: members[name], publish_period=0.2)


def test_a_broker_restarted_without_its_topics_leaves_a_group_sum_exact_and_quiet(own_kafka_broker, tmp_path):
    """A restarted broker that lost the topic (Tansu in memory: created again, offsets from 0): the
    workers reconnect, the sum stays exact, and the new offsets are not taken for messages counted
    twice (the ranges counted of the old topic were compared with the new one's: ALARM, falsely)."""
    from livehist.site.broker import create_topic

    broker = own_kafka_broker.address
    topic = create_topic(broker, "renewed", 4)
    members, s = _pair_and_sum(f"kafka://{broker}/{topic}?group=g-renewed&start=earliest", "rn", tmp_path)
    try:
        s.start()
        wait_for(lambda: all(m.h._source.assigned for m in members.values()), what="both to get partitions")
        first = [_events(300 + i, i) for i in range(20)]
        _send(Producer({"bootstrap.servers": broker}), topic, first, 0, 4)
        wait_for(lambda: (s.refresh(), s.last.events)[1] == sum(map(len, first)), what="the first 20")
        # every commit answered before the broker goes: a consumer with a commit in flight cannot
        # close until its broker is back (librdkafka retries it for the coordinator), and then see below
        wait_for(lambda: all(_committed_all(m.h) for m in members.values()), what="the commits to land")
        failed = [m.h._source for m in members.values()]
        own_kafka_broker.kill()
        wait_for(
            lambda: (s.refresh(), s.state)[1] in ("ALARM", "FAULT") and "no Kafka broker" in s.status,
            what="the sum to say so",
        )
        # the failed consumers closed before the broker is back: one still closing rejoins the
        # restarted broker's group as it leaves, and Tansu keeps that member as the group's leader
        # for good (every SyncGroup of the new consumers then answers 'rebalance in progress', for
        # minutes; seen 1 in 3 runs with one core busy). Kafka drops such a member after its
        # session timeout (see README, Kafka).
        wait_for(
            lambda: not any(f._thread.is_alive() for f in failed),
            timeout=30,
            what="the failed consumers to close",
        )
        own_kafka_broker.start()
        create_topic(broker, topic, 4)
        wait_for(lambda: all(m.h._source.assigned for m in members.values()), what="the group again")
        second = [_events(300 + i, 100 + i) for i in range(20)]
        _send(Producer({"bootstrap.servers": broker}), topic, second, 20, 4)
        total = sum(map(len, first + second))
        wait_for(lambda: (s.refresh(), s.last.events)[1] >= total, what="every event")
        time.sleep(1.0)  # anything counted twice would show now
        s.refresh()
        assert (s.last.events, s.last.messages, s.state) == (total, 40, "RUNNING"), s.status
        tof = np.concatenate([b.tof for b in first + second])
        assert np.array_equal(s.last.counts["tof"], np.histogram(tof, np.linspace(0, 70_000_000, 351))[0])
    finally:
        s.close()
        for m in members.values():
            m.h.close()


def test_every_worker_in_fault_makes_the_sum_fault_not_an_idle_alarm(own_kafka_broker, tmp_path):
    """The broker down: every worker FAULT (reconnecting). One EventHistogrammer says FAULT, so a
    Sardana count on it ends in error; the sum said 'ALARM, idle', which the Sardana controller
    reads as a count that ended well (histograms recorded as complete)."""

    broker = own_kafka_broker.address
    topic = kafka_topic(broker, 2)
    members, s = _pair_and_sum(f"kafka://{broker}/{topic}?group=g-{topic}&start=earliest", "fl", tmp_path)
    try:
        s.start()
        wait_for(lambda: all(m.h._source.assigned for m in members.values()), what="both to get partitions")
        s.refresh()
        assert s.state == "RUNNING", s.status
        own_kafka_broker.kill()
        wait_for(lambda: all(m.h.state == "FAULT" for m in members.values()), what="both workers in FAULT")
        s.refresh()
        assert s.state == "FAULT", s.status
        assert "test/fl/1" in s.status and "test/fl/2" in s.status and "no Kafka broker" in s.status, s.status
    finally:
        s.close()
        for m in members.values():
            m.h.close()


def test_workers_without_a_shared_checkpoint_folder_are_named_when_they_count_twice(kafka_broker, tmp_path):
    """Workers of one group on hosts without a shared checkpoint folder: one killed before its
    commit landed and restarted from its checkpoint, while the other, blind to that checkpoint,
    read its partitions again from the group's commit. The sum held those messages twice and said
    RUNNING; it now names how many, where, and who."""
    from livehist.components.histogrammer import Histogrammer
    from livehist.components.histsum import HistogramSum

    topic = kafka_topic(kafka_broker, 2)
    uri = f"kafka://{kafka_broker}/{topic}?group=g-{topic}&start=earliest"
    hists = json.dumps([TOF])

    def make(name: str) -> Histogrammer:  # each its own folder: a checkpoint the other cannot see
        return Histogrammer(
            uri, hists, publish_period=0.2, name=name, checkpoint_dir=str(tmp_path / name[-1])
        )

    members = {n: _Member(make(n)) for n in ("test/sh/1", "test/sh/2")}
    a, b = members.values()
    s = HistogramSum(list(members), lambda name, on_event: members[name], publish_period=0.2)
    try:
        a.h.start()
        a.h._source.commit = lambda *args, **kw: None  # killed before any commit reached the broker
        sent = [_events(300 + i, 300 + i) for i in range(10)]
        _send(Producer({"bootstrap.servers": kafka_broker}), topic, sent)
        first = sum(len(x) for x in sent)
        wait_for(
            lambda: (a.h.checkpoint.read() or {"counters": {}})["counters"].get("events") == first,
            what="a checkpoint of everything",
        )
        _crash(a.h)
        b.h.start()  # the whole topic again, from the group's (empty) commit
        wait_for(lambda: b.h.engine.events == first, what="b to read everything again")
        a.h = make("test/sh/1")  # back from its checkpoint, acquiring
        assert a.h.running and a.h.engine.events == first
        wait_for(lambda: (s.refresh(), s.state)[1] == "ALARM" and "counted twice: 10 Kafka messages" in s.status,
                 what="the sum to name the messages counted twice")  # fmt: skip
        assert s.last.messages == 20 and "test/sh/1 and test/sh/2" in s.status, s.status
        assert f"{topic}/0 offsets 0-4" in s.status and "Reset and count again" in s.status, s.status
    finally:
        s.close()
        for m in members.values():
            m.h.close()


def test_a_group_member_the_group_gives_no_partition_says_so(kafka_broker, tmp_path):
    """Two members, one partition: one of them counts nothing, and its Status said only
    '0 events/s'. It says that the group gave it no partition; the other says nothing of it."""
    from livehist.components.histogrammer import UNASSIGNED_AFTER, Histogrammer

    topic = kafka_topic(kafka_broker, 1)
    uri = f"kafka://{kafka_broker}/{topic}?group=g-{topic}&start=earliest"
    members = [Histogrammer(uri, json.dumps([TOF]), publish_period=0.2, name=f"test/np/{i}",
                            checkpoint_dir=str(tmp_path)) for i in (1, 2)]  # fmt: skip
    try:
        for h in members:
            h.start()
        wait_for(lambda: sorted(bool(h.provenance()["assigned"]) for h in members) == [False, True],
                 timeout=60, what="the partition with one member")  # fmt: skip
        idle, busy = sorted(members, key=lambda h: bool(h.provenance()["assigned"]))
        wait_for(lambda: "no Kafka partition assigned" in idle.status, timeout=UNASSIGNED_AFTER + 30,
                 what=f"the idle member to say so: {idle.status}")  # fmt: skip
        assert idle.state == "RUNNING" and "more members than the topic has partitions" in idle.status
        assert "no Kafka partition" not in busy.status, busy.status
    finally:
        for h in members:
            h.close()


def test_a_worker_stopped_while_its_hand_over_commit_failed_is_not_counted_again(kafka_broker, tmp_path):
    """The broker away at Stop (down, or cut off, and back later with its data): the worker's
    hand-over commit fails, and its last checkpoint said `running: false`, which the group's
    other members skip ('a worker that stopped in order committed'). A member later given its
    partitions read them from the group's older commit: every message since counted twice
    (the sum said 'counted twice' and the total was too high until a Reset)."""
    from confluent_kafka import KafkaError, KafkaException

    from livehist.components.checkpoint import group_offsets
    from livehist.components.histogrammer import Histogrammer

    topic = kafka_topic(kafka_broker, 2)
    uri = f"kafka://{kafka_broker}/{topic}?group=g-{topic}&start=earliest"

    def make(name: str) -> Histogrammer:
        return Histogrammer(
            uri, json.dumps([TOF]), publish_period=0.2, name=name, checkpoint_dir=str(tmp_path)
        )

    class Away:  # the consumer, with a coordinator that does not answer commits
        def __init__(self, consumer) -> None:
            self.consumer = consumer

        def commit(self, *args, **kw) -> None:
            raise KafkaException(KafkaError(KafkaError._WAIT_COORD))

    producer = Producer({"bootstrap.servers": kafka_broker})
    sent = [_events(200 + i, 400 + i) for i in range(20)]
    a, b = make("test/hc/a"), None
    try:
        a.start()
        source = a._source
        source.commit = lambda *args, **kw: None  # the periodic commits do not land either
        hand_over = source._hand_over
        source._hand_over = lambda consumer, keys, why: hand_over(Away(consumer), keys, why)
        wait_for(lambda: source.assigned == {(topic, 0), (topic, 1)}, what="a to get both partitions")
        _send(producer, topic, sent[:10])
        first = sum(len(x) for x in sent[:10])
        wait_for(lambda: a.engine.events == first, what="the first half")
        a.stop()
        assert a.checkpoint.read()["counters"]["events"] == first and not a._source.committed
        assert group_offsets(tmp_path, uri) == {(topic, 0): (5, "test_hc_a"), (topic, 1): (5, "test_hc_a")}
        b = make("test/hc/b")  # a is not started again (its host down, or left out of the sum)
        b.start()
        _send(producer, topic, sent[10:], 10)
        total = sum(len(x) for x in sent)
        wait_for(lambda: b.engine.events >= total - first, what="b to read the second half")
        time.sleep(1.0)  # anything counted twice would show now
        assert (b.engine.messages, b.engine.events) == (10, total - first)
        tof = np.concatenate([x.tof for x in sent])
        want = np.histogram(tof, np.linspace(0, 70_000_000, 351))[0]
        assert np.array_equal(a.engine.snapshot().counts["tof"] + b.engine.snapshot().counts["tof"], want)
    finally:
        a.close()
        if b is not None:
            b.close()
