"""Event sources, opened from the EventSource URIs of CONTRACT.md.

A source runs one thread that hands items (raw message bytes or EventBatch) to `feed`.
Paced sources (simulator, file replay) block on a full queue; network sources never do:
their whole message is dropped and counted by the engine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

from livehist.engine.memory import retain_freed_memory
from livehist.errors import LivehistError

log = logging.getLogger("livehist.engine.sources")


class SourceError(LivehistError):
    """A bad EventSource URI or a source that cannot run."""


class Source:
    paced = False  # True: block when the engine queue is full instead of dropping
    max_wait = 0.5  # network sources: seconds to wait for queue room before dropping a message

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.error: str | None = None  # set when the source failed and stopped
        self.finished = False  # a replay that played all its loops
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._feed: Callable | None = None
        self.started_at = time.monotonic()
        self.last_message_at: float | None = None  # monotonic time of the last item handed on
        # True once the source reached what it reads from (a Kafka source: after the broker
        # answered and the partitions were assigned); sources that cannot tell say True at once
        self.connected = True
        # the engine's counter of messages lost before they reached it (set by Engine.start)
        self.count_lost: Callable[[int], None] | None = None
        # the engine's hook for a Kafka topic deleted and created again (its offsets begin anew)
        self.topic_renewed: Callable[[str], None] | None = None

    def start(self, feed: Callable) -> None:
        if not self.paced:  # messages of megabytes from a transport: see livehist.engine.memory
            retain_freed_memory()
        self._feed = feed
        self._stop.clear()
        self.error = None
        self.started_at, self.last_message_at = time.monotonic(), None
        self._thread = threading.Thread(
            target=self._main, name=f"livehist-source-{self.uri[:20]}", daemon=True
        )
        self._thread.start()

    def stop(self, wait: bool = True) -> None:
        self._stop.set()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def emit(self, item) -> bool:
        """Hand one item to the engine; paced sources wait (re-checking stop) for room."""
        self.last_message_at = time.monotonic()
        if not self.paced:  # absorb bursts (back-pressure); a consumer that stays slow drops
            return self._feed(item, block=True, timeout=self.max_wait)
        while not self._stop.is_set():
            if self._feed(item, block=True, timeout=0.2, retry=True):
                return True
        return False

    def silent_for(self) -> float:
        """Seconds since the last message (or since start when none came)."""
        return time.monotonic() - (self.last_message_at or self.started_at)

    def _main(self) -> None:
        try:
            self.run()
        except Exception as exc:  # a broken source must not take the process down
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("source %s failed: %s", self.uri, self.error)

    def run(self) -> None:
        raise NotImplementedError


def query(uri: str) -> tuple[object, dict[str, str]]:
    """The URI's parts and its parameters; a repeated parameter or a #fragment is refused
    (neither means anything here, and a '#' in a file name would cut the path short)."""
    parts = urlsplit(uri)
    if parts.fragment or uri.endswith("#"):
        raise SourceError(
            f"EventSource {uri!r}: '#{parts.fragment}' is not part of any livehist URI; "
            "remove it (write a '#' inside a name as %23)"
        )
    params = {}
    for key, values in parse_qs(parts.query, keep_blank_values=True).items():
        if len(values) > 1:
            raise SourceError(f"EventSource {uri!r}: {key} is given {len(values)} times; give it once")
        params[key] = values[0]
    return parts, params


def host_port(text: str, uri: str, example: str) -> tuple[str, int]:
    """HOST:PORT (port 1..65535), or SourceError naming the bad part and the form to use."""
    host, sep, port = text.rpartition(":")
    if "@" in text:
        raise SourceError(
            f"EventSource {uri!r}: {text!r} carries a user name; give HOST:PORT, e.g. {example}"
        )
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SourceError(
            f"EventSource {uri!r}: {text!r} is not HOST:PORT (port 1-65535); give HOST:PORT, e.g. {example}"
        )
    return host.strip("[]"), int(port)


def number(
    params: dict, key: str, default: float, uri: str, minimum: float = 0.0, integer: bool = False
) -> float:
    if key not in params:
        return default
    raw = params[key]
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise SourceError(f"EventSource {uri!r}: {key} must be {kind}, got {raw!r}") from None
    if not value >= minimum or value != value or value == float("inf"):
        raise SourceError(f"EventSource {uri!r}: {key} must be a finite number >= {minimum}, got {raw!r}")
    return value


def check_known(params: dict, known: set[str], uri: str) -> None:
    unknown = sorted(set(params) - known)
    if unknown:
        raise SourceError(
            f"EventSource {uri!r}: unknown parameter {unknown[0]!r}; known: {', '.join(sorted(known))}"
        )


def open_source(uri: str) -> Source:
    """The source for a URI, checked; raise SourceError naming what is wrong."""
    if not isinstance(uri, str) or "://" not in uri:
        raise SourceError(
            f"EventSource {uri!r} is not a URI; use sim://, zmq://HOST:PORT, zmq+sub://HOST:PORT, "
            "nexus:///PATH.nxs or kafka://BROKER/TOPIC"
        )
    scheme = uri.split("://", 1)[0]
    if scheme == "sim":
        from livehist.engine.sources.sim import SimSource

        return SimSource(uri)
    if scheme in ("zmq", "zmq+sub"):
        from livehist.engine.sources.zmq import ZmqSource

        return ZmqSource(uri)
    if scheme == "nexus":
        from livehist.engine.sources.nexus import NexusSource

        return NexusSource(uri)
    if scheme == "kafka":
        from livehist.engine.sources.kafka import KafkaSource

        return KafkaSource(uri)
    raise SourceError(
        f"EventSource {uri!r}: unknown scheme {scheme!r}; use sim, zmq, zmq+sub, nexus or kafka"
    )
