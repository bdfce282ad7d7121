"""`livehist stream`: publish sim:// or nexus:// events as ev44 on a ZeroMQ PUSH/PUB socket."""

from __future__ import annotations

import time

import zmq

from livehist.engine.events import encode_ev44
from livehist.engine.sources import Source, open_source


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
    sock.bind(bind)
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
    if src.error:
        say(f"source failed: {src.error}")
    say(f"sent {sent['events']} events in {sent['messages']} messages")
    return sent["events"]
