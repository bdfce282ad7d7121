"""The pieces every bench module shares: result rows, timing, the ZeroMQ producer."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

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
    figure: str,
    value: float,
    unit: str,
    ref_name: str,
    ref_value: float,
    target: str,
    ok: bool,
    pairs: dict | None = None,
) -> dict:
    """A result row; `pairs` (from `alternate`) makes the ratio the median of alternated pairs."""
    row = {"figure": figure, "value": value, "unit": unit, "reference": ref_name,
           "reference_value": ref_value, "ratio": value / ref_value if ref_value else None,
           "target": target, "met": bool(ok)}  # fmt: skip
    if pairs:
        row.update(ratio=pairs["ratio"], spread=[pairs["ratio_min"], pairs["ratio_max"]],
                   pairs=len(pairs["ratios"]), ratios=pairs["ratios"])  # fmt: skip
    ROWS.append(row)
    return row


def alternate(subject, reference, pairs: int, work: float | None = None, clock=time.perf_counter) -> dict:
    """Run reference, subject, subject, reference, ... (`pairs` of each) in the same process state.

    With `work` (events), a call's rate is work / its time on `clock` (wall time, or
    time.thread_time: the CPU time of a single-threaded call, blind to the time slices other
    processes take on a shared machine); without, each call returns its rate. The ratio of
    each adjacent pair is taken, so a machine that slows down between pairs moves both sides;
    the figure is the median ratio, the spread the smallest and largest."""

    def rate(fn) -> float:
        t = clock()
        r = fn()
        return work / (clock() - t) if work is not None else r

    subj, ref = [], []
    for k in range(pairs):
        if k % 2:  # ABBA order inside every two pairs: neither side always runs first
            subj.append(rate(subject))
            ref.append(rate(reference))
        else:
            ref.append(rate(reference))
            subj.append(rate(subject))
    ratios = [a / b for a, b in zip(subj, ref, strict=True)]
    return {"subject": float(np.median(subj)), "reference": float(np.median(ref)),
            "ratio": float(np.median(ratios)), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ratios": ratios}  # fmt: skip


def machine() -> str:
    """Cores, caches and load: printed beside the figures (they depend on all three)."""
    import os
    from pathlib import Path

    caches = []
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((d / f).read_text().strip() for f in ("level", "type", "size"))
            shared = (d / "shared_cpu_list").read_text().strip()
        except OSError:
            continue
        if kind != "Instruction":
            caches.append(f"L{level} {size} (cpus {shared})")
    model = ""
    try:
        model = next(
            ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} cores ({model}); " + ", ".join(caches or ["caches unknown"])
            + f"; load average {load}")  # fmt: skip


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


# the realistic configuration of every end-to-end figure: a 1000-bin TOF, a 10^6-pixel image
# and the TOF spectrum of a 200x200-pixel ROI (same TOF axis)
E2E_HISTOGRAMS = [
    {"name": "tof", "kind": "tof", "tof": {"start": 0, "stop": 7.2e7, "bins": 1000}},
    {"name": "image", "kind": "image", "pixels": {"first": 0, "shape": [1000, 1000]}},
    {"name": "roi", "kind": "roi", "pixels": {"first": 0, "shape": [1000, 1000]},
     "roi": {"rows": [400, 600], "cols": [400, 600]}, "tof": {"start": 0, "stop": 7.2e7, "bins": 1000}},
]  # fmt: skip


class CpuUse:
    """Cores busy on the whole machine (/proc/stat) and this process's CPU seconds, between
    `start()` and `stop()`: shows whether a run had CPU to spare or took every core."""

    def start(self) -> None:
        import resource

        self._stat, self._t = self._busy_idle(), time.monotonic()
        self._self = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])

    def stop(self) -> dict:
        import resource

        busy, idle = (b - a for a, b in zip(self._stat, self._busy_idle(), strict=True))
        own = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - self._self
        seconds = time.monotonic() - self._t
        return {"busy_cores": busy / seconds / _ticks(), "process_cpu": own, "seconds": seconds}

    @staticmethod
    def _busy_idle() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + values[4]  # idle, iowait
        return sum(values[:8]) - idle, idle  # user .. steal (guest time is inside user)


def _ticks() -> int:
    import os

    return os.sysconf("SC_CLK_TCK")


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


MULTI_PRODUCER = r"""
import sys, time, json, numpy as np, zmq
from livehist.engine.events import EventBatch, encode_ev44
per_msg = int(sys.argv[1])
rng = np.random.default_rng(7)
msgs = []
for i in range(8):
    tof = rng.integers(0, 70_000_000, per_msg, dtype=np.int32)
    pix = rng.integers(0, 1_000_000, per_msg, dtype=np.int32)
    idx = np.arange(0, per_msg, per_msg // 4, dtype=np.int64)[:4]
    msgs.append(encode_ev44(EventBatch(tof, pix, 1_700_000_000_000_000_000 + idx * 71_000_000, idx), i))
ctx = zmq.Context.instance()
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "bind":
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 8)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        print(port, flush=True)
    elif cmd[0] == "go":
        sent = n = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < float(cmd[1]):
            sock.send(msgs[n % 8], copy=False)
            n += 1
            sent += per_msg
        sock.close(linger=-1)  # frames still queued are delivered by ZeroMQ's I/O thread
        print(json.dumps({"events": sent, "messages": n, "seconds": time.monotonic() - t0}), flush=True)
"""


class MultiProducer:
    """One producer process for many runs: each run binds a fresh PUSH socket, then sends for a while."""

    def __init__(self, per_msg: int = 1 << 20) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", MULTI_PRODUCER, str(per_msg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert self.proc.stdout.readline().strip() == "ready"

    def _ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline()

    def bind(self) -> int:
        return int(self._ask("bind"))

    def run(self, seconds: float, counted, dropped, timeout: float = 60) -> tuple[dict, float]:
        """Send for `seconds`; wait until `counted()` reaches what was sent (or a drop); (sent, wall s)."""
        t0 = time.monotonic()
        sent = json.loads(self._ask(f"go {seconds}"))
        deadline = time.monotonic() + timeout
        while counted() < sent["events"] and time.monotonic() < deadline and dropped() == 0:
            time.sleep(0.002)
        return sent, time.monotonic() - t0

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
