"""A frozen Tango client beside an EventHistogrammer: what it does (nothing) and why.

cppTango sends attribute events of 2048 values or more without copying them and waits
until ZeroMQ has released the buffer (ZmqEventSupplier::push_event: `push_cond.wait()`,
released by the `tg_unlock` callback). A client that is alive but reads nothing (SIGSTOP,
a debugger, a machine swapping to death) would keep that buffer, and pytango pushes holding
the device monitor and the GIL: reads and commands would time out. So the device pushes no
array of that size: it announces it by a DATA_READY event and clients read it. This script
subscribes a client the way it can (CHANGE is refused for such attributes; it says so and
takes DATA_READY), freezes it with SIGSTOP, and prints reads before, during and after.

Usage: .venv/bin/python scripts/frozen_client.py [ATTRIBUTE]   (default image_preview)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tango

from livehist.site import control
from livehist.site.process import free_port

CLIENT = """
import sys, time, tango
proxy = tango.DeviceProxy(sys.argv[1])
try:
    proxy.subscribe_event(sys.argv[2], tango.EventType.CHANGE_EVENT, lambda event: None)
    print("subscribed to CHANGE", flush=True)
except tango.DevFailed as exc:
    proxy.subscribe_event(sys.argv[2], tango.EventType.DATA_READY_EVENT, lambda event: None)
    print(f"CHANGE refused ({exc.args[0].reason}); subscribed to DATA_READY", flush=True)
time.sleep(1000)
"""


def main(attribute: str = "image_preview") -> None:
    device = "frozen/histogrammer/1"
    props = {"EventSource": ["sim://?rate=5e7&shape=1000x1000&first=0&seed=3"], "PublishPeriod": ["0.1"],
             "Histograms": [json.dumps([{"name": "image", "kind": "image",
                                         "pixels": {"first": 0, "shape": [1000, 1000]}}])]}  # fmt: skip
    config = {
        "servers": {"EventHistogrammer": {"frozen": {"EventHistogrammer": {device: {"properties": props}}}}}
    }
    with tempfile.TemporaryDirectory(prefix="livehist-frozen-") as tmp:
        state = Path(tmp)
        (state / "frozen.json").write_text(json.dumps(config))
        site = control.up(f"127.0.0.1:{free_port()}", state / "frozen.json", state, say=lambda s: None)
        client = None
        try:
            proxy = tango.DeviceProxy(site.url(device))
            proxy.set_timeout_millis(2000)
            proxy.Start()
            client = subprocess.Popen([sys.executable, "-c", CLIENT, site.url(device), attribute],
                                      stdout=subprocess.PIPE, text=True)  # fmt: skip
            print(f"client: {client.stdout.readline().strip()}", flush=True)

            def report(when: str) -> None:
                try:
                    print(
                        f"{when}: UpdateCounter {proxy.UpdateCounter}, EventRate {proxy.EventRate:.3g}/s",
                        flush=True,
                    )
                except tango.DevFailed as exc:
                    print(f"{when}: read failed: {exc.args[0].desc.strip()[:100]}", flush=True)

            time.sleep(2)
            report("client reading")
            os.kill(client.pid, signal.SIGSTOP)
            for k in range(3):
                time.sleep(2)
                report(f"client frozen for {2 * (k + 1)} s")
            os.kill(client.pid, signal.SIGCONT)
            time.sleep(2)
            report("client reading again")
            proxy.Stop()
            count, took = proxy.EventCount, proxy.ElapsedTime
            print(
                f"after Stop: {count:,} events in {took:.1f} s = {count / took:.3g}/s over the whole run, "
                "freeze included (the engine never waited for the publisher)"
            )
        finally:
            if client is not None:
                client.kill()
                client.wait()
            control.down(state, say=lambda s: None)


if __name__ == "__main__":
    main(*sys.argv[1:2])
