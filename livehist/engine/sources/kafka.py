"""kafka://BROKER[,BROKER]/TOPIC[,TOPIC]?source=NAME&group=G&start=S&stop=T  (confluent-kafka).

ev44/ev42 messages from every partition of every topic, consumed in batches. Each message is
decoded here, in place (the arrays are views of the message's bytes), cut to the counting
window `[start, stop)` by pulse time (ev44 `reference_time`) and handed to the engine with its
origin (topic, partition, offset), so the engine knows exactly which offsets it has counted.
Malformed messages go to the engine as they are, which counts them as bad.

- `start=latest` (default), `earliest`, or a time (ISO 8601, or Unix milliseconds): every
  partition is sought with Kafka's offsets-for-times (a little earlier, `LOOKBACK_MS`, since a
  message's timestamp is its first pulse), then pulses before `start` are skipped.
- `stop=TIME`: pulses at or after it are not counted; the source ends the acquisition
  (`ended`) once every partition has passed it (a message with a pulse at or after `stop`, or
  the partition's end reached while the clock is `STOP_GRACE_S` past `stop`).
- `group=G`: a consumer group (devices with one group share the partitions). Without it the
  source assigns itself every partition (no group join, so no wait) and sees every event.
- Back-pressure, not drops: when histogramming falls behind, the source waits and the
  messages wait in Kafka (the consumer lags; nothing is lost while retention holds them).
- Transient errors (a broker restarting, a timeout) are logged at a bounded rate; the source
  fails (`error`, so FAULT) only when no broker has been reachable for `DOWN_AFTER_S`, or
  none answers within `CONNECT_TIMEOUT_S` at start. The histogrammer then reopens it with
  back-off; the new source continues from the offsets the old one reached (`resume_after`).

For owners that checkpoint or commit (HistogramSum, issue 19): `start_from({(topic, partition):
offset})` before Start; `positions()` the next offset to read per partition; the engine's
`Snapshot.offsets` the (first, last) offsets counted per partition, taken under the engine's
lock with the histograms; `commit({(topic, partition): next_offset})` commits through the
consumer thread (offsets are never committed automatically).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import numpy as np

from livehist.engine.events import BadMessage, EventBatch, RateLimitedLog, Tagged, decode
from livehist.engine.sources import Source, SourceError, check_known, host_port, query

log = logging.getLogger("livehist.engine.sources.kafka")

BATCH_MESSAGES = 500  # messages per consume(): one call into librdkafka per batch, not per message
CONNECT_TIMEOUT_S = 5.0
DOWN_AFTER_S = 3.0  # no broker reachable this long (with 1 s statistics): FAULT within 10 s
COMMIT_ANSWER_S = 15.0  # a commit unanswered this long counts as failed (`_commit_held`)
COMMIT_SILENT_S = 2.0  # no commit sent after this long without a word from the broker (`_commit_held`)
STALLED_S = 1.0  # a consume(0.1 s) that took this long: this process was stalled, not the broker silent
STOP_GRACE_S = 2.0  # an idle partition at its end counts as past `stop` this long after it
LOOKBACK_MS = 10_000  # seek this much before `start`: a message's timestamp is its first pulse
GROUP_TIMING = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}  # join in ~3 s, not ~23 s
WITHIN = "to the nanosecond at most, between the years 1824 and 2116"
TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")

Key = tuple[str, int]


def _iso_ns(text: str) -> int:
    """ISO 8601 as integer ns since the epoch, every digit of the fraction kept (to the ns)."""
    fraction = re.search(r"[.,](\d+)", text)  # datetime keeps microseconds only: the rest separately
    digits = fraction.group(1) if fraction else ""
    if len(digits) > 9:
        raise ValueError(text)
    if fraction:
        text = text[: fraction.start()] + text[fraction.end() :]
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:  # naive = local time
        moment = moment.astimezone()
    seconds = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(seconds=1)
    return seconds * 10**9 + int(digits.ljust(9, "0") or 0)


def parse_time(raw: str, key: str, uri: str) -> int:
    """ISO 8601 (naive = local time) or Unix milliseconds, as ns since the epoch: exactly, in
    integers (a float misplaced 3 ms values in 4 by up to 128 ns, so a pulse exactly at `start`
    was left out and one exactly at `stop` counted)."""
    text = re.sub(r" (\d\d(:?\d\d)?)$", r"+\1", raw.strip())  # a URI's unescaped '+' arrives as ' '
    try:
        if re.fullmatch(r"-?\d+(\.\d*)?", text):
            ms = Fraction(text)
            if ms * 10**6 != int(ms * 10**6):
                raise ValueError(raw)  # finer than a nanosecond
            ns = int(ms * 10**6)
        else:
            ns = _iso_ns(text)
        if not -(2**62) < ns < 2**62:  # beyond int64 nanoseconds (year 2116)
            raise ValueError(raw)
        return ns
    except (ValueError, OverflowError):
        raise SourceError(
            f"EventSource {uri!r}: {key} must be latest, earliest, an ISO 8601 time "
            f"(2026-11-22T10:00:00Z) or Unix milliseconds, {WITHIN}, got {raw!r}"
            if key == "start"
            else f"EventSource {uri!r}: {key} must be an ISO 8601 time (2026-11-22T10:00:00Z) "
            f"or Unix milliseconds, {WITHIN}, got {raw!r}"
        ) from None


def broker_answers(brokers: dict, cgrp: dict | None) -> bool:
    """From librdkafka's statistics: is a broker up and answering?

    UP and heard from lately: fetches (every fetch.wait.max.ms) or heartbeats keep `rxidle`
    (µs since the last receive; -1 before the first) small, a frozen broker lets it grow. While
    the consumer group is joining, the coordinator holds the JoinGroup request until the group's
    other members rejoin or time out (a member killed without leaving: its session, 6 s), and
    nothing else may arrive meanwhile: then a connected (UP) broker counts as answering. A frozen
    one is still found out: its requests time out (socket.timeout.ms) and its state leaves UP."""
    quiet_us = DOWN_AFTER_S * 1e6 / 2
    up = [b for b in brokers.values() if isinstance(b, dict) and b.get("state") == "UP"]
    if any(b.get("rxidle", -1) < quiet_us for b in up):
        return True
    joining = isinstance(cgrp, dict) and cgrp.get("join_state") not in (None, "init", "steady")
    return bool(up) and joining


def _close_later(consumer, brokers: str) -> None:
    """Close a consumer whose broker is gone, off the source's thread (Stop and the reconnect
    do not wait for it); it ends when the broker answers again or the process exits."""
    t0 = time.monotonic()
    try:
        consumer.close()
    except Exception as exc:  # closed already, or librdkafka's own error: nothing to keep
        log.debug("closing the consumer of %s: %s", brokers, exc)
        return
    if time.monotonic() - t0 > 10:
        log.info(
            "the consumer of %s that lost its broker closed after %.0f s", brokers, time.monotonic() - t0
        )


class _RdLog:
    """librdkafka's log lines into Python logging, at most one per facility every 5 s."""

    def __init__(self) -> None:
        self.limited = RateLimitedLog(log)

    def log(self, level: int, fmt: str, *args) -> None:
        message = fmt % args if args else fmt
        if level >= logging.WARNING:
            self.limited.warning(message.split(" ", 1)[0], f"librdkafka: {message}")
        else:
            log.debug("librdkafka: %s", message)


class KafkaSource(Source):
    # the broker keeps what we have not read: wait for room instead of dropping (a backlog read
    # with start=earliest would otherwise lose messages while the kernels compile)
    paced = True

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        try:
            import confluent_kafka  # noqa: F401
        except ImportError:
            raise SourceError("kafka:// needs confluent-kafka: pip install 'livehist[kafka]'") from None
        parts, params = query(uri)
        check_known(params, {"source", "group", "start", "stop"}, uri)
        self.brokers = parts.netloc
        self.topics = [t.strip() for t in parts.path.strip("/").split(",") if t.strip()]
        if not self.brokers or not self.topics:
            raise SourceError(f"EventSource {uri!r}: give kafka://BROKER[,BROKER]/TOPIC[,TOPIC]")
        brokers = self.brokers.split(",")
        if any(not b.strip() for b in brokers):
            raise SourceError(
                f"EventSource {uri!r}: an empty broker in {self.brokers!r}; give BROKER[,BROKER]"
            )
        for broker in brokers:
            host_port(broker.strip(), uri, "kafka://localhost:9092/TOPIC")
        for topic in self.topics:
            if not TOPIC_NAME.match(topic) or topic in (".", ".."):
                raise SourceError(
                    f"EventSource {uri!r}: topic {topic!r} is not a Kafka topic name "
                    "(letters, digits, '.', '_', '-'; at most 249; not '.' or '..')"
                )
        if len(set(self.topics)) < len(self.topics):
            twice = next(t for t in self.topics if self.topics.count(t) > 1)
            raise SourceError(f"EventSource {uri!r}: topic {twice!r} is listed twice; list each topic once")
        self.source_name = params.get("source") or None
        self.group = params.get("group") or None
        if "group" in params and not self.group:
            raise SourceError(
                f"EventSource {uri!r}: group must not be empty (leave it out for a private one)"
            )
        if self.group and re.search(r"[\x00-\x1f\x7f]", self.group):
            raise SourceError(
                f"EventSource {uri!r}: group {self.group!r} holds a control character (such as %00); "
                "use printable characters"
            )
        start = params.get("start", "latest").strip() or "latest"
        self.start_mode = start if start in ("latest", "earliest") else "time"
        self.start_ns = parse_time(start, "start", uri) if self.start_mode == "time" else None
        self.stop_ns = parse_time(params["stop"], "stop", uri) if params.get("stop") else None
        if self.start_ns is not None and self.stop_ns is not None and self.stop_ns <= self.start_ns:
            raise SourceError(f"EventSource {uri!r}: stop must be after start")
        if self.start_mode == "latest" and self.stop_ns is not None and self.stop_ns <= time.time_ns():
            raise SourceError(
                f"EventSource {uri!r}: stop is in the past and start is latest, so nothing would be "
                "counted; give start=earliest or a start time to read back, or a later stop"
            )
        self.ended: str | None = None  # set when `stop` is passed: the engine ends the acquisition
        self.outside_messages = 0  # messages wholly outside [start, stop)
        self._resume: dict[Key, int] = {}
        self._resume_ids: dict[str, str] = {}  # topic ids the resumed offsets belong to
        self.topic_ids: dict[str, str] = {}
        self._next: dict[Key, int] = {}
        self._commit_lock = threading.Lock()
        self._commit_request: dict[Key, int] | None = None
        self.commit_error: str | None = None
        self._commit_in_flight = False  # an asynchronous commit not yet answered (`_on_commit`)
        self._commit_sent_at = 0.0
        self._session: object | None = None  # the current consumer's token (`_this_session`)
        self._errors = RateLimitedLog(log)

    # --- the API for owners (checkpoints, commits, reconnects) -----------------------------
    def start_from(self, offsets: dict[Key, int]) -> None:
        """Before Start: read these partitions from these offsets (next to read), not from `start`."""
        self._resume = {(str(t), int(p)): int(o) for (t, p), o in offsets.items()}

    def positions(self) -> dict[Key, int]:
        """The next offset to read, per partition this source has read from (or was given)."""
        return {**self._resume, **self._next}

    def resume_after(self, old: Source) -> None:
        """A reconnect: continue where the failed source `old` stopped reading."""
        if isinstance(old, KafkaSource) and old.topics == self.topics:
            self.start_from(old.positions())
            self._resume_ids = dict(old.topic_ids or old._resume_ids)

    def commit(self, offsets: dict[Key, int] | None = None) -> None:
        """Commit these offsets (default: `positions()`) for the group, from the consumer thread."""
        if self.group is None:
            raise SourceError(f"EventSource {self.uri!r}: offsets are committed only for a group=")
        with self._commit_lock:
            self._commit_request = dict(offsets if offsets is not None else self.positions())

    # --- the consumer thread -----------------------------------------------------------
    def _config(self) -> dict:
        return {
            "bootstrap.servers": self.brokers,
            "group.id": self.group or f"livehist-{uuid.uuid4()}",
            "enable.auto.commit": False,  # the owner commits what it has counted
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest" if self.start_mode != "latest" or self._resume else "latest",
            "enable.partition.eof": True,
            "statistics.interval.ms": 1000,
            "stats_cb": self._this_session(self._stats),
            "error_cb": self._this_session(self._error),
            "on_commit": self._this_session(self._on_commit),
            "logger": _RdLog(),
            "fetch.max.bytes": 64 * 2**20,
            "max.partition.fetch.bytes": 16 * 2**20,
            # any message the broker holds is read (Kafka sizes are int32): at 80 MiB an 88 MB message
            # failed every fetch of its partition, which stayed RUNNING with nothing counted, for ever
            "receive.message.max.bytes": 2**31 - 1,
            "queued.max.messages.kbytes": 32 * 1024,  # prefetch per partition, bounded
            "fetch.wait.max.ms": 100,
            "socket.timeout.ms": 6000,  # a frozen broker (not closed, not answering) counts as gone
            **GROUP_TIMING,
        }

    def _stats(self, raw: str) -> None:
        try:
            stats = json.loads(raw)
            brokers = stats.get("brokers", {})
        except (ValueError, AttributeError):
            return
        if broker_answers(brokers, stats.get("cgrp")):
            self._last_up = time.monotonic()

    def _error(self, err) -> None:
        if err.fatal():
            self._fatal = str(err)
        self._errors.warning(err.name(), f"Kafka {self.brokers}: {err.str()}")

    def start(self, feed) -> None:
        self.ended = None  # before the engine can look: a previous run's stop is not this one's
        self.connected = False  # until the broker answers (`run`)
        super().start(feed)

    def _metadata(self, consumer):
        """The cluster's topics, asked in short steps so that Stop is never kept waiting."""
        from confluent_kafka import KafkaException

        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            try:
                return consumer.list_topics(timeout=0.5)
            except KafkaException as exc:
                if self.stopping:
                    return None
                if time.monotonic() >= deadline:
                    self.error = (
                        f"no Kafka broker answers at {self.brokers} within {CONNECT_TIMEOUT_S:g} s "
                        f"({exc.args[0].str()})"
                    )
                    return None

    def run(self) -> None:
        from confluent_kafka import Consumer

        self.ended = None
        self.connected = False
        self._fatal: str | None = None
        self._next = {}
        self._commit_in_flight = False  # a new consumer: nothing of its own in flight
        self._eof: dict[Key, bool] = {}
        self._passed: set[Key] = set()
        self._recreated: set[str] = set()
        self._session = object()  # this consumer's: its callbacks after it ended are ignored
        consumer = Consumer(self._config())
        try:
            metadata = self._metadata(consumer)
            if metadata is None:
                return
            partitions = []
            for topic in self.topics:
                meta = metadata.topics.get(topic)
                if meta is None or meta.error is not None or not meta.partitions:
                    known = sorted(t for t in metadata.topics if not t.startswith("__"))[:10]
                    self.error = (
                        f"topic {topic!r} does not exist on {self.brokers} "
                        f"(topics there: {', '.join(known) or 'none'}); create it or fix the EventSource"
                    )
                    return
                partitions += [(topic, p) for p in sorted(meta.partitions)]
            self._check_topic_ids()
            self._last_up = time.monotonic()
            if self.group:
                consumer.subscribe(self.topics, **self._rebalance_callbacks())
            else:
                consumer.assign(self._positions_for(consumer, partitions))
            self.connected = True  # the broker answered with the topics (a group then joins)
            self._consume(consumer)
        finally:
            # closing calls the rebalance and commit callbacks once more, in the background maybe while
            # a new consumer of this source runs: they concern that session no longer
            self._session = None
            if self.error is None and not self._commit_in_flight:
                consumer.close()
            else:  # the broker gone: close() waits for a commit in flight, for the coordinator, for ever
                threading.Thread(target=_close_later, args=(consumer, self.brokers), daemon=True,
                                 name="livehist-kafka-close").start()  # fmt: skip

    def _check_topic_ids(self) -> None:
        """Drop resumed offsets of a topic deleted and created again: its offsets start anew."""
        from confluent_kafka import KafkaException, TopicCollection
        from confluent_kafka.admin import AdminClient

        try:
            admin = AdminClient({"bootstrap.servers": self.brokers, "logger": _RdLog()})
            futures = admin.describe_topics(TopicCollection(self.topics), request_timeout=2.0)
            self.topic_ids = {t: str(f.result(2.5).topic_id) for t, f in futures.items()}
        except (KafkaException, Exception) as exc:  # a broker without topic ids: resume as it is
            log.debug("no topic ids from %s: %s", self.brokers, exc)
            return
        for topic, old_id in self._resume_ids.items():
            if self.topic_ids.get(topic) not in (None, old_id):
                log.warning("topic %s was created anew on %s: reading it from its start", topic, self.brokers)
                self._resume = {k: o for k, o in self._resume.items() if k[0] != topic}
                self._recreated.add(topic)
                self._forget_commits(topic)
                if self.topic_renewed is not None:
                    self.topic_renewed(topic)

    def _positions_for(self, consumer, keys: list[Key], group: bool = False) -> list:
        """Where each partition starts: given offsets, else `start` (offsets-for-times for a time)."""
        from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, OFFSET_INVALID, TopicPartition

        out = {k: TopicPartition(k[0], k[1], self._resume[k]) for k in keys if k in self._resume}
        out.update({k: TopicPartition(k[0], k[1], OFFSET_BEGINNING) for k in keys if k[0] in self._recreated})
        rest = [k for k in keys if k not in out]
        if rest and self.start_mode == "time":
            want = [TopicPartition(t, p, max(self.start_ns // 1_000_000 - LOOKBACK_MS, 0)) for t, p in rest]
            for tp in consumer.offsets_for_times(want, timeout=CONNECT_TIMEOUT_S):
                # -1: nothing at or after that time yet; read what comes
                out[(tp.topic, tp.partition)] = TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_END)  # fmt: skip
        elif rest and self.start_mode == "earliest":
            out.update({k: TopicPartition(k[0], k[1], OFFSET_BEGINNING) for k in rest})
        elif rest:  # latest; a group continues from its committed offsets, if any
            for k in rest:
                out[k] = TopicPartition(k[0], k[1], OFFSET_INVALID if group else OFFSET_END)
        return [out[k] for k in keys]

    def _rebalance_callbacks(self) -> dict:
        """The group's rebalance callbacks (a checkpointing worker adds on_revoke and on_lost)."""
        return {"on_assign": self._on_assign}

    def _on_assign(self, consumer, partitions) -> None:
        from confluent_kafka import TopicPartition

        keys = [(tp.topic, tp.partition) for tp in partitions]
        # a partition this source read before the rebalance goes on from there: nothing is committed
        # here, so the group's position is `start` again (earliest: every message counted twice)
        own = [k for k in keys if k in self._next]
        out = {k: TopicPartition(k[0], k[1], self._next[k]) for k in own}
        rest = [k for k in keys if k not in out]
        out.update(zip(rest, self._positions_for(consumer, rest, group=True) if rest else [], strict=True))
        consumer.assign([out[k] for k in keys])

    def _consume(self, consumer) -> None:
        from confluent_kafka import KafkaError

        eof_code = KafkaError._PARTITION_EOF
        silent = 0.0  # s spent waiting in consume() since the broker was last heard from
        while not self.stopping:
            heard, t0 = self._last_up, time.monotonic()
            messages = consumer.consume(BATCH_MESSAGES, 0.1)
            t1 = time.monotonic()
            if messages:
                self._last_up = t1
            if self._last_up != heard:  # messages, or statistics saying a broker answers
                silent = 0.0
            elif t1 - t0 < STALLED_S:
                silent += t1 - t0
            # else: a call far longer than its 0.1 s is this process stalled (frozen, a rebalance's
            # hand-over), not the broker silent; neither is the time spent handing messages over
            for m in messages:
                err = m.error()
                if err is None:
                    self._message(m)
                elif err.code() == eof_code:
                    self._eof[(m.topic(), m.partition())] = True
                elif err.fatal():
                    self._fatal = str(err)
                else:
                    self._errors.warning(err.name(), f"Kafka {m.topic()}[{m.partition()}]: {err.str()}")
            if self.stopping:
                return
            if self._fatal:
                self.error = f"Kafka consumer failed: {self._fatal}"
                return
            if silent > DOWN_AFTER_S:
                self.error = f"no Kafka broker reachable at {self.brokers} for {silent:.0f} s"
                return
            self._do_commit(consumer)
            if self.stop_ns is not None and self._past_stop(consumer):
                self.ended = "stop time reached"
                return

    def _message(self, m) -> None:
        key = (m.topic(), m.partition())
        offset = m.offset()
        self._next[key] = offset + 1
        self._eof[key] = False
        value = m.value()
        if value is None:
            value = b""  # a tombstone: the engine counts it as a bad message
        origin = (key[0], key[1], offset)
        try:
            batch = decode(value)
        except BadMessage:
            self.emit(Tagged(value, origin))  # decoded again by the engine, which counts it and logs why
            return
        if self.start_ns is not None or self.stop_ns is not None:
            batch = self._window(batch, key)
            if batch is None:
                self.outside_messages += 1
                self.emit(Tagged(None, origin))  # counted nowhere, but read: its offset is covered
                return
        batch.origin = origin
        self.emit(batch)

    def _window(self, batch: EventBatch, key: Key) -> EventBatch | None:
        """The pulses of `batch` inside [start, stop); None if there are none."""
        t = batch.pulse_time
        if t.size == 0:
            return batch
        lo = self.start_ns if self.start_ns is not None else np.iinfo(np.int64).min
        hi = self.stop_ns if self.stop_ns is not None else np.iinfo(np.int64).max
        if self.stop_ns is not None and int(t.max()) >= hi:
            self._passed.add(key)
        inside = (t >= lo) & (t < hi)
        if inside.all():
            return batch
        if not inside.any():
            return None
        ends = np.append(batch.pulse_index[1:], batch.tof.size)
        keep = np.flatnonzero(inside)
        slices = [slice(int(batch.pulse_index[i]), int(ends[i])) for i in keep]
        sizes = np.array([s.stop - s.start for s in slices], np.int64)
        index = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
        return EventBatch(
            np.concatenate([batch.tof[s] for s in slices]),
            np.concatenate([batch.pixel_id[s] for s in slices]),
            t[keep].astype(np.int64), index, batch.tof_unit, batch.source_name,
        )  # fmt: skip

    def _past_stop(self, consumer) -> bool:
        late = time.time_ns() >= self.stop_ns + STOP_GRACE_S * 1e9
        assigned = [(tp.topic, tp.partition) for tp in consumer.assignment()]
        if not assigned:  # nothing to read (a group whose other members hold every partition)
            return late
        return all(k in self._passed or (late and self._eof.get(k, False)) for k in assigned)

    def _this_session(self, callback):
        """`callback`, called only while the consumer it was made for is the current one: a consumer
        closed in the background (`_close_later`) calls its callbacks from close(), possibly
        during a later acquisition (its `lost` set the new counts back, its revoke took the new
        partitions out of `assigned`)."""
        session = self._session

        def guarded(*args):
            if self._session is session:
                return callback(*args)
            log.debug(
                "a callback of a consumer no longer in use ignored: %s",
                getattr(callback, "__name__", callback),
            )
            return None

        return guarded

    def _commit_held(self) -> bool:
        """No commit goes out while one is in flight, or while the broker has been silent for
        COMMIT_SILENT_S: librdkafka retries a commit until the group's coordinator answers, and
        closing the consumer waits for it, so one sent to a broker that is gone holds the close."""
        if self._commit_in_flight and time.monotonic() - self._commit_sent_at > COMMIT_ANSWER_S:
            self._commit_in_flight = False  # an answer that never came (librdkafka dropped it): say so
            self.commit_error = f"no answer to the commit sent {COMMIT_ANSWER_S:g} s ago"
            self._errors.warning("commit", f"Kafka commit failed: {self.commit_error}")
        return self._commit_in_flight or time.monotonic() - self._last_up > COMMIT_SILENT_S

    def _do_commit(self, consumer) -> None:
        """Send the offsets asked for by `commit` (see `_send_commit`)."""
        if self._commit_held():
            return
        with self._commit_lock:
            request, self._commit_request = self._commit_request, None
        if request:
            self._send_commit(consumer, request)

    def _send_commit(self, consumer, offsets: dict[Key, int]) -> None:
        """Commit asynchronously, one commit in flight at a time: its answer comes to `_on_commit`
        from `consume`, and a newer request waits for it. A synchronous commit waits for the
        group's coordinator: with the broker gone that was 6 s per commit, or for ever once the
        session had expired, and the consume loop that would have noticed the silence (FAULT)
        stood still, RUNNING."""
        from confluent_kafka import KafkaException, TopicPartition

        try:
            consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=True
            )
            self._commit_in_flight, self._commit_sent_at = True, time.monotonic()
        except KafkaException as exc:  # refused before it was sent (no group joined yet, ...)
            self.commit_error = str(exc)
            self._errors.warning("commit", f"Kafka commit failed: {exc}")

    def _on_commit(self, err, partitions) -> None:
        """librdkafka's answer to a commit (served from `consume`)."""
        self._commit_in_flight = False
        failed = [tp for tp in partitions or [] if tp.error is not None]
        if err is not None or failed:
            self.commit_error = str(err if err is not None else failed[0].error)
            self._errors.warning("commit", f"Kafka commit failed: {self.commit_error}")
            return
        self.commit_error = None
        self._committed([((tp.topic, tp.partition), tp.offset) for tp in partitions or []])

    def _committed(self, offsets: list[tuple[Key, int]]) -> None:
        """Offsets the broker has taken (a group worker keeps them)."""

    def _forget_commits(self, topic: str) -> None:
        """A topic created anew: its offsets begin again (a group worker forgets what it committed)."""
