"""zmq://HOST:PORT (PULL, connects to a bound PUSH) and zmq+sub://HOST:PORT (SUB to a PUB).

Each message is one ev44 (or ev42) flatbuffer. The receive thread only moves bytes into the
engine's bounded queue; decoding happens on the engine thread.
"""

from __future__ import annotations

import zmq

from livehist.engine.sources import Source, SourceError, check_known, host_port, query


class ZmqSource(Source):
    paced = False

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        parts, params = query(uri)
        check_known(params, set(), uri)
        if not parts.netloc:
            raise SourceError(f"EventSource {uri!r}: give HOST:PORT, e.g. zmq://127.0.0.1:5555")
        host, port = host_port(parts.netloc, uri, "zmq://127.0.0.1:5555")
        self.endpoint = f"tcp://{host}:{port}"
        self.kind = zmq.SUB if parts.scheme == "zmq+sub" else zmq.PULL

    def run(self) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(self.kind)
        sock.setsockopt(zmq.RCVHWM, 8)  # keep memory bounded: back-pressure stays in the sender
        sock.setsockopt(zmq.LINGER, 0)
        if self.kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(self.endpoint)
        try:
            while not self.stopping:
                if sock.poll(100):
                    # zero-copy: the frame's memory is decoded in place (no 8 MB memcpy under the GIL)
                    self.emit(sock.recv(copy=False).buffer)
        finally:
            sock.close(linger=0)
