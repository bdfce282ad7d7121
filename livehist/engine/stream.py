"""`livehist stream`: publish sim:// or nexus:// events as ev44 on ZeroMQ (PUSH/PUB) or Kafka.

To Kafka, messages go round-robin over the topic's partitions, each with its Kafka timestamp
set to its first pulse time (ESS's convention, which offsets-for-times relies on); the topic is
created with `partitions` partitions if it does not exist.
"""

from __future__ import annotations

import logging
import time

import zmq

from livehist.engine.events import TOF_UNCARRIED, RateLimitedLog, encode_ev44
from livehist.engine.sources import Source, open_source
from livehist.errors import LivehistError

log = logging.getLogger("livehist.engine.stream")


class _Collector:
    """Stands in for the engine's feed: hands each batch to the publisher."""

    def __init__(self, send) -> None:
        self.send = send

    def __call__(self, item, block=True, timeout=None, retry=False) -> bool:
        self.send(item)
        return True


def stream(
    source_uri: str,
    bind: str = "tcp://127.0.0.1:5555",
    pub: bool = False,
    seconds: float = 0.0,
    say=print,
    kafka: str | None = None,
    partitions: int | None = None,
) -> int:
    """Publish until `seconds` pass (0: until the source ends or Ctrl-C). Returns events sent."""
    if kafka:
        return _stream_kafka(source_uri, kafka, partitions, seconds, say)
    check_bind(bind)
    src: Source = _replayable(source_uri)  # a bad source fails before anything is bound
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
    uncarried: list[int] = []  # events per batch whose TOF ev44 cannot carry

    def send(batch) -> None:
        # never blocked for good in the source's thread: with no consumer a PUSH socket holds
        # SNDHWM messages and then waits; the socket is closed by the main thread only after this
        # thread ended (closing it under a blocked send aborts the process inside ZeroMQ)
        frame = encode_ev44(batch, sent["messages"], uncarried=uncarried)
        while not sock.poll(100, zmq.POLLOUT):
            if src.stopping:
                return
        sock.send(frame, copy=False)
        sent["messages"] += 1
        sent["events"] += len(batch)

    # the port ZeroMQ chose for :* or :0 (it said ":0", where nobody can connect)
    where = sock.getsockopt_string(zmq.LAST_ENDPOINT) or bind
    say(f"publishing {source_uri} as ev44 on {'PUB' if pub else 'PUSH'} {where} (Ctrl-C stops)")
    try:
        _pump(src, send, seconds, say,
              lambda t: f"  {sent['events']} events in {sent['messages']} messages ({sent['events'] / t:.3g} ev/s)")  # fmt: skip
    finally:
        src.stop()
        sock.close(linger=2000)
        ctx.term()  # frames still queued are sent (or dropped after the linger) before we return
    say(f"sent {sent['events']} events in {sent['messages']} messages")
    _say_uncarried(uncarried, say)
    if src.error:  # what was sent is said above; the command still failed
        raise LivehistError(f"source failed: {src.error}")
    return sent["events"]


def _say_uncarried(uncarried: list[int], say) -> None:
    if uncarried:
        say(f"{sum(uncarried)} events had a TOF ev44 cannot carry (NaN, +-inf or beyond +-2.147 s in int32 ns); "
            f"they were sent with TOF {TOF_UNCARRIED} ns, outside every TOF range (images count them, as "
            "they do when the device replays the file itself)")  # fmt: skip


def _replayable(source_uri: str) -> Source:
    """The sim:// or nexus:// source to publish; a network source (which hands over raw messages
    for a device to decode, not event batches) is refused, naming what to do instead."""
    src = open_source(source_uri)
    scheme = source_uri.split("://", 1)[0]
    if scheme not in ("sim", "nexus"):
        raise LivehistError(
            f"SOURCE {source_uri!r}: livehist stream publishes sim:// or nexus:// sources; {scheme}:// is "
            "already a stream: point the EventHistogrammer's EventSource at it directly"
        )
    return src


def _pump(src: Source, send, seconds: float | None, say, progress) -> None:
    """Run `src` into `send` until it ends, fails, `seconds` pass or Ctrl-C; progress every 2 s."""
    src.start(_Collector(send))
    t0 = last = time.monotonic()
    try:
        while not src.finished and src.error is None:
            time.sleep(0.1)
            now = time.monotonic()
            if seconds and now - t0 >= seconds:
                break
            if now - last >= 2:
                say(progress(now - t0))
                last = now
    except KeyboardInterrupt:
        pass


def check_bind(bind: str) -> None:
    """A TCP port past 65535: ZeroMQ binds it modulo 65536 (99999 binds 34463), so nobody
    connecting to the port written would ever hear from us."""
    if bind.startswith("tcp://"):
        port = bind.rsplit(":", 1)[-1]
        if port.isascii() and port.isdigit() and int(port) > 65535:
            raise LivehistError(f"--bind {bind!r}: port {port} is past 65535; give a port 1-65535 "
                                "(or * for any free one), e.g. tcp://127.0.0.1:5555")  # fmt: skip


def bind_error(bind: str, exc: Exception) -> str:
    """One line for a ZeroMQ endpoint that cannot be bound, naming the fix."""
    if "://" not in bind:
        return f"--bind {bind!r} has no scheme; write it like tcp://127.0.0.1:5555"
    if getattr(exc, "errno", None) == zmq.EADDRINUSE:
        return f"cannot bind {bind}: the address is already in use (another stream or device?); choose another port"
    return f"cannot bind {bind}: {exc}; give an endpoint like tcp://127.0.0.1:5555"


def _kafka_topic(brokers: str, topic: str, partitions: int | None, say) -> int:
    """The topic's partition count, creating it (with `partitions`, default 1) if needed."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": brokers, "logger": log})
    try:
        meta = admin.list_topics(timeout=5).topics
    except KafkaException as exc:
        raise LivehistError(f"no Kafka broker answers at {brokers}: {exc.args[0].str()}") from None
    if topic in meta and meta[topic].error is None and meta[topic].partitions:
        n = len(meta[topic].partitions)
        if partitions is not None and partitions != n:
            say(f"topic {topic} exists with {n} partitions (not {partitions}); publishing to its {n}")
        return n
    n = partitions or 1
    try:
        for future in admin.create_topics([NewTopic(topic, n, 1)]).values():
            future.result(30)
    except KafkaException as exc:
        raise LivehistError(f"cannot create topic {topic!r} on {brokers}: {exc.args[0].str()}") from None
    say(f"created topic {topic} with {n} partition{'s' if n > 1 else ''}")
    return n


def _stream_kafka(source_uri: str, target: str, partitions: int | None, seconds: float, say) -> int:
    try:
        from confluent_kafka import Producer
    except ImportError:
        raise LivehistError("--kafka needs confluent-kafka: pip install 'livehist[kafka]'") from None
    brokers, _, topic = target.rpartition("/")
    if not brokers or not topic or "," in topic:
        raise LivehistError(f"--kafka {target!r}: give BROKER[,BROKER]/TOPIC")
    from livehist.engine.sources.kafka import TOPIC_NAME

    if not TOPIC_NAME.match(topic):
        raise LivehistError(
            f"--kafka {target!r}: {topic!r} is not a Kafka topic name (letters, digits, '.', '_', '-'; at most 249)"
        )
    if partitions is not None and partitions < 1:
        raise LivehistError(f"--partitions must be >= 1, got {partitions}")
    src: Source = _replayable(source_uri)  # a bad source fails before anything is created
    n = _kafka_topic(brokers, topic, partitions, say)
    errors = RateLimitedLog(log)
    sent = {"events": 0, "messages": 0, "delivered": 0, "failed": 0}
    uncarried: list[int] = []

    def delivered(err, msg) -> None:
        if err is None:
            sent["delivered"] += 1
        else:
            sent["failed"] += 1
            errors.warning("delivery", f"not delivered to {topic}: {err.str()}")

    producer = Producer({"bootstrap.servers": brokers, "message.max.bytes": 256 * 2**20,
                         "queue.buffering.max.kbytes": 256 * 1024, "linger.ms": 5, "logger": log})  # fmt: skip
    stopping = []

    def send(batch) -> None:
        payload = encode_ev44(batch, sent["messages"], uncarried=uncarried)
        stamp = int(batch.pulse_time[0] // 1_000_000) if batch.pulse_time.size else None
        while not stopping:
            try:
                producer.produce(topic, payload, partition=sent["messages"] % n, timestamp=stamp or 0,
                                 on_delivery=delivered)  # fmt: skip
                break
            except BufferError:  # librdkafka's queue is full: wait for the broker (back-pressure)
                producer.poll(0.1)
        producer.poll(0)
        sent["messages"] += 1
        sent["events"] += len(batch)

    say(f"publishing {source_uri} as ev44 to Kafka {brokers}, topic {topic} ({n} partitions; Ctrl-C stops)")
    try:
        _pump(src, send, seconds, say,
              lambda t: f"  {sent['events']} events in {sent['messages']} messages, {sent['delivered']} delivered")  # fmt: skip
    finally:
        stopping.append(True)
        src.stop()
        left = producer.flush(30)
    say(f"sent {sent['events']} events in {sent['messages']} messages; {sent['delivered']} delivered, "
        f"{sent['failed'] + left} not")  # fmt: skip
    _say_uncarried(uncarried, say)
    if src.error:  # what was sent is said above; the command still failed
        raise LivehistError(f"source failed: {src.error}")
    if sent["failed"] + left:
        raise LivehistError(f"{sent['failed'] + left} messages were not delivered to {topic} on {brokers}")
    return sent["events"]
