"""The pieces every bench module shares: result rows, timing, the ZeroMQ producer."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from livehist.site.process import free_port

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


PRODUCER = r"""
import sys, time, json, numpy as np, zmq
from livehist.engine.events import EventBatch, encode_ev44
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
