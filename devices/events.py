"""The server's event socket exists before any device of ours pushes an event.

cppTango creates a server's ZeroMQ event socket when the first client subscribes to any event
in the process, and it marks the attribute as subscribed *before* it creates the socket
(`DServer::zmq_event_subscription_change`: `event_subscription()`, then
`create_event_socket()`, under the admin device's monitor, not the device's). A push from
another thread in between reaches `ZmqEventSupplier::push_event` with a null socket: a
segfault that takes every device of the server down. livehist devices push from their own
threads, so each server process subscribes once to one of its own devices right after it
starts; pushes are skipped (`ready()` is False) until that subscription has returned.
A client that subscribes meanwhile reads the current value when it subscribes, so nothing a
client shows is lost.

That subscription waits until the server has finished starting (`Util.is_svr_starting()` is
False). `open_event_socket` is called from `initialize_dynamic_attributes`, while the server is
still creating its devices; the first devices are already exported and answer, but the
DServer class is not yet set up. A subscription in that window reached cppTango 10.3's
`ZmqEventSupplier::create_event_socket`, which stores the new socket *before* it binds it and
then calls `Util::get_dserver_device()`: that threw "The DServerClass is not yet initialised",
and the server was left with an unbound socket and the event endpoint "tcp://*:". Every later
subscription (ours, a test's, a panel's) was handed "tcp://*:", which ZeroMQ refuses in
connect: "Failed to create connection to event ... ZMQ message: Invalid argument", for as long
as the server ran; its events went nowhere. A HistogramSum, whose later devices take long to
create, was the usual victim. Such a server cannot be repaired from inside: `_subscribe_once`
says so in the log.
"""

from __future__ import annotations

import logging
import re
import threading
import time

import tango

from livehist.engine.events import RateLimitedLog

log = logging.getLogger(__name__)

_ready = threading.Event()
_started = threading.Lock()
_TRY_FOR = 60.0  # seconds; then pushes go on anyway (never a silent device), and the log says so


def ready() -> bool:
    return _ready.is_set()


def open_event_socket(device_name: str) -> None:
    """Start, once per process, the subscription that makes cppTango create the event socket."""
    if not _started.acquire(blocking=False):
        return
    if not tango.Util._UseDb or tango.Util._FileDb:  # DeviceTestContext, --file=: no name to subscribe by
        _ready.set()
        return
    threading.Thread(
        target=_subscribe_once, args=(device_name,), name="livehist-event-socket", daemon=True
    ).start()


def _subscribe_once(device_name: str) -> None:
    deadline = time.monotonic() + _TRY_FOR
    last = None
    with tango.EnsureOmniThread():
        util = tango.Util.instance()
        while util.is_svr_starting():  # never before the server has started: see the module doc
            if time.monotonic() >= deadline:
                log.error("the server did not finish starting within %.0f s; pushing events anyway", _TRY_FOR)
                _ready.set()
                return
            time.sleep(0.05)
        while time.monotonic() < deadline:
            try:
                proxy = tango.DeviceProxy(device_name)
                proxy.set_timeout_millis(3000)
                sub = proxy.subscribe_event("State", tango.EventType.CHANGE_EVENT, lambda _event: None)
                _ready.set()
                try:
                    proxy.unsubscribe_event(sub)
                except tango.DevFailed:
                    pass
                return
            except tango.DevFailed as exc:  # the server is not exported yet
                last = exc.args[0].desc.strip()
                broken = _half_made_endpoint(device_name) if "Invalid argument" in last else None
                if broken is not None:
                    log.error(
                        "this server's event socket was left half made by cppTango (event endpoint %r): "
                        "no client can subscribe to its events until the server is restarted",
                        broken,
                    )
                    _ready.set()
                    return
                time.sleep(0.2)
    log.error(
        "could not subscribe to %s to open the event socket (%s); pushing events anyway", device_name, last
    )
    _ready.set()


def _half_made_endpoint(device_name: str) -> str | None:
    """The event endpoint this server hands out, if it has no host or no port ("tcp://*:")."""
    try:
        admin = tango.DeviceProxy(tango.DeviceProxy(device_name).adm_name())
        info = admin.command_inout("ZmqEventSubscriptionChange", ["info"])[1]
    except tango.DevFailed:
        return None
    for line in info:
        if line.startswith("Event: "):
            endpoint = line[len("Event: ") :].split("\n")[0]
            if endpoint and re.fullmatch(r"tcp://[^*:]+:\d+", endpoint) is None:
                return endpoint  # (empty: no event socket yet)
    return None


class PushFailures:
    """Events one attribute could not push (a value Tango cannot carry): counted, logged at most every
    few seconds per attribute, and named in Status, so that it costs that attribute's events only."""

    RECENT = 10.0  # seconds a failure stays in Status after the last one

    def __init__(self) -> None:
        self.count = 0
        self._last: dict[str, tuple[int, str, float]] = {}  # name -> (times, error, monotonic time)
        self._log = RateLimitedLog(log)

    def record(self, name: str, exc: Exception) -> None:
        why = f"{type(exc).__name__}: {exc}"[:200]
        self.count += 1
        self._last[name] = (self._last.get(name, (0,))[0] + 1, why, time.monotonic())
        self._log.warning(name, f"change event of {name} not sent ({why}); the other attributes go on")

    def note(self) -> str:
        """'' or what Status adds: the attributes whose events failed lately, with why."""
        now = time.monotonic()
        recent = [(n, times, why) for n, (times, why, at) in self._last.items() if now - at < self.RECENT]
        if not recent:
            return ""
        return "; " + "; ".join(
            f"change events of {n} not sent ({why}), {times} times since Init; read {n} instead"
            for n, times, why in recent
        )
