"""EventHistogrammer devices (real servers) against hostile sources: a flooding PUB, a host
name that does not resolve; the device says so and stays usable."""

from __future__ import annotations

import contextlib
import json
import time

import numpy as np
import pytest
import tango
import zmq

from livehist.engine.events import EventBatch, encode_ev44
from livehist.site import control
from tests.conftest import free_port
from tests.test_histsum import wait_for

TOF = {"name": "tof", "kind": "tof", "tof": {"start": 0, "stop": 1000, "bins": 10}}
PIXEL_TOF = {"name": "pt", "kind": "pixel_tof", "pixels": {"first": 0, "count": 4000},
             "tof": {"start": 0, "stop": 1000, "bins": 1000}}  # fmt: skip
DEV = "test/hostile/a"


@pytest.fixture(scope="module")
def dev(sites) -> tango.DeviceProxy:
    props = {"EventSource": ["sim://?rate=1e5"], "Histograms": [json.dumps([TOF, PIXEL_TOF])],
             "PublishPeriod": ["0.2"], "MaxQueueBytes": [str(2**20)]}  # fmt: skip
    site: control.Site = sites.up(
        {"servers": {"EventHistogrammer": {"hostile": {"EventHistogrammer": {DEV: {"properties": props}}}}}}
    )
    p = tango.DeviceProxy(site.url(DEV))
    p.set_timeout_millis(10_000)
    return p


def reinit(p: tango.DeviceProxy, source: str) -> None:
    p.Stop()
    p.put_property({"EventSource": [source]})
    p.Init()


ONE = EventBatch(np.arange(10, dtype=np.int32), np.arange(10, dtype=np.int32), np.zeros(1, np.int64),
                 np.zeros(1, np.int64))  # fmt: skip


@contextlib.contextmanager
def subscribed_pub(dev, probe: str = ""):
    """A PUB the device (zmq+sub://, Reset and Started) is subscribed to: messages sent from now on
    reach it (the probes sent until then, with message_id 0 and source `probe`, have arrived)."""
    port = free_port()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{port}")
    try:
        reinit(dev, f"zmq+sub://127.0.0.1:{port}")
        dev.Reset()
        dev.Start()
        wait_for(
            lambda: (pub.send(encode_ev44(ONE, 0, probe)), dev.MessageCount)[1] > 0, what="the subscription"
        )
        time.sleep(0.5)  # the probes still in flight arrive
        yield pub
    finally:
        pub.close(0)
        ctx.term()


def test_a_flooding_pub_is_counted_as_dropped_alarm_then_usable(dev):
    one = ONE
    with subscribed_pub(dev) as pub:
        first = dev.MessageCount
        states, i = set(), 0
        for _ in range(10):  # single small messages, far faster than the device takes them; a loaded
            for _ in range(200_000):  # machine can slow this sender more than the device: flood again
                i += 1
                pub.send(encode_ev44(one, i))
                if i % 5000 == 0:  # during the flood too: it can outlast the 2 s ALARM hold
                    states.add(dev.state())
            if dev.DroppedMessageCount > 0:
                break
        states.add(dev.state())
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # ALARM while messages are dropped (held 2 s)
            states.add(dev.state())
            time.sleep(0.05)
        pub.send(encode_ev44(one, i + 1))
        wait_for(lambda: dev.MessageCount + dev.DroppedMessageCount >= first + i + 1, what="every message")
        assert dev.DroppedMessageCount > 0
        assert dev.MessageCount + dev.DroppedMessageCount == first + i + 1
        assert tango.DevState.ALARM in states, states
        dev.Stop()
        counted = dev.EventCount
        assert counted == 10 * dev.MessageCount and int(dev.tof.sum()) == counted
        dev.Reset()  # usable afterwards: exact counts again
        dev.Start()
        wait_for(lambda: dev.state() in (tango.DevState.RUNNING, tango.DevState.ALARM), what="RUNNING")
        i = 1000
        while dev.MessageCount < 500:  # a new subscription: the PUB sends to it once it is joined
            pub.send(encode_ev44(one, i))
            i += 1
            time.sleep(0.001)
            assert i < 200_000, "the restarted source receives nothing"
        dev.Stop()
        assert dev.EventCount == 10 * dev.MessageCount == int(dev.tof.sum())


def test_a_host_name_that_does_not_resolve_is_fault_naming_it_and_init_recovers(dev):
    reinit(dev, "zmq://no-such-host.invalid:5599")
    dev.Start()
    wait_for(lambda: dev.state() == tango.DevState.FAULT, what="FAULT")
    assert "'no-such-host.invalid' does not resolve" in dev.Status()
    dev.Stop()
    reinit(dev, "sim://?rate=1e5")
    dev.Reset()
    dev.Start()
    wait_for(lambda: dev.EventCount > 0, what="events from sim://")
    dev.Stop()
    assert dev.state() == tango.DevState.ON and int(dev.tof.sum()) <= dev.EventCount


def test_a_sender_whose_message_ids_jump_is_not_counted_as_billions_dropped(dev):
    """Two senders on a PUB whose message_id jumped from 0 to 2**63-1 (renumbered, or ids that are
    timestamps) were counted as 2**64-4 dropped messages: DroppedMessageCount beyond int64 failed
    every read ('Expecting a integer type'), the publisher stopped pushing the counters after it, and
    the device said ALARM with '18,446,744,073,709,551,612 dropped'. A real gap still counts."""
    one = ONE
    with subscribed_pub(dev, "probe") as pub:
        first = dev.MessageCount
        for name in ("a", "b"):
            pub.send(encode_ev44(one, 0, name))
            pub.send(encode_ev44(one, 2**63 - 1, name))
        pub.send(encode_ev44(one, 10, "c"))
        pub.send(encode_ev44(one, 13, "c"))  # 11 and 12 lost: a real gap
        wait_for(lambda: dev.MessageCount == first + 6, what="the six messages")
        time.sleep(2.5)  # past the ALARM hold of a real drop
        assert dev.DroppedMessageCount == 2
        assert dev.state() == tango.DevState.RUNNING, dev.Status()
        counter = dev.UpdateCounter
        events = []
        sub = dev.subscribe_event("PulseCount", tango.EventType.CHANGE_EVENT, events.append)
        try:
            pub.send(encode_ev44(one, 14, "c"))
            wait_for(lambda: dev.UpdateCounter > counter + 2 and any(
                not e.err and e.attr_value.value == first + 7 for e in events), what="counters pushed")  # fmt: skip
        finally:
            dev.unsubscribe_event(sub)
        dev.Stop()
        assert dev.EventCount == 10 * dev.MessageCount == int(dev.tof.sum())
