"""Engine figures of `livehist bench`: kernels against numpy, zmq:// end to end."""

from __future__ import annotations

import time

import numpy as np

from livehist.bench.common import E2E_HISTOGRAMS, ROWS, Producer, _best, _row
from livehist.engine.events import EventBatch
from livehist.engine.histograms import make
from livehist.engine.spec import parse_histograms


def engine_kernels(n: int) -> None:
    rng = np.random.default_rng(42)
    tof = rng.integers(0, 100_000_000, n, dtype=np.int32)
    pixel = rng.integers(0, 1_000_000, n, dtype=np.int32)
    pixel_1e4 = rng.integers(0, 10_000, n, dtype=np.int32)
    one_pulse = (np.zeros(1, np.int64), np.zeros(1, np.int64))
    floor = n / _best(lambda: (tof.sum(), pixel.sum()))  # reading both arrays once
    specs = parse_histograms([
        {"name": "tof", "kind": "tof", "tof": {"start": 0, "stop": 1e8, "bins": 1000}},
        {"name": "image", "kind": "image", "pixels": {"first": 0, "shape": [1000, 1000]}},
        {"name": "pixel_tof", "kind": "pixel_tof", "pixels": {"first": 0, "count": 10_000},
         "tof": {"start": 0, "stop": 1e8, "bins": 100}},
    ])  # fmt: skip
    batches = {"tof": EventBatch(tof, pixel, *one_pulse), "image": EventBatch(tof, pixel, *one_pulse),
               "pixel_tof": EventBatch(tof, pixel_1e4, *one_pulse)}  # fmt: skip
    rates = {}
    for spec in specs:
        h = make(spec)
        h.add(batches[spec.name])  # compile
        rates[spec.name] = n / _best(lambda h=h, b=batches[spec.name]: h.add(b))
    np_hist = n / _best(lambda: np.histogram(tof, bins=1000, range=(0, 1e8)), 3)
    np_bincount = n / _best(lambda: np.bincount(pixel, minlength=1_000_000), 3)
    _row("engine tof 1D, 1000 bins (int32 events)", rates["tof"], "events/s", "numpy.histogram", np_hist,
         ">= 1.0e9 and >= 10x numpy.histogram", rates["tof"] >= 1e9 and rates["tof"] >= 10 * np_hist)  # fmt: skip
    _row("engine image, 10^6 pixels", rates["image"], "events/s", "numpy.bincount", np_bincount,
         ">= 0.8e9 and >= 2x numpy.bincount", rates["image"] >= 0.8e9 and rates["image"] >= 2 * np_bincount)  # fmt: skip
    _row("engine pixel_tof, 10^4 pixels x 100 bins", rates["pixel_tof"], "events/s",
         "memory-read floor (numpy.sum of both arrays)", floor, ">= 0.4e9", rates["pixel_tof"] >= 0.4e9)  # fmt: skip
    _row("memory-read floor: numpy.sum over tof + pixel_id", floor, "events/s", "-", 0, "reference", True)


def end_to_end(seconds: float, per_msg: int = 1 << 20) -> float:
    """Engine only, in this process; returns its rate (the reference of the device figure)."""
    from livehist.engine import Engine
    from livehist.engine.sources import open_source

    producer = Producer(seconds, per_msg)
    try:
        engine = Engine(parse_histograms(E2E_HISTOGRAMS))
        engine.start(open_source(f"zmq://127.0.0.1:{producer.port}"))
        time.sleep(0.5)
        sent, took = producer.run(lambda: engine.events, lambda: engine.dropped_messages)
        engine.stop()
        snap = engine.snapshot()
    finally:
        producer.close()
    rate = snap.events / took
    lossless = snap.events == sent["events"] and snap.dropped_messages == 0
    lossless = lossless and int(snap.counts["image"].sum()) == sent["events"]
    _row(f"zmq:// end to end, tof + 10^6-pixel image, {seconds:.0f} s", rate, "events/s",
         "producer send rate (ev44 over loopback)", sent["events"] / sent["seconds"],
         ">= 2e8 sustained, zero loss", rate >= 2e8 and lossless)  # fmt: skip
    ROWS[-1]["sent"] = sent["events"]
    ROWS[-1]["counted"] = snap.events
    ROWS[-1]["dropped_messages"] = snap.dropped_messages
    return rate
