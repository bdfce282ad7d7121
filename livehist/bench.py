"""`livehist bench`: each figure beside a reference measured in the same run.

livehist bench [--json] [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

from livehist.events import EventBatch
from livehist.histograms import make
from livehist.spec import parse_histograms

ROWS: list[dict] = []


def _best(fn, repeat: int = 5) -> float:
    """Best wall time of `repeat` runs (the machine is shared: best is least disturbed)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _row(
    figure: str, value: float, unit: str, ref_name: str, ref_value: float, target: str, ok: bool
) -> dict:
    row = {"figure": figure, "value": value, "unit": unit, "reference": ref_name,
           "reference_value": ref_value, "ratio": value / ref_value if ref_value else None,
           "target": target, "met": bool(ok)}  # fmt: skip
    ROWS.append(row)
    return row


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


PRODUCER = r"""
import sys, time, json, numpy as np, zmq
from livehist.events import EventBatch, encode_ev44
endpoint, seconds, per_msg = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(7)
msgs = []
for i in range(8):
    tof = rng.integers(0, 70_000_000, per_msg, dtype=np.int32)
    pix = rng.integers(0, 1_000_000, per_msg, dtype=np.int32)
    idx = np.arange(0, per_msg, per_msg // 4, dtype=np.int64)[:4]
    msgs.append(encode_ev44(EventBatch(tof, pix, 1_700_000_000_000_000_000 + idx * 71_000_000, idx), i))
sock = zmq.Context.instance().socket(zmq.PUSH)
sock.setsockopt(zmq.SNDHWM, 8)
sock.bind(endpoint)
print("ready", flush=True)
sys.stdin.readline()
sent = n = 0
t0 = time.monotonic()
while time.monotonic() - t0 < seconds:
    sock.send(msgs[n % 8], copy=False)
    n += 1
    sent += per_msg
sock.close(linger=-1)
zmq.Context.instance().term()  # blocks until every zero-copy frame is on the wire
print(json.dumps({"events": sent, "messages": n, "seconds": time.monotonic() - t0}), flush=True)
"""


# the histograms of every end-to-end figure: a 1000-bin TOF and a 10^6-pixel image
E2E_HISTOGRAMS = [
    {"name": "tof", "kind": "tof", "tof": {"start": 0, "stop": 7.2e7, "bins": 1000}},
    {"name": "image", "kind": "image", "pixels": {"first": 0, "shape": [1000, 1000]}},
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Producer:
    """A subprocess pushing ev44 messages as fast as ZeroMQ takes them, for `seconds`."""

    def __init__(self, seconds: float, per_msg: int = 1 << 20) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PRODUCER, f"tcp://127.0.0.1:{self.port}", str(seconds), str(per_msg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, counted, dropped) -> tuple[dict, float]:
        """Go; wait until `counted()` reaches what was sent (or drops/timeout); (sent, seconds)."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        t0 = time.monotonic()
        sent = json.loads(self.proc.stdout.readline())
        deadline = time.monotonic() + 30
        while counted() < sent["events"] and time.monotonic() < deadline and dropped() == 0:
            time.sleep(0.01)
        return sent, time.monotonic() - t0

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def end_to_end(seconds: float, per_msg: int = 1 << 20) -> float:
    """Engine only, in this process; returns its rate (the reference of the device figure)."""
    from livehist.engine import Engine
    from livehist.sources import open_source

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


def bench(as_json: bool = False, quick: bool = False, say=print) -> list[dict]:
    ROWS.clear()
    say("livehist bench: engine kernels (single thread, int32 events)") if not as_json else None
    engine_kernels(10**6 if quick else 10**7)
    say("livehist bench: zmq:// end to end") if not as_json else None
    engine_rate = end_to_end(3 if quick else 30)
    say("livehist bench: EventHistogrammer device (real Tango DB and server)") if not as_json else None
    from livehist.bench_device import device_figures

    device_figures(engine_rate, 3 if quick else 30, _row, ROWS)
    say("livehist bench: recorders beside Sardana's") if not as_json else None
    from livehist.bench_recorders import recorder_figures

    recorder_figures(_row, quick)
    say("livehist bench: Sardana scans, dead time per point") if not as_json else None
    from livehist.bench_sardana import sardana_figures

    sardana_figures(_row, quick)
    if as_json:
        say(json.dumps(ROWS, indent=1))
    else:
        for r in ROWS:
            ref = f"{r['reference']} {r['reference_value']:.3g}" if r["reference_value"] else r["reference"]
            ratio = f" ({r['ratio']:.1f}x)" if r["ratio"] else ""
            met = "ok " if r["met"] else "MISS"
            say(
                f"{met} {r['figure']}: {r['value']:.3g} {r['unit']}{ratio} | ref: {ref} | target {r['target']}"
            )
        for r in ROWS:
            if "sent" in r:
                say(f"     {r['figure']}: sent {r['sent']}, counted {r['counted']}, "
                    f"dropped messages {r['dropped_messages']}")  # fmt: skip
            if "detail" in r:
                say(f"     {r['figure']}: {r['detail']}")
    return ROWS
