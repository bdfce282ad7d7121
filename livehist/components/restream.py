"""Re-stream histograms as ESS hs01 (or da00) flatbuffers, for clients that do not speak Tango.

Each publish of an EventHistogrammer becomes one hs01 message per histogram on a ZeroMQ
PUB socket (`tcp://*:PORT`) and, where configured, a Kafka topic (`BROKER/TOPIC`):
`source` is DEVICE/NAME, `dim_metadata` carries the bin boundaries with unit and label
(TOF edges; pixel rows and columns as 0..n), `data` the counts, and `info` a JSON
object with state, counters and the update number. Counts go as int32 (hs01's ArrayInt)
when every count of the message is below 2**31, else as int64 (ArrayLong): half the bytes
for all but the fullest histograms (a 10^6-pixel image re-streamed 10 times a second is
80 MB/s as int64); streaming_data_types' deserialise_hs01 gives either as numpy. A
histogram larger than `max_message_bytes` is sent in row blocks (each narrowed on its own):
`current_shape` is the block, hs01's `offset` field (and `info.offset`, `info.full_shape`,
for readers that ignore it) its place.

The publisher only hands snapshots to a bounded queue; a sender thread serialises and
sends. A full queue (serialising or a Kafka broker slower than the publish rate) drops
whole updates and counts them (`dropped`). A slow or stalled ZeroMQ subscriber never
slows the sender: ZeroMQ drops for that subscriber alone once its high-water mark is
reached, and the others go on; each message's `info.update` numbers updates, so a
subscriber sees any it missed (`livehist listen` reports the gaps). Ingestion is never touched.

To Kafka, a message counts as sent when the broker acknowledges it (librdkafka's delivery
report) and as dropped when it is not acknowledged within `kafka_timeout_s`; the device shows
`problem` in its Status. `fmt="da00"` sends ESS's da00 DataArrays instead of hs01 (whole
histograms: da00 has no block offset).
"""

from __future__ import annotations

import collections
import json
import logging
import struct
import threading
import time

import numpy as np

from livehist.engine import Snapshot

log = logging.getLogger("livehist.components.restream")


def hs01_size(histogram: dict) -> int:
    """Bytes enough for `serialise_hs01` of this histogram (its data, bin boundaries and a margin)."""
    nbytes = int(np.asarray(histogram["data"]).nbytes)
    nbytes += sum(np.asarray(d["bin_boundaries"]).nbytes for d in histogram["dim_metadata"])
    return nbytes + 4096 + 4 * len(histogram.get("info", "")) + 4 * len(histogram.get("source", ""))


def serialise_hs01(
    histogram: dict, offset: list[int] | None = None, into: bytearray | None = None, narrow: bool = False
) -> memoryview:
    """hs01 as ess-streaming-data-types writes it, with the buffer sized up front (its own
    starts at 1 KiB and doubles, copying an 8 MB image a dozen times) and the schema's
    `offset` field for row blocks.

    `into`: a buffer of at least `hs01_size` bytes to build in (the message is its tail),
    instead of a new one: an 8 MB image's new buffer is zeroed first, a third of the build.
    The builder writes every byte of the message, so what the buffer held before does not
    matter. `narrow`: int64 counts that all fit in int32 go as hs01's ArrayInt, half the
    bytes (readers such as streaming_data_types' deserialise_hs01 give either as numpy)."""
    import flatbuffers
    from streaming_data_types import histogram_hs01 as hs
    from streaming_data_types.fbschemas.histogram_hs01 import Array, ArrayInt, ArrayLong
    from streaming_data_types.fbschemas.histogram_hs01 import EventHistogram as EH

    if into is None:
        builder = flatbuffers.Builder(hs01_size(histogram))
    else:
        if len(into) < hs01_size(histogram):
            raise ValueError(f"a buffer of {len(into)} bytes is too small for this hs01 message")
        builder = flatbuffers.Builder(0)
        builder.Bytes = into
        builder.Clear()
    builder.ForceDefaults(True)
    # the counts first, into the empty builder: a narrowing that finds a count beyond int32
    # starts again from empty (Clear) with int64
    counts = np.asarray(histogram["data"])
    if counts.dtype == np.int64 and counts.flags.c_contiguous:  # the usual case: no flattening copy
        values = _numpy_vector(builder, counts.reshape(-1), as_int32=True) if narrow else None
        if values is not None:
            ArrayInt.ArrayIntStart(builder)
            ArrayInt.ArrayIntAddValue(builder, values)
            data, data_type = ArrayInt.ArrayIntEnd(builder), Array.Array.ArrayInt
        else:
            builder.Clear()  # a count beyond int32 (or no narrowing): int64, from an empty builder
            builder.ForceDefaults(True)
            values = _numpy_vector(builder, counts.reshape(-1))
            ArrayLong.ArrayLongStart(builder)
            ArrayLong.ArrayLongAddValue(builder, values)
            data, data_type = ArrayLong.ArrayLongEnd(builder), Array.Array.ArrayLong
    else:
        data, data_type = hs._serialise_array(builder, counts)
    source = builder.CreateString(histogram["source"])
    info = builder.CreateString(histogram["info"])
    shape = builder.CreateNumpyVector(np.asarray(histogram["current_shape"], np.int32))
    offset_vector = builder.CreateNumpyVector(np.asarray(offset, np.int32)) if offset is not None else None
    dims = [hs._serialise_metadata(builder, d["length"], d["bin_boundaries"], d.get("unit", ""), d.get("label", ""))
            for d in histogram["dim_metadata"]]  # fmt: skip
    EH.EventHistogramStartDimMetadataVector(builder, len(dims))
    for d in reversed(dims):
        builder.PrependUOffsetTRelative(d)
    dims_vector = builder.EndVector()
    EH.EventHistogramStart(builder)
    EH.EventHistogramAddInfo(builder, info)
    EH.EventHistogramAddData(builder, data)
    EH.EventHistogramAddCurrentShape(builder, shape)
    if offset_vector is not None:
        EH.EventHistogramAddOffset(builder, offset_vector)
    EH.EventHistogramAddDimMetadata(builder, dims_vector)
    EH.EventHistogramAddTimestamp(builder, histogram["timestamp"])
    EH.EventHistogramAddSource(builder, source)
    EH.EventHistogramAddDataType(builder, data_type)
    builder.Finish(EH.EventHistogramEnd(builder), file_identifier=hs.FILE_IDENTIFIER)
    return memoryview(builder.Bytes)[builder.Head() :]  # no final copy (ZeroMQ sends it in place)


def _numpy_vector(builder, values: np.ndarray, as_int32: bool = False) -> int | None:
    """flatbuffers' CreateNumpyVector without its two copies under the GIL (`tobytes`, then a
    bytearray slice): the values go straight into the builder, without the GIL, so
    re-streaming an 8 MB image does not stall the engine's receive and decode. `as_int32`:
    int64 values written as int32, or None (the builder half-written) if any does not fit."""
    dtype = np.dtype(np.int32) if as_int32 else values.dtype
    builder.StartVector(dtype.itemsize, values.size, dtype.itemsize)
    head = builder.Head() - dtype.itemsize * values.size
    into = np.frombuffer(builder.Bytes, dtype, values.size, head)
    if as_int32:
        from livehist.engine.kernels import narrow_i32

        if not narrow_i32(values, into):
            return None
    else:
        into[:] = values
    builder.head = head
    builder.vectorNumElems = values.size
    return builder.EndVector()


class _Buffers:
    """Buffers of large hs01 messages, built in again once ZeroMQ has sent them (its tracker is
    done): an 8 MB image re-streamed 10 times a second otherwise takes a new buffer, zeroed,
    each time. At most `keep` buffers and `max_bytes` in all are held (the oldest go first); a
    buffer still being sent is never handed out."""

    LARGE = 2**20  # smaller messages take a new buffer: zeroing them costs nothing to speak of

    def __init__(self, keep: int = 4, max_bytes: int = 128 * 2**20) -> None:
        self.keep, self.max_bytes = keep, max_bytes
        self.reused = 0
        self._held: list = []  # [buffer, tracker (None: free)], oldest first

    def take(self, nbytes: int) -> bytearray | None:
        if nbytes < self.LARGE:
            return None
        for i, (buf, tracker) in enumerate(self._held):
            if nbytes <= len(buf) <= 2 * nbytes and (tracker is None or tracker.done):
                del self._held[i]
                self.reused += 1
                return buf
        return bytearray(nbytes)

    def sent(self, message: memoryview, tracker) -> None:
        """`message` was handed to ZeroMQ (`tracker`) or copied (None): its buffer may come back."""
        buf = message.obj
        if isinstance(buf, bytearray) and self.LARGE <= len(buf) <= self.max_bytes:
            self._held.append((buf, tracker))
            while len(self._held) > self.keep or sum(len(b) for b, _ in self._held) > self.max_bytes:
                del self._held[0]


def hs01_messages(snap: Snapshot, device: str, state: str, counter: int,
                  max_message_bytes: int = 64 * 2**20, take=None) -> list[memoryview]:  # fmt: skip
    """One hs01 message per histogram (or row block); `take(nbytes)` may offer a buffer to build
    each in (see `_Buffers`)."""
    counters = {"events": snap.events, "messages": snap.messages, "bad_messages": snap.bad_messages,
                "dropped_messages": snap.dropped_messages, "pulses": snap.pulses,
                "elapsed_s": snap.elapsed, "event_rate": snap.event_rate}  # fmt: skip
    out = []
    stamp = int(snap.taken_at * 1e9)
    for name, counts in snap.counts.items():
        spec = snap.specs[name]
        edges = snap.edges.get(name)
        unit = spec.tof.unit if spec.tof else ""
        tof_dim = {"length": int(edges.size - 1), "unit": unit, "label": "time_of_flight",
                   "bin_boundaries": np.asarray(edges, np.float64)} if edges is not None else None  # fmt: skip
        if spec.kind == "image":
            ny, nx = counts.shape
            dims = [{"length": ny, "unit": "", "label": "row", "bin_boundaries": np.arange(ny + 1, dtype=np.float64)},
                    {"length": nx, "unit": "", "label": "col", "bin_boundaries": np.arange(nx + 1, dtype=np.float64)}]  # fmt: skip
        elif spec.kind == "pixel_tof":
            n = counts.shape[0]
            dims = [{"length": n, "unit": "", "label": "pixel",
                     "bin_boundaries": spec.first_pixel + np.arange(n + 1, dtype=np.float64)}, tof_dim]  # fmt: skip
        else:
            dims = [tof_dim]
        rows = counts.shape[0]
        per_row = max(counts.nbytes // max(rows, 1), 1)
        block = (
            rows
            if counts.nbytes <= max_message_bytes or counts.ndim == 1
            else max(1, max_message_bytes // per_row)
        )
        for r0 in range(0, rows, block):
            part = counts[r0 : r0 + block]
            info = {"name": name, "kind": spec.kind, "state": state, "update": counter, "counters": counters,
                    "out_of_range": snap.out_of_range.get(name, 0)}  # fmt: skip
            part_dims, offset = dims, None
            if block < rows:
                offset = [r0] + [0] * (counts.ndim - 1)
                info.update(offset=[r0] + [0] * (counts.ndim - 1), full_shape=list(counts.shape))
                first = dict(
                    dims[0],
                    length=part.shape[0],
                    bin_boundaries=dims[0]["bin_boundaries"][r0 : r0 + part.shape[0] + 1],
                )
                part_dims = [first, *dims[1:]]
            histogram = {
                "source": f"{device}/{name}", "timestamp": stamp, "current_shape": list(part.shape),
                "dim_metadata": part_dims, "data": np.ascontiguousarray(part, np.int64),
                "info": json.dumps(info),
            }  # fmt: skip
            into = take(hs01_size(histogram)) if take else None
            out.append(serialise_hs01(histogram, offset, into, narrow=True))
    return out


def da00_messages(snap: Snapshot, device: str, state: str, counter: int) -> list[bytes]:
    """ESS's da00 (the format its live-data services publish): one DataArray per histogram,
    `signal` (int64 counts, unit "counts") with its axes, and one bin-edge coordinate per axis
    (`time_of_flight` in the histogram's unit; `row`, `col` or `pixel` as 0..n)."""
    from streaming_data_types.dataarray_da00 import Variable, serialise_da00

    out = []
    stamp = int(snap.taken_at * 1e9)
    for name, counts in snap.counts.items():
        spec = snap.specs[name]
        edges = snap.edges.get(name)
        coords = []
        if spec.kind == "image":
            ny, nx = counts.shape
            axes = ["row", "col"]
            coords = [Variable("row", np.arange(ny + 1, dtype=np.float64), ["row"], unit=""),
                      Variable("col", np.arange(nx + 1, dtype=np.float64), ["col"], unit="")]  # fmt: skip
        elif spec.kind == "pixel_tof":
            axes = ["pixel", "time_of_flight"]
            n = counts.shape[0]
            coords = [
                Variable("pixel", spec.first_pixel + np.arange(n + 1, dtype=np.float64), ["pixel"], unit="")
            ]
        else:
            axes = ["time_of_flight"]
        if edges is not None:
            coords.append(Variable("time_of_flight", np.asarray(edges, np.float64), ["time_of_flight"],
                                   unit=spec.tof.unit if spec.tof else ""))  # fmt: skip
        signal = Variable("signal", np.ascontiguousarray(counts, np.int64), axes, unit="counts", label=name,
                          source=f"{device}/{name}")  # fmt: skip
        out.append(serialise_da00(f"{device}/{name}", stamp, [signal, *coords]))
    return out


FORMATS = ("hs01", "da00")


class Restreamer:
    """Sends each publish to ZeroMQ and/or Kafka, in the chosen format (hs01 or da00).

    Kafka deliveries are counted when the broker acknowledges them (`sent`), failures when it
    does not within `kafka_timeout_s` (`dropped`); `problem` says what is failing."""

    def __init__(self, device: str, endpoint: str = "", kafka: str = "", max_queue: int = 4,
                 max_message_bytes: int = 64 * 2**20, fmt: str = "hs01",
                 kafka_timeout_s: float = 10.0) -> None:  # fmt: skip
        self.device, self.endpoint, self.kafka = device, endpoint, kafka
        self.max_message_bytes = max_message_bytes
        fmt = (fmt or "hs01").strip().lower()
        if fmt not in FORMATS:
            raise ValueError(f"RestreamFormat must be hs01 or da00, got {fmt!r}")
        self.fmt = fmt
        self.sent = self.dropped = 0
        self.kafka_sent = self.kafka_failed = 0
        self._kafka_error: str | None = None  # the last failure, until a delivery succeeds again
        self._queue: collections.deque = collections.deque()
        self._buffers = _Buffers()
        self._max_queue = max_queue
        self._cond = threading.Condition()
        self._closed = False
        self._pub = self._producer = None
        if kafka:
            brokers, _, self.topic = kafka.rpartition("/")
            if not brokers or not self.topic:
                raise ValueError(f"RestreamKafka {kafka!r}: give BROKER[,BROKER]/TOPIC")
            try:
                from confluent_kafka import Producer
            except ImportError:
                raise ValueError(
                    "RestreamKafka needs confluent-kafka (pip install 'livehist[kafka]')"
                ) from None
            from livehist.engine.events import RateLimitedLog

            self._errors = RateLimitedLog(log)
            self._producer = Producer({
                "bootstrap.servers": brokers, "queue.buffering.max.messages": 1000,
                "message.max.bytes": max_message_bytes + 2**20,
                "message.timeout.ms": int(kafka_timeout_s * 1000),  # a failed delivery shows within this
                "linger.ms": 5, "error_cb": self._kafka_error_cb, "logger": _RateLimitedRdLog(self._errors),
            })  # fmt: skip
        if endpoint:
            import zmq

            self._pub = zmq.Context.instance().socket(zmq.PUB)
            self._pub.setsockopt(zmq.SNDHWM, 16)
            self._pub.setsockopt(zmq.LINGER, 0)
            try:
                self._pub.bind(endpoint)
            except zmq.ZMQError as exc:
                self._pub.close(0)
                raise ValueError(
                    f"RestreamEndpoint {endpoint!r} cannot be bound: {exc}; use tcp://*:PORT"
                ) from None
        if self.active and fmt == "hs01":  # compiled now, not in the sender's first publish (under the GIL)
            from livehist.engine.kernels import narrow_i32

            narrow_i32(np.zeros(1, np.int64), np.zeros(1, np.int32))
        self._thread = threading.Thread(target=self._run, name="livehist-restream", daemon=True)
        self._thread.start()

    @property
    def active(self) -> bool:
        return self._pub is not None or self._producer is not None

    @property
    def problem(self) -> str | None:
        """What re-streaming to Kafka is failing with, for the device's Status (None: all well)."""
        if self._kafka_error is None:
            return None
        return (f"re-streaming to Kafka {self.kafka} fails: {self._kafka_error} "
                f"({self.kafka_failed} {self.fmt} messages not delivered)")  # fmt: skip

    def _kafka_error_cb(self, err) -> None:
        from confluent_kafka import KafkaError

        if err.fatal() or err.code() == KafkaError._ALL_BROKERS_DOWN:  # not an idle disconnect
            self._kafka_error = err.str()
        self._errors.warning(err.name(), f"RestreamKafka {self.kafka}: {err.str()}")

    def _delivered(self, err, msg) -> None:
        """librdkafka's delivery report (called from poll/flush in this object's threads)."""
        if err is None:
            self.sent += 1
            self.kafka_sent += 1
            self._kafka_error = None
        else:
            self.dropped += 1
            self.kafka_failed += 1
            self._kafka_error = err.str()
            self._errors.warning("delivery", f"RestreamKafka {self.kafka}: not delivered: {err.str()}")

    def publish(self, snap: Snapshot, state: str, counter: int) -> None:
        """Hand one update over; never blocks (a full queue drops it and counts it)."""
        if not self.active:
            return
        with self._cond:
            if len(self._queue) >= self._max_queue:
                self.dropped += 1
                return
            self._queue.append((snap, state, counter))
            self._cond.notify()

    def _messages(self, snap: Snapshot, state: str, counter: int) -> list:
        if self.fmt == "da00":
            return da00_messages(snap, self.device, state, counter)
        return hs01_messages(snap, self.device, state, counter, self.max_message_bytes, self._buffers.take)

    def _run(self) -> None:
        import zmq

        while True:
            with self._cond:
                # wake up now and then to serve Kafka's delivery reports while idle
                self._cond.wait_for(lambda: self._queue or self._closed, timeout=0.2)
                if self._closed:
                    return
                item = self._queue.popleft() if self._queue else None
            if self._producer is not None:
                self._producer.poll(0)
            if item is None:
                continue
            try:
                messages = self._messages(*item)
            except Exception:
                log.exception("%s serialisation failed", self.fmt)
                continue
            for msg in messages:
                tracker = None
                if self._pub is not None:
                    try:  # PUB never blocks: a slow subscriber loses messages in ZeroMQ, alone
                        tracker = self._pub.send(msg, flags=zmq.NOBLOCK, copy=False, track=True)
                        self.sent += 1
                    except zmq.Again:
                        self.dropped += 1
                if self._producer is not None:
                    try:
                        self._producer.produce(self.topic, bytes(msg), on_delivery=self._delivered)
                    except BufferError:  # librdkafka's queue is full: the broker is not taking them
                        self.dropped += 1
                        self.kafka_failed += 1
                    except Exception as exc:  # e.g. a message larger than message.max.bytes
                        self.dropped += 1
                        self.kafka_failed += 1
                        self._kafka_error = str(exc)
                    self._producer.poll(0)
                if isinstance(msg, memoryview):  # hs01 (da00 messages are bytes of their own)
                    self._buffers.sent(msg, tracker)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=2)
        if self._pub is not None:
            self._pub.close(0)
        if self._producer is not None:
            self._producer.flush(1.0)


class _RateLimitedRdLog:
    """librdkafka's log lines through a RateLimitedLog (one per facility every few seconds)."""

    def __init__(self, limited) -> None:
        self.limited = limited

    def log(self, level: int, fmt: str, *args) -> None:
        if level >= logging.WARNING:
            message = fmt % args if args else fmt
            self.limited.warning(message.split(" ", 1)[0], f"librdkafka: {message}")


def read_hs01(buffer) -> dict:
    """What `listen` prints from an hs01 message, read in place from any buffer (a ZeroMQ
    frame: streaming_data_types' deserialise_hs01 takes only bytes, and copying an 8 MB image
    into bytes was half of what a listener cost at a 10 Hz publish). `data` is a view."""
    from streaming_data_types.fbschemas.histogram_hs01 import EventHistogram as EH
    from streaming_data_types.histogram_hs01 import FILE_IDENTIFIER, _create_array_object_for_type

    view = memoryview(buffer)
    if len(view) < 8 or bytes(view[4:8]) != FILE_IDENTIFIER:
        raise ValueError(f"not an hs01 message (identifier {bytes(view[4:8])!r})")
    hist = EH.EventHistogram.GetRootAsEventHistogram(view, 0)
    dims = []
    for i in range(hist.DimMetadataLength()):
        d = hist.DimMetadata(i)
        dims.append({"length": d.Length(), "unit": (d.Unit() or b"").decode("utf-8", "replace"),
                     "label": (d.Label() or b"").decode("utf-8", "replace")})  # fmt: skip
    array = _create_array_object_for_type(hist.DataType())
    table = hist.Data()
    if table is None:  # an absent table reads as None, not as an error
        raise ValueError("its flatbuffer has no data")
    array.Init(table.Bytes, table.Pos)
    return {"source": (hist.Source() or b"").decode("utf-8", "replace"), "dim_metadata": dims,
            "data": array.ValueAsNumpy(), "info": (hist.Info() or b"").decode("utf-8", "replace")}  # fmt: skip


def _listen_info(text: str | None) -> dict:
    """hs01's info is free text: livehist's is a JSON object; another sender's may be anything."""
    try:
        info = json.loads(text or "{}")
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _whole(value) -> int | None:
    """An update or event count from info, if it is a whole number."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def listen(endpoint: str, count: int = 0, seconds: float = 0.0, say=print) -> int:
    """`livehist listen`: print a line per hs01 message arriving on a PUB endpoint."""
    import zmq

    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    say(f"listening on {endpoint} for hs01 histograms (Ctrl-C stops)")
    n, t0 = 0, time.monotonic()
    last_update: dict[str, int] = {}
    try:
        while (not count or n < count) and (not seconds or time.monotonic() - t0 < seconds):
            if not sub.poll(200):
                continue
            frame = sub.recv(copy=False)
            try:
                msg = read_hs01(frame.buffer)
            except (ValueError, IndexError, TypeError, struct.error) as exc:  # another sender's
                say(
                    f"skipped a message of {len(frame.buffer):,} bytes that is not a valid hs01 histogram: {exc}"
                )
                continue
            info = _listen_info(msg.get("info"))
            dims = " x ".join(f"{d['length']} {d['label']}" + (f" ({d['unit']})" if d["unit"] else "")
                              for d in msg["dim_metadata"])  # fmt: skip
            update = _whole(info.get("update"))
            previous = last_update.get(msg["source"])
            gap = (
                f"  (missed {update - previous - 1} updates)"
                if previous and update and update > previous + 1
                else ""
            )
            offset = info.get("offset") or [0]
            if update is not None and "offset" not in info or (isinstance(offset, list) and offset[0] == 0):
                last_update[msg["source"]] = update
            counters = info.get("counters")
            events = _whole(counters.get("events")) if isinstance(counters, dict) else None
            total = np.sum(msg["data"])
            counts = f"{int(total):,}" if np.isfinite(total) else str(total)  # another sender's floats
            say(f"{msg['source']}: update {update} [{info.get('state')}] {dims}: "
                f"{counts} counts, {events or 0:,} events{gap}")  # fmt: skip
            n += 1
    except KeyboardInterrupt:
        pass
    finally:
        sub.close(0)
    return n
