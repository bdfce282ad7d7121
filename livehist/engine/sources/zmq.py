"""zmq://HOST:PORT (PULL, connects to a bound PUSH) and zmq+sub://HOST:PORT (SUB to a PUB).

Each message is one ev44 (or ev42) flatbuffer. The receive thread only moves bytes into the
engine's bounded queue; decoding happens on the engine thread. A PUB drops messages for a slow
subscriber without a word (PUSH waits instead): a SUB source counts the gaps in each sender's
message ids as dropped messages.
"""

from __future__ import annotations

import logging
import socket
import time

import zmq
from streaming_data_types.fbschemas.eventdata_ev42 import EventMessage
from streaming_data_types.fbschemas.eventdata_ev44 import Event44Message

from livehist.engine.events import RateLimitedLog
from livehist.engine.sources import Source, SourceError, check_known, host_port, query

log = logging.getLogger("livehist.engine.sources.zmq")
MAX_SENDERS = 1024  # source names whose last message id is kept (garbage must not grow it)
# messages a second no ZeroMQ sender reaches (about 1e6-1e7 small ones on loopback): a larger gap in a
# sender's message ids is a renumbered sender (2**63 once made DroppedMessageCount unreadable), not a drop
MAX_MESSAGE_RATE = 1e7


class ZmqSource(Source):
    paced = False

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        parts, params = query(uri)
        check_known(params, set(), uri)
        if not parts.netloc:
            raise SourceError(f"EventSource {uri!r}: give HOST:PORT, e.g. zmq://127.0.0.1:5555")
        host, port = host_port(parts.netloc, uri, "zmq://127.0.0.1:5555")
        self.host, self.port = host, port
        self.endpoint = f"tcp://{host}:{port}"
        self.kind = zmq.SUB if parts.scheme == "zmq+sub" else zmq.PULL
        self._jumps = RateLimitedLog(log)

    def run(self) -> None:
        # ZeroMQ connects to a host name that does not resolve without a word (or says only
        # 'Invalid argument'): resolve it here, at each (re)start, so the device says what is wrong
        try:
            socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise SourceError(
                f"host name {self.host!r} does not resolve ({getattr(exc, 'strerror', None) or exc}); "
                f"check the EventSource {self.uri!r}"
            ) from None
        ctx = zmq.Context.instance()
        sock = ctx.socket(self.kind)
        sock.setsockopt(zmq.RCVHWM, 8)  # keep memory bounded: back-pressure stays in the sender
        sock.setsockopt(zmq.LINGER, 0)
        if self.kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(self.endpoint)
        last: dict[bytes, tuple[int, float]] | None = {} if self.kind == zmq.SUB else None
        try:
            while not self.stopping:
                if sock.poll(100):
                    # zero-copy: the frame's memory is decoded in place (no 8 MB memcpy under the GIL)
                    payload = sock.recv(copy=False).buffer
                    if last is not None:
                        self._note_gap(payload, last)
                    self.emit(payload)
        finally:
            sock.close(linger=0)

    def _note_gap(self, payload, last: dict[bytes, tuple[int, float]]) -> None:
        """Count the messages a PUB dropped: ids a sender skipped since its previous message.
        An id that does not grow (a restarted sender, or one that leaves ids at 0) is no gap, nor is
        a jump by more messages than could have been sent since (a sender renumbered)."""
        sender = message_id(payload)
        if sender is None:
            return  # not ev44/ev42: the engine counts it as bad
        name, mid = sender
        now = time.monotonic()
        before = last.get(name)
        if before is not None and mid > before[0] + 1:
            gap = mid - before[0] - 1
            if gap > (now - before[1] + 1.0) * MAX_MESSAGE_RATE:
                self._jumps.warning(
                    name.decode(errors="replace"),
                    f"sender {name!r}: message_id jumped from {before[0]} to {mid}, more messages than it "
                    "can have sent since; taken as a renumbered sender, not as dropped messages",
                )
            elif self.count_lost is not None:
                self.count_lost(gap)
        if name not in last and len(last) >= MAX_SENDERS:
            last.clear()
        last[name] = (mid, now)


def message_id(payload) -> tuple[bytes, int] | None:
    """(source name, message id) of an ev44 or ev42 message; None for anything else."""
    if len(payload) < 8:
        return None
    schema = bytes(payload[4:8])
    try:
        if schema == b"ev44":
            msg = Event44Message.Event44Message.GetRootAs(payload, 0)
        elif schema == b"ev42":
            msg = EventMessage.EventMessage.GetRootAsEventMessage(payload, 0)
        else:
            return None
        return bytes(msg.SourceName() or b""), int(msg.MessageId())
    except Exception:  # a corrupt flatbuffer: decoding counts it as bad
        return None
