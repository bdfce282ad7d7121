"""`livehist stream`: publish sim:// or nexus:// events as ev44 on a ZeroMQ PUSH/PUB socket."""

from __future__ import annotations

import time

import zmq

from livehist.engine.events import encode_ev44
from livehist.engine.sources import Source, open_source
from livehist.errors import LivehistError


class _Collector:
    """Stands in for the engine's feed: hands each batch to the publisher."""

    def __init__(self, send) -> None:
        self.send = send

    def __call__(self, item, block=True, timeout=None) -> bool:
        self.send(item)
        return True


def stream(
    source_uri: str,
    bind: str = "tcp://127.0.0.1:5555",
    pub: bool = False,
    seconds: float = 0.0,
    say=print,
) -> int:
    """Publish until `seconds` pass (0: until the source ends or Ctrl-C). Returns events sent."""
    ctx = zmq.Context()  # its own: term() below waits for our zero-copy frames only
    sock = ctx.socket(zmq.PUB if pub else zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 8)
    try:
        sock.bind(bind)
    except zmq.ZMQError as exc:
        sock.close(0)
        ctx.term()
        raise LivehistError(bind_error(bind, exc)) from None
    sent = {"events": 0, "messages": 0}

    def send(batch) -> None:
        sock.send(encode_ev44(batch, sent["messages"]), copy=False)
        sent["messages"] += 1
        sent["events"] += len(batch)

    src: Source = open_source(source_uri)
    say(f"publishing {source_uri} as ev44 on {'PUB' if pub else 'PUSH'} {bind} (Ctrl-C stops)")
    src.start(_Collector(send))
    t0 = last = time.monotonic()
    try:
        while not src.finished and src.error is None:
            time.sleep(0.1)
            now = time.monotonic()
            if seconds and now - t0 >= seconds:
                break
            if now - last >= 2:
                say(
                    f"  {sent['events']} events in {sent['messages']} messages ({sent['events'] / (now - t0):.3g} ev/s)"
                )
                last = now
    except KeyboardInterrupt:
        pass
    finally:
        src.stop()
        sock.close(linger=2000)
        ctx.term()  # frames still queued are sent (or dropped after the linger) before we return
    say(f"sent {sent['events']} events in {sent['messages']} messages")
    if src.error:  # what was sent is said above; the command still failed
        raise LivehistError(f"source failed: {src.error}")
    return sent["events"]


def bind_error(bind: str, exc: Exception) -> str:
    """One line for a ZeroMQ endpoint that cannot be bound, naming the fix."""
    if "://" not in bind:
        return f"--bind {bind!r} has no scheme; write it like tcp://127.0.0.1:5555"
    if getattr(exc, "errno", None) == zmq.EADDRINUSE:
        return f"cannot bind {bind}: the address is already in use (another stream or device?); choose another port"
    return f"cannot bind {bind}: {exc}; give an endpoint like tcp://127.0.0.1:5555"
