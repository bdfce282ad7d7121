"""Soak for a device hang seen twice (session 2): run it, it prints where it stops.

A max-rate ZeroMQ producer feeds the EventHistogrammer; a client subscribes to `image`
(10^6 pixels, 8 MB events) and `tof`, calls Stop, unsubscribes at once, then reads
EventCount. Twice in about a dozen runs the read timed out: the publisher thread was
blocked in Tango::ZmqEventSupplier::push_event (a futex wait for the previous large
event's buffer) while holding the device monitor, so every later request failed with
API_CommandTimedOut. On a hang the script dumps the device's threads with py-spy
(`pip install py-spy`) if it is installed.

    .venv/bin/python scripts/soak_unsubscribe_after_stop.py [ITERATIONS]
"""

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tango

from livehist.bench.common import Producer
from livehist.bench.device import DEVICE, _reinit, _site
from livehist.site import control
from livehist.site.process import Managed

iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 15
with tempfile.TemporaryDirectory() as tmp:
    site = _site(Path(tmp), "sim://")
    try:
        p = tango.DeviceProxy(site.url(DEVICE))
        p.set_timeout_millis(10000)
        for k in range(iterations):
            producer = Producer(8)
            _reinit(p, f"zmq://127.0.0.1:{producer.port}")
            subs = [
                p.subscribe_event(n, kind, lambda e: None)
                for n, kind in (
                    ("image", tango.EventType.DATA_READY_EVENT),
                    ("tof", tango.EventType.CHANGE_EVENT),
                )
            ]
            p.Start()
            time.sleep(0.5)
            sent, took = producer.run(lambda: p.EventCount, lambda: p.DroppedMessageCount)
            p.Stop()
            for s in subs:
                p.unsubscribe_event(s)
            try:
                print(k, "ok" if p.EventCount == sent["events"] else "count differs", flush=True)
            except tango.DevFailed as exc:
                print(k, "HANG:", exc.args[0].desc.strip()[:120], flush=True)
                spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
                pid = Managed(Path(tmp), "EventHistogrammer-bench").pid()
                if Path(spy).exists() and pid:
                    print(subprocess.run([spy, "dump", "--native", "--pid", str(pid)], capture_output=True,
                                         text=True).stdout)  # fmt: skip
                break
            finally:
                producer.close()
    finally:
        control.down(Path(tmp), say=lambda s: None)
