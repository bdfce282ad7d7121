"""Consumer groups against a hostile world: a worker frozen (SIGSTOP) past its Kafka session while
the others take its partitions over, then woken (SIGCONT); a real Tansu broker, a real Tango DB,
real EventHistogrammer and HistogramSum servers. The sum must equal numpy of everything sent
(nothing lost, nothing twice)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import tango

from livehist.site import control
from livehist.site.process import Managed
from tests.conftest import kafka_topic
from tests.test_scaling import group_config, paced_producer

PARTITIONS = 4
TOF = {"name": "tof", "kind": "tof", "tof": {"start": 0, "stop": 70_000_000, "bins": 350}}
WORKERS = {"fa": ["test/fw/1"], "fb": ["test/fw/2"]}
T0 = 1_763_800_000_000_000_000
PULSE = 71_428_571


def wait_for(pred, timeout: float = 60.0, what: str = "condition", detail=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what} {detail()}"
        time.sleep(0.1)


def proxy(site, dev: str, timeout_ms: int = 10_000) -> tango.DeviceProxy:
    p = tango.DeviceProxy(site.url(dev))
    p.set_timeout_millis(timeout_ms)
    return p


def frozen_group(sites, kafka_broker):
    topic = kafka_topic(kafka_broker, PARTITIONS, prefix="frozen")
    uri = f"kafka://{kafka_broker}/{topic}?group=g-{topic}&start=earliest"
    # checkpoints 2 s apart: a worker frozen has counted past its last one (what the others read on from)
    props = {"EventSource": [uri], "Histograms": [json.dumps([TOF])], "PublishPeriod": ["2.0"]}
    return sites.up(group_config(WORKERS, props, "frozen", "test/fsum/1")), topic


@pytest.fixture(scope="module", params=["anywhere", "mid-checkpoint"])
def frozen_site(request, sites, kafka_broker):
    return (*frozen_group(sites, kafka_broker), request.param)


def stop_mid_checkpoint(site, pid: int) -> None:
    """SIGSTOP fw/2 while it writes a checkpoint (its temporary file is there, not yet renamed over
    the last one): on waking it must not finish that write, since the others read on from the last."""
    folder = site.state_dir / "checkpoints"
    for _ in range(20):  # a write lasts a few ms, every 2 s; seen and stopped within ~0.1 ms
        # this loop only sees a write it is scheduled during (a few ms every 2 s): on a loaded machine
        # (CI with a busy loop on one core) 5 s, 2-3 writes, were once all missed
        deadline = time.monotonic() + 20.0
        while not any(n.startswith("test_fw_2.npz") and n.endswith(".tmp") for n in os.listdir(folder)):
            assert time.monotonic() < deadline, (
                f"no checkpoint of fw/2 seen written in 20 s: {os.listdir(folder)}"
            )
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.05)  # the stop is delivered
        if any(n.startswith("test_fw_2.npz") and n.endswith(".tmp") for n in os.listdir(folder)):
            return
        os.kill(pid, signal.SIGCONT)  # stopped just after the rename: try the next write
    raise AssertionError("fw/2 never stopped mid-checkpoint in 20 writes")


def counting(site, kafka_broker, topic: str, messages: int, seed: int, at_work=None, part: int = 5):
    """The sum started, every worker with partitions, a paced producer sending, 1/`part` of it sent
    and fw/2 counting (or `at_work(workers)`): the sum's and the workers' proxies, the producer's
    thread, what it sent, fw/2's pid."""
    s = proxy(site, "test/fsum/1")
    workers = {d: proxy(site, d) for devs in WORKERS.values() for d in devs}
    wait_for(lambda: s.state() == tango.DevState.ON, what="the sum", detail=lambda: s.status())
    s.Start()
    wait_for(lambda: all(json.loads(w.KafkaOffsets)["assigned"] for w in workers.values()), timeout=60,
             what="every worker to get partitions")  # fmt: skip
    t, sent = paced_producer(kafka_broker, topic, PARTITIONS, messages, seed=seed)
    at_work = at_work or (lambda ws: ws["test/fw/2"].EventCount > 0)
    wait_for(lambda: at_work(workers) and len(sent) > messages // part, what="the workers at work")
    return s, workers, t, sent, Managed(site.state_dir, "EventHistogrammer-fb").pid()


def assert_exact(s, workers, t, sent: list, messages: int, on: bool = True) -> str:
    """Once the producer is done, the sum reaches every event sent, equal to numpy's histogram of
    them, and counts nothing twice (3 s more to show it), ON then unless not `on`; its status."""
    t.join()
    total = sum(len(b) for b in sent)
    wait_for(lambda: s.EventCount >= total, timeout=90, what=f"the sum to reach every event ({total})",
             detail=lambda: f"{s.EventCount}; {s.status()}")  # fmt: skip
    time.sleep(3.0)  # anything counted twice would show now
    s.Stop()
    counted, status = s.EventCount, s.status()
    per_worker = {d: (w.EventCount, w.MessageCount) for d, w in workers.items()}
    print(f"\nproduced {total} events in {messages} messages; the sum {counted} in {s.MessageCount}; "
          f"per worker {per_worker}; status {status}")  # fmt: skip
    assert (s.MessageCount, counted) == (messages, total), status
    tof = np.concatenate([b.tof for b in sent])
    assert np.array_equal(s.tof, np.histogram(tof, np.linspace(0, 70_000_000, 351))[0])
    if on:  # Stop reads every member within the sum's timeout: on a loaded machine (CI, a busy loop
        # on one core) the woken worker once answered late and the sum said ALARM, "down: test/fw/2
        # (does not answer in time)", with exact counts; its follower reads it again within a second
        wait_for(lambda: s.state() == tango.DevState.ON, timeout=30, what="the sum ON, every member answering",
                 detail=lambda: s.status())  # fmt: skip
        status = s.status()
    assert "twice" not in status, status
    assert (s.MessageCount, s.EventCount) == (messages, total), status  # and nothing moved meanwhile
    return status


def test_a_worker_frozen_past_its_session_and_woken_leaves_the_sum_exact(frozen_site, kafka_broker):
    site, topic, when = frozen_site
    messages = 900
    s, workers, t, sent, pid = counting(site, kafka_broker, topic, messages, seed=21)
    try:
        if when == "mid-checkpoint":
            stop_mid_checkpoint(site, pid)
        else:
            os.kill(pid, signal.SIGSTOP)  # frozen with its partitions, its queue and its prefetch
        # the group hands its partitions to fw/1 once its session (6 s) is over
        wait_for(lambda: len(json.loads(workers["test/fw/1"].KafkaOffsets)["assigned"]) == PARTITIONS,
                 timeout=60, what="fw/1 to take every partition")  # fmt: skip
        time.sleep(2.0)  # fw/1 counts what fw/2 had read but not counted
    finally:
        os.kill(pid, signal.SIGCONT)
    # the woken worker lost its partitions and set its counts back to its checkpoint, from which
    # fw/1 read on: before, what it counted past that checkpoint was in the sum twice (22
    # messages; 19 in a CI run where the freeze came mid-checkpoint, and the checkpoint it set
    # back to was the one it finished writing on waking)
    assert_exact(s, workers, t, sent, messages)
    notes = " ".join(json.loads(workers["test/fw/2"].KafkaOffsets)["notes"])
    assert "set back to checkpoint" in notes, notes  # it was told, and said so


def test_a_worker_frozen_briefly_that_hands_over_at_once_leaves_the_sum_exact(sites, kafka_broker):
    """Frozen for less than its session: its partitions stay its own, but it cannot know that at
    once. The group rebalances (fw/1 stops) while fw/2 holds its checkpoints: it hands over from its
    last checkpoint (counts set back to it, nothing committed past it), and the new owner reads on
    from there: nothing lost, nothing twice."""
    site, topic = frozen_group(sites, kafka_broker)
    messages = 600
    s, workers, t, sent, pid = counting(site, kafka_broker, topic, messages, seed=22)
    try:
        os.kill(pid, signal.SIGSTOP)
        time.sleep(3.0)  # past a tick gap (2 s), within the session (6 s)
    finally:
        os.kill(pid, signal.SIGCONT)
    workers["test/fw/1"].Stop()  # leaves the group: fw/2's partitions are revoked, then all are its own
    wait_for(lambda: len(json.loads(workers["test/fw/2"].KafkaOffsets)["assigned"]) == PARTITIONS,
             timeout=60, what="fw/2 to take every partition")  # fmt: skip
    assert_exact(s, workers, t, sent, messages)
    notes = " ".join(json.loads(workers["test/fw/2"].KafkaOffsets)["notes"])
    assert "handed over just after a freeze" in notes, notes
    # the 3 s it was frozen are not the broker's silence (it reconnected for them, once in 2 runs)
    log = (site.state_dir / "logs" / "EventHistogrammer-fb.log").read_text()
    assert "source failed" not in log, log[-2000:]


@contextlib.contextmanager
def unwritable(folder):
    """`folder` refuses new files (a full or read-only disk) and stays readable; root ignores
    permissions, so root makes it immutable."""
    root = os.geteuid() == 0
    cmd = ["chattr", "+i", str(folder)]
    if root and subprocess.run(cmd, capture_output=True).returncode != 0:
        pytest.skip("chattr +i does not work here")
    if not root:
        os.chmod(folder, 0o555)
    try:
        yield
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            os.chmod(folder, 0o755)


def both(workers) -> bool:
    return all(w.EventCount > 0 for w in workers.values())


@contextlib.contextmanager
def checkpoints_failing(site, workers):
    """The checkpoint folder unwritable, and every worker saying its checkpoints fail."""
    with unwritable(site.state_dir / "checkpoints"):
        wait_for(lambda: all("not written" in w.status() for w in workers.values()), timeout=30,
                 what="every worker to say its checkpoints fail")  # fmt: skip
        yield


def test_a_rebalance_while_checkpoints_cannot_be_written_leaves_the_sum_exact(sites, kafka_broker):
    """The checkpoint folder refuses writes (disk full) while both workers acquire; fw/1 stops (its
    hand-over cannot checkpoint) and fw/2 takes its partitions from the last checkpoints on disk.
    What each had counted past them must leave its counts, or the sum holds it twice."""
    site, topic = frozen_group(sites, kafka_broker)
    messages = 600
    s, workers, t, sent, _ = counting(site, kafka_broker, topic, messages, seed=23, at_work=both)
    try:
        with checkpoints_failing(site, workers):
            workers["test/fw/1"].Stop()  # leaves the group: its partitions go to fw/2
            wait_for(lambda: len(json.loads(workers["test/fw/2"].KafkaOffsets)["assigned"]) == PARTITIONS,
                     timeout=60, what="fw/2 to take every partition")  # fmt: skip
            time.sleep(1.0)
    finally:
        t.join()
    assert_exact(s, workers, t, sent, messages, on=False)
    assert "not written" not in workers["test/fw/2"].status()  # writable again: said no more
    notes = " ".join(json.loads(workers["test/fw/1"].KafkaOffsets)["notes"])
    assert "not written" in notes and "set back to checkpoint" in notes, notes


def test_a_worker_restarted_with_one_more_histogram_keeps_its_checkpointed_counts(sites, kafka_broker):
    """fw/2 is SIGKILLed and its Histograms property gets one more histogram before `livehist up`
    restarts it. Its checkpoint's `tof` (same name and binning) is still its counts: they must come
    back, as Configure keeps them, or the events it had counted and committed are in no one's counts
    once the sum's Configure gives every member the new list."""
    site, topic = frozen_group(sites, kafka_broker)
    messages = 400
    wider = [TOF, {"name": "tof2", "kind": "tof", "tof": {"start": 0, "stop": 70_000_000, "bins": 7}}]
    s, workers, t, sent, pid = counting(site, kafka_broker, topic, messages, seed=24, part=3)
    try:
        time.sleep(2.5)  # a checkpoint (every 2 s) with counts in it
        os.kill(pid, signal.SIGKILL)
        host, port = site.tango_host.split(":")
        tango.Database(host, int(port)).put_device_property("test/fw/2", {"Histograms": [json.dumps(wider)]})
        control.up(site.tango_host, site.config_path, site.state_dir, say=lambda x: None)
    finally:
        t.join()
    wait_for(lambda: "test/fw/2" in s.status() and "differ" in s.status(), what="the sum to name fw/2's list",
             detail=lambda: s.status())  # fmt: skip
    s.Configure(json.dumps(wider))
    assert_exact(s, workers, t, sent, messages, on=False)


def test_a_stop_while_checkpoints_cannot_be_written_is_said_by_the_sum(sites, kafka_broker):
    """The sum is stopped while no checkpoint can be written: each worker sets its counts back to its
    last checkpoint (the group reads on from there), so the total is short of what was read. The
    sum must say so, not show a total that looks final.

    (A Start right after, counting the rest exactly, was checked here too. It depends on the Tansu
    test broker re-forming a group whose members all left and joined again at once, which it did not
    always do within 90 s (1 of 3 runs here, and one CI run). Plain confluent-kafka consumers stopped
    and started the same way got their partitions after 20 s, or not within 30 s, Tansu's JoinGroup
    naming a leader that had left. The counts set back are checked exactly by the rebalance test above.)"""
    site, topic = frozen_group(sites, kafka_broker)
    messages = 300
    s, workers, t, sent, _ = counting(site, kafka_broker, topic, messages, seed=25, at_work=both, part=3)
    try:
        with checkpoints_failing(site, workers):
            time.sleep(1.0)  # counted past the last checkpoints
            s.Stop()
            status = s.status()
            assert s.state() == tango.DevState.ALARM and "checkpoint" in status, status
            assert "test/fw/1" in status and "test/fw/2" in status, status
    finally:
        t.join()


def test_a_worker_reset_behind_the_sums_back_is_said_by_the_sum(sites, kafka_broker):
    """fw/2 is Reset by a client of its own while the sum acquires: what it had counted leaves the
    total, which said nothing (RUNNING on 2 of 2 members, 64,693 of 665,393 events missing). The sum
    must name it; its own Reset then counts afresh and says nothing more."""
    site, topic = frozen_group(sites, kafka_broker)
    s, workers, t, sent, _ = counting(site, kafka_broker, topic, 200, seed=26)
    try:
        wait_for(lambda: s.EventCount > 0, what="fw/2 in the sum")
        workers["test/fw/2"].Reset()
        wait_for(lambda: "reset on its own" in s.status(), timeout=30, what="the sum to say so",
                 detail=lambda: s.status())  # fmt: skip
        status = s.status()
        assert s.state() == tango.DevState.ALARM and "test/fw/2" in status, status
        assert "test/fw/1" not in status, status
        s.Reset()
        time.sleep(2.0)  # a few updates of the sum after its own Reset
        assert s.state() == tango.DevState.RUNNING and "reset" not in s.status(), s.status()
    finally:
        t.join()
        s.Stop()
