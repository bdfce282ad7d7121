"""The kafka:// figure of `livehist bench`: the source end to end beside a bare consumer.

Both read the same ev44 messages (4 partitions) from the same broker, from the start of the
topic: the subject is an Engine fed by `kafka://...?start=earliest` histogramming the
end-to-end histograms (1000-bin TOF, 10^6-pixel image); the reference a bare confluent-kafka
consumer (assign, `consume` in batches) that only decodes each message with
ess-streaming-data-types. Runs alternate subject/reference; the row is the median ratio.
The broker is $LIVEHIST_KAFKA_BROKER if set, else a Tansu of our own (test dependency).
"""

from __future__ import annotations

import logging
import os
import statistics
import time

import numpy as np

from livehist.bench.common import E2E_HISTOGRAMS, ROWS
from livehist.engine.events import EventBatch, encode_ev44

PARTITIONS = 4
quiet = logging.getLogger("livehist.bench.kafka")


def _produce(broker: str, topic: str, messages: int, per_msg: int) -> int:
    from confluent_kafka import Producer

    rng = np.random.default_rng(11)
    payloads = []
    for i in range(8):
        tof = rng.integers(0, 70_000_000, per_msg, dtype=np.int32)
        pix = rng.integers(0, 1_000_000, per_msg, dtype=np.int32)
        idx = np.arange(0, per_msg, per_msg // 4, dtype=np.int64)[:4]
        payloads.append(
            encode_ev44(EventBatch(tof, pix, 1_700_000_000_000_000_000 + idx * 71_000_000, idx), i)
        )
    p = Producer(
        {"bootstrap.servers": broker, "message.max.bytes": 64 * 2**20, "linger.ms": 5, "logger": quiet}
    )
    for i in range(messages):
        while True:
            try:
                p.produce(topic, payloads[i % 8], partition=i % PARTITIONS)
                break
            except BufferError:
                p.poll(0.1)
    if p.flush(60):
        raise RuntimeError("the bench's messages were not all delivered")
    return messages * per_msg


def _source_run(broker: str, topic: str, total: int) -> float:
    from livehist.engine import Engine
    from livehist.engine.sources import open_source
    from livehist.engine.spec import parse_histograms

    engine = Engine(parse_histograms(E2E_HISTOGRAMS))
    t0 = time.perf_counter()
    engine.start(open_source(f"kafka://{broker}/{topic}?start=earliest"))
    deadline = time.monotonic() + 120
    while engine.events < total and time.monotonic() < deadline and engine.dropped_messages == 0:
        time.sleep(0.002)
    took = time.perf_counter() - t0
    engine.stop()
    snap = engine.snapshot()
    if snap.events != total or int(snap.counts["image"].sum()) != total:
        raise RuntimeError(
            f"kafka:// counted {snap.events} of {total} events ({snap.dropped_messages} dropped)"
        )
    return total / took


def _bare_run(broker: str, topic: str, total: int) -> float:
    import uuid

    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    from streaming_data_types.eventdata_ev44 import deserialise_ev44

    t0 = time.perf_counter()
    c = Consumer(
        {
            "bootstrap.servers": broker,
            "group.id": f"bench-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "fetch.max.bytes": 64 * 2**20,
            "max.partition.fetch.bytes": 16 * 2**20,
            "receive.message.max.bytes": 80 * 2**20,
            "fetch.wait.max.ms": 100,
            "queued.max.messages.kbytes": 32 * 1024,
            "logger": quiet,
        }
    )  # the source's fetch tuning
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    events = 0
    deadline = time.monotonic() + 120
    while events < total and time.monotonic() < deadline:
        for m in c.consume(500, 0.1):
            if m.error() is None:
                events += deserialise_ev44(m.value()).time_of_flight.size
    took = time.perf_counter() - t0
    c.close()
    if events != total:
        raise RuntimeError(f"the bare consumer decoded {events} of {total} events")
    return total / took


def kafka_figures(_row, quick: bool) -> None:
    from livehist.site.broker import TansuBroker, create_topic

    own = None
    broker = os.environ.get("LIVEHIST_KAFKA_BROKER")
    if not broker:
        own = TansuBroker().start()
        broker = own.address
    try:
        topic = create_topic(broker, f"livehist-bench-{time.time_ns()}", PARTITIONS)
        per_msg = 1 << 18  # 2 MB messages
        total = _produce(broker, topic, 16 if quick else 64, per_msg)
        _source_run(broker, topic, total)  # warm-up: compile the kernels, fill the page cache
        pairs = []
        for _ in range(1 if quick else 5):
            subject = _source_run(broker, topic, total)
            reference = _bare_run(broker, topic, total)
            pairs.append((subject, reference))
    finally:
        if own is not None:
            own.kill()
    ratios = [s / r for s, r in pairs]
    ratio = statistics.median(ratios)
    subject = statistics.median(s for s, _ in pairs)
    reference = statistics.median(r for _, r in pairs)
    _row(f"kafka:// end to end, tof + 10^6-pixel image, {total / 1e6:.0f}e6 events from 4 partitions",
         subject, "events/s", "bare confluent-kafka consumer, decode only (same messages, same broker)",
         reference, ">= 0.8x the bare consumer (median of alternating pairs)", ratio >= 0.8)  # fmt: skip
    ROWS[-1]["ratio"] = ratio  # the median of the pairs' ratios, not the ratio of the medians
    ROWS[-1]["detail"] = (
        f"median ratio {ratio:.2f} (spread {min(ratios):.2f}..{max(ratios):.2f} over {len(pairs)} pairs); "
        + ", ".join(f"{s:.3g}/{r:.3g}" for s, r in pairs)
    )
