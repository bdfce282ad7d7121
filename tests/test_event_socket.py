"""devices/events.py: a server's own first subscription, which makes cppTango create its event
socket, waits until the server has started (see the module docstring for what one made while
the server was still creating its devices did to every later subscriber)."""

from __future__ import annotations

import threading
import time
import types

import pytest
from livehist.devices import events


class FakeDevFailed(Exception):
    def __init__(self, desc: str) -> None:
        super().__init__(types.SimpleNamespace(desc=desc))


def fake_tango(starting: list[bool], calls: list, subscribe_error: str | None = None, info=None):
    class Util:
        @staticmethod
        def instance():
            return Util()

        def is_svr_starting(self) -> bool:
            return starting[0]

    class DeviceProxy:
        def __init__(self, name: str) -> None:
            calls.append(("proxy", name, starting[0]))

        def set_timeout_millis(self, ms: int) -> None:
            pass

        def adm_name(self) -> str:
            return "dserver/x/1"

        def subscribe_event(self, *args):
            calls.append(("subscribe", starting[0]))
            if subscribe_error:
                raise FakeDevFailed(subscribe_error)
            return 1

        def unsubscribe_event(self, sub: int) -> None:
            pass

        def command_inout(self, name: str, arg):
            return [[1033], info or []]

    class EnsureOmniThread:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    return types.SimpleNamespace(Util=Util, DeviceProxy=DeviceProxy, EnsureOmniThread=EnsureOmniThread,
                                 DevFailed=FakeDevFailed, EventType=types.SimpleNamespace(CHANGE_EVENT=0))  # fmt: skip


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(events, "_ready", threading.Event())
    return monkeypatch


def test_the_first_subscription_waits_until_the_server_has_started(fresh):
    starting, calls = [True], []
    fresh.setattr(events, "tango", fake_tango(starting, calls))
    t = threading.Thread(target=events._subscribe_once, args=("test/x/1",), daemon=True)
    t.start()
    time.sleep(0.5)  # the server still creating its devices: nobody subscribes, nothing is pushed
    assert calls == [] and not events.ready()
    starting[0] = False
    t.join(timeout=5)
    assert calls == [("proxy", "test/x/1", False), ("subscribe", False)]
    assert events.ready()


def test_a_half_made_event_socket_is_said_and_not_retried_for_a_minute(fresh, caplog):
    calls = []
    half_made = ["Heartbeat: tcp://192.0.2.2:41859", "Event: tcp://*:"]
    zmq_refusal = "Failed to create connection to event!\nZMQ message: Invalid argument"
    fresh.setattr(events, "tango", fake_tango([False], calls, zmq_refusal, half_made))
    t0 = time.monotonic()
    events._subscribe_once("test/x/1")
    assert time.monotonic() - t0 < 5 and events.ready()
    assert [c[0] for c in calls].count("subscribe") == 1
    assert "half made by cppTango (event endpoint 'tcp://*:')" in caplog.text


@pytest.mark.parametrize(
    "line, half_made",
    [
        ("Event: tcp://*:", "tcp://*:"),
        ("Event: tcp://*:40000", "tcp://*:40000"),
        ("Event: tcp://", "tcp://"),
        ("Event: tcp://192.0.2.2:40000", None),
        ("Event: ", None),
    ],  # (empty: no event socket yet),  # fmt: skip
)
def test_half_made_endpoints_are_told_from_complete_ones(fresh, line, half_made):
    fresh.setattr(events, "tango", fake_tango([False], [], info=["Heartbeat: tcp://192.0.2.2:1", line]))
    assert events._half_made_endpoint("test/x/1") == half_made


def test_up_starts_the_sums_servers_after_their_members_servers():
    """A HistogramSum subscribes to its members' events as soon as it starts: `up` starts the
    servers holding sums only once the others answer (startup levels, as Tango's Starter has),
    so no sum's subscription reaches a member server still creating its devices."""
    from livehist.site.control import start_levels

    servers = {
        "HistogramSum/s": [("HistogramSum", "t/sum/1")],
        "EventHistogrammer/w1": [("EventHistogrammer", "t/w/1"), ("EventHistogrammer", "t/w/odd")],
        "Both/x": [("EventHistogrammer", "t/w/3"), ("HistogramSum", "t/sum/2")],
        "MetadataManager/m": [("MetadataManager", "t/meta/1")],
    }
    first, then = start_levels(servers)
    assert list(first) == ["EventHistogrammer/w1", "MetadataManager/m"]
    assert list(then) == ["HistogramSum/s", "Both/x"]
    assert start_levels({"EventHistogrammer/w1": servers["EventHistogrammer/w1"]}) == [
        {"EventHistogrammer/w1": servers["EventHistogrammer/w1"]}
    ]
    assert start_levels({}) == []
