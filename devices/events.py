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
"""

from __future__ import annotations

import logging
import threading
import time

import tango

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
                time.sleep(0.2)
    log.error(
        "could not subscribe to %s to open the event socket (%s); pushing events anyway", device_name, last
    )
    _ready.set()
