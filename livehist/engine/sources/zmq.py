"""zmq://HOST:PORT (PULL, connects to a bound PUSH) and zmq+sub://HOST:PORT (SUB to a PUB).

Each message is one ev44 (or ev42) flatbuffer. The receive thread only moves bytes into the
engine's bounded queue; decoding happens on the engine thread. A PUB drops messages for a slow
subscriber without a word (PUSH waits instead): a SUB source counts the gaps in each sender's
message ids as dropped messages.

`?max_message_bytes=N` (default 256 MiB) bounds one message: ZeroMQ refuses a larger one while it
arrives (ZMQ_MAXMSGSIZE), before it takes that memory, and drops that connection for good. The
source notices (a disconnect that libzmq does not retry), counts the message as dropped, and
connects again. Messages the sender had already queued behind it on that connection are lost with
it: a SUB source counts them by message id, a PULL source cannot see them.
"""

from __future__ import annotations

import logging
import socket
import time

import zmq
from streaming_data_types.fbschemas.eventdata_ev42 import EventMessage
from streaming_data_types.fbschemas.eventdata_ev44 import Event44Message
from zmq.utils.monitor import recv_monitor_message

from livehist.engine.events import RateLimitedLog
from livehist.engine.sources import Source, SourceError, check_known, host_port, number, query

log = logging.getLogger("livehist.engine.sources.zmq")
MAX_SENDERS = 1024  # source names whose last message id is kept (garbage must not grow it)
# messages a second no ZeroMQ sender reaches (about 1e6-1e7 small ones on loopback): a larger gap in a
# sender's message ids is a renumbered sender (2**63 once made DroppedMessageCount unreadable), not a drop
MAX_MESSAGE_RATE = 1e7
# the default MaxQueueBytes: a larger message would never be queued beside another
DEFAULT_MAX_MESSAGE_BYTES = 256 * 2**20
# a disconnect that libzmq retries is followed at once by CONNECT_RETRIED; none within this: a refusal
RETRY_WAIT_MS = 200
MAX_MAXMSGSIZE = 2**63 - 1  # ZMQ_MAXMSGSIZE is an int64


class ZmqSource(Source):
    paced = False

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        parts, params = query(uri)
        check_known(params, {"max_message_bytes"}, uri)
        self.max_message_bytes = int(
            number(params, "max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES, uri, minimum=1, integer=True)
        )
        if self.max_message_bytes > MAX_MAXMSGSIZE:  # setsockopt raised OverflowError in the thread, for ever
            raise SourceError(
                f"EventSource {uri!r}: max_message_bytes must be at most {MAX_MAXMSGSIZE} (ZMQ_MAXMSGSIZE is "
                f"an int64), got {params['max_message_bytes']!r}"
            )
        self.refused_messages = 0  # over max_message_bytes, counted as dropped too
        self._credit = 0  # refused messages that a SUB's next message-id gap would count again
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
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)  # refused while it arrives, never held
        if self.kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED)
        sock.connect(self.endpoint)
        last: dict[bytes, tuple[int, float]] | None = {} if self.kind == zmq.SUB else None
        self._credit = 0
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            while not self.stopping:
                ready = dict(poller.poll(100))
                if sock in ready:
                    self._receive(sock, last)
                if monitor in ready and self._refused(monitor):
                    while sock.poll(0):  # what arrived before it is kept
                        self._receive(sock, last)
                    sock.disconnect(self.endpoint)  # libzmq never reconnects after a refused message
                    sock.connect(self.endpoint)
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)

    def _receive(self, sock: zmq.Socket, last: dict | None) -> None:
        # zero-copy: the frame's memory is decoded in place (no 8 MB memcpy under the GIL)
        payload = sock.recv(copy=False).buffer
        if last is not None:
            self._note_gap(payload, last)
        self.emit(payload)

    def _refused(self, monitor: zmq.Socket) -> bool:
        """Did ZeroMQ drop the connection for a message over max_message_bytes? (A sender that went
        away is a disconnect too, but libzmq retries it at once: CONNECT_RETRIED follows.)"""
        disconnected = False
        while monitor.poll(RETRY_WAIT_MS if disconnected else 0):
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_CONNECT_RETRIED:
                disconnected = False
            elif event == zmq.EVENT_DISCONNECTED:
                disconnected = True
        if not disconnected:
            return False
        self.refused_messages += 1
        if self.kind == zmq.SUB:
            self._credit += 1  # the sender's next message id shows the gap: not counted twice
        if self.count_lost is not None:
            self.count_lost(1)
        self._jumps.warning(
            "max_message_bytes",
            f"{self.endpoint}: a message over max_message_bytes={self.max_message_bytes} was refused "
            "(counted as dropped); reconnecting. Raise max_message_bytes in the EventSource if such "
            "messages are real",
        )
        return True

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
            else:
                credit = min(gap, self._credit)  # refused messages, counted when refused
                self._credit -= credit
                if self.count_lost is not None:
                    self.count_lost(gap - credit)
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
