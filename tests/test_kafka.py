"""kafka:// and re-streaming to Kafka against a real Kafka-protocol broker.

The broker is the `kafka_broker` session fixture (a Tansu process of our own, or the site's
Kafka named by $LIVEHIST_KAFKA_BROKER); tests that kill a broker get one of their own.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from livehist.components.histogrammer import Histogrammer
from livehist.engine import Engine
from livehist.engine.events import EventBatch, encode_ev44
from livehist.engine.sources import SourceError, open_source
from livehist.engine.spec import parse_histograms
from tests.conftest import kafka_topic

T0 = 1_763_800_000_000_000_000  # ns: pulse times of the produced events
PULSE = 71_428_571  # ns, 14 Hz
TOF_SPEC = {"name": "tof", "kind": "tof", "tof": {"start": 0, "stop": 70_000_000, "bins": 70}}
IMAGE_SPEC = {"name": "image", "kind": "image", "pixels": {"first": 0, "shape": [16, 16]}}


def wait_for(pred, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def pulses(first: int, n: int, per_pulse: int, seed: int) -> EventBatch:
    """n pulses (numbered from `first`) of `per_pulse` events each, in one batch."""
    rng = np.random.default_rng(seed)
    tof = rng.integers(0, 70_000_000, n * per_pulse, dtype=np.int32)
    pixel = rng.integers(0, 256, n * per_pulse, dtype=np.int32)
    times = T0 + (first + np.arange(n, dtype=np.int64)) * PULSE
    return EventBatch(tof, pixel, times, np.arange(n, dtype=np.int64) * per_pulse)


def producer(broker: str) -> Producer:
    return Producer({"bootstrap.servers": broker, "message.max.bytes": 16 * 2**20, "linger.ms": 5})


def engine_for(uri: str, specs=(TOF_SPEC, IMAGE_SPEC)) -> Engine:
    engine = Engine(parse_histograms(list(specs)))
    engine.start(open_source(uri))
    return engine


def test_exact_counts_over_four_partitions_with_malformed_and_foreign_messages(kafka_broker):
    topic = kafka_topic(kafka_broker, 4)
    p = producer(kafka_broker)
    sent = []
    for i in range(40):
        batch = pulses(i * 3, 3, 500 + i, seed=i)
        p.produce(topic, encode_ev44(batch, i, "det"), partition=i % 4, timestamp=int(batch.pulse_time[0] // 10**6))
        sent.append(batch)
        if i % 10 == 3:
            p.produce(topic, b"\x00\x01garbage that is no flatbuffer", partition=i % 4)
        if i % 10 == 7:  # another detector's events on the same topic: not ours
            p.produce(topic, encode_ev44(pulses(0, 1, 99, seed=99), 0, "monitor"), partition=(i + 1) % 4)
    p.flush(30)
    engine = engine_for(f"kafka://{kafka_broker}/{topic}?source=det&start=earliest")
    expected = sum(len(b) for b in sent)
    try:
        wait_for(lambda: engine.events >= expected and engine.bad_messages >= 4, what="every message")
        time.sleep(0.5)  # nothing more may come
    finally:
        engine.stop()
    snap = engine.snapshot()
    tof = np.concatenate([b.tof for b in sent])
    pixel = np.concatenate([b.pixel_id for b in sent])
    assert snap.events == expected and snap.messages == 44 and snap.bad_messages == 4
    assert snap.pulses == 120 and engine.foreign_messages == 4 and snap.dropped_messages == 0
    assert np.array_equal(snap.counts["tof"], np.histogram(tof, np.linspace(0, 70_000_000, 71))[0])
    assert np.array_equal(snap.counts["image"].ravel(), np.bincount(pixel, minlength=256))
    # the offsets counted, per partition: what a checkpoint records
    assert sorted(snap.offsets) == [(topic, p) for p in range(4)]
    assert all(first == 0 and last >= 9 for first, last in snap.offsets.values())
