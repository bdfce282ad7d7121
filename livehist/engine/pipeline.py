"""The histogram engine: a bounded ingest queue, one accumulating thread, presets, counters.

Plain Python (no Tango): the EventHistogrammer device is a thin shell over it.
Sources push raw messages (bytes, decoded here) or EventBatch objects with `feed`. Network
sources never block: when the queue is full, the whole message is dropped and counted.
"""

from __future__ import annotations

import bisect
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from livehist.engine import histograms
from livehist.engine.events import BadMessage, EventBatch, RateLimitedLog, Tagged, decode
from livehist.engine.spec import HistogramSpec

log = logging.getLogger("livehist.engine")


class BoundedQueue:
    """FIFO bounded in items and in bytes; `put` either blocks or refuses when full."""

    def __init__(self, max_items: int = 64, max_bytes: int = 256 * 2**20) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: collections.deque = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition()

    @staticmethod
    def _size(item) -> int:
        if isinstance(item, Tagged):
            item = item.payload if item.payload is not None else b""
        if isinstance(item, bytes | bytearray | memoryview):
            return len(item)
        if isinstance(item, EventBatch):
            return item.tof.nbytes + item.pixel_id.nbytes
        return 0

    def put(self, item, block: bool, timeout: float | None = None) -> bool:
        size = self._size(item)
        with self._cond:

            def full() -> bool:
                return bool(self._items) and (
                    len(self._items) >= self.max_items or self._bytes + size > self.max_bytes
                )

            if full():
                if not block or not self._cond.wait_for(lambda: not full(), timeout):
                    return False
            self._items.append((item, size))
            self._bytes += size
            self._cond.notify_all()
            return True

    def get(self, timeout: float):
        with self._cond:
            if not self._cond.wait_for(lambda: self._items, timeout):
                return None
            item, size = self._items.popleft()
            self._bytes -= size
            self._cond.notify_all()
            return item

    def clear(self) -> int:
        with self._cond:
            n = len(self._items)
            self._items.clear()
            self._bytes = 0
            self._cond.notify_all()
            return n

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class Snapshot:
    """A consistent copy of everything, taken under the engine lock."""

    counts: dict[str, np.ndarray]
    edges: dict[str, np.ndarray]
    specs: dict[str, HistogramSpec]
    out_of_range: dict[str, int]
    events: int
    messages: int
    bad_messages: int
    dropped_messages: int
    pulses: int
    elapsed: float
    event_rate: float
    running: bool
    # Kafka: {(topic, partition): (first, last)} offsets counted since Reset, taken with the counts
    offsets: dict = field(default_factory=dict)
    # Kafka: {(topic, partition): [[a, b], ...]} every offset counted since Reset, as sorted disjoint
    # ranges (a worker that lost a partition and got it back has several); `recounted`: offsets this
    # engine covered a second time (a partition handed back from an older commit)
    ranges: dict = field(default_factory=dict)
    recounted: int = 0
    taken_at: float = field(default_factory=time.time)


def add_offset(ranges: list[list[int]], offset: int) -> bool:
    """Add `offset` to sorted disjoint ranges [[a, b], ...] (b included); True if it was in already."""
    if ranges and ranges[-1][1] + 1 == offset:  # the usual case: the next offset of the last range
        ranges[-1][1] = offset
        return False
    i = bisect.bisect_right([r[0] for r in ranges], offset) - 1  # the range starting at or before it
    if i >= 0 and ranges[i][0] <= offset <= ranges[i][1]:
        return True
    if i >= 0 and ranges[i][1] + 1 == offset:
        ranges[i][1] = offset
    else:
        i += 1
        ranges.insert(i, [offset, offset])
    if i + 1 < len(ranges) and ranges[i][1] + 1 == ranges[i + 1][0]:  # joins the next one
        ranges[i][1] = ranges.pop(i + 1)[1]
    return False


def overlap(a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
    """The offsets in both sorted disjoint range lists, as ranges."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append([lo, hi])
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


class Engine:
    stop_wait = 10.0  # s Stop waits for the accumulating thread (it may be compiling a kernel)

    def __init__(
        self,
        specs: list[HistogramSpec] = (),
        max_queue_items: int = 64,
        max_queue_bytes: int = 256 * 2**20,
        on_end: Callable[[str], None] | None = None,
        threads: int = 1,
    ) -> None:
        self._lock = threading.RLock()
        self.threads = threads  # accumulating threads, each with its own partial counts
        self._hists, self._set = self._build(specs)
        self.queue = BoundedQueue(max_queue_items, max_queue_bytes)
        self.on_end = on_end
        self.source = None
        self.source_name: str | None = None  # keep only messages of this source, if set
        self.preset_time = 0.0
        self.preset_events = 0
        self.preset_pulses = 0
        self._bad_log = RateLimitedLog(log)
        self._worker: threading.Thread | None = None
        self._stop_worker = threading.Event()
        # +1 per Start: a worker that Stop stopped waiting for (a kernel compile of minutes) sees
        # it is stale, counts the message it held as dropped and ends, instead of counting it into
        # the next acquisition and running beside the next worker
        self._generation = 0
        self._accumulating = False
        self.fault: str | None = None  # why the accumulating thread gave up (None: it did not)
        self._rate_samples: collections.deque = collections.deque(maxlen=64)
        self._fed = self._processed = 0  # items queued / taken by the worker: `wait_processed`
        self.reset()

    # --- configuration -------------------------------------------------------------
    def configure(self, specs: list[HistogramSpec]) -> None:
        """Swap the histogram list atomically; counters and acquisition go on."""
        self.commit(self.prepare(specs))

    def prepare(self, specs: list[HistogramSpec]) -> tuple[dict, histograms.HistogramSet]:
        """Allocate the histograms of a new list (may raise MemoryError); nothing changes yet."""
        return self._build(specs)

    def commit(self, prepared: tuple[dict, histograms.HistogramSet]) -> None:
        """Swap in a prepared list; a histogram of the same name and binning keeps its counts
        (adding an ROI must not wipe the spectrum acquired so far: EventCount goes on too)."""
        hists, hset = prepared
        with self._lock:
            for name, h in hists.items():
                old = self._hists.get(name)
                if old is not None and old is not h and histograms.same_binning(old.spec, h.spec):
                    h.take_counts(old)
            self._hists, self._set = hists, hset

    def _build(self, specs: list[HistogramSpec]) -> tuple[dict, histograms.HistogramSet]:
        hists = {s.name: histograms.make(s, self.threads) for s in specs}
        return hists, histograms.HistogramSet(list(hists.values()), self.threads)

    @property
    def specs(self) -> list[HistogramSpec]:
        """The current list, without the engine's lock (a read of HistogramConfig, which a panel
        makes at every refresh, never waits for a batch): `commit` swaps the dict whole, and
        nothing changes a dict once in place."""
        return [h.spec for h in self._hists.values()]

    def reset(self) -> None:
        with self._lock:
            for h in self._hists.values():
                h.clear()
            self.events = self.messages = self.bad_messages = self.dropped_messages = 0
            self.pulses = self.foreign_messages = 0
            self.foreign_sources: set[str] = set()  # the first few source names skipped
            self.offsets: dict[tuple[str, int], tuple[int, int]] = {}
            self.ranges: dict[tuple[str, int], list[list[int]]] = {}
            self.recounted = 0
            self._elapsed_before = 0.0
            self._started_at = time.monotonic() if self._accumulating else None
            self._preset_base = (0, 0, 0.0)
            self._rate_samples.clear()
            self._rate_samples.append((time.monotonic(), 0))

    # --- acquisition ---------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._accumulating

    def start(self, source=None) -> None:
        """Start accumulating (from `source` if given; else only what is fed)."""
        with self._lock:
            if self._accumulating:
                return
            self.queue.clear()
            self._accumulating = True
            self.fault = None
            self._started_at = time.monotonic()
            # presets count from this Start, not from Reset
            self._preset_base = (self.events, self.pulses, self._elapsed_before)
            self._rate_samples.clear()
            self._rate_samples.append((self._started_at, self.events))
            self._stop_worker.clear()
            self._generation += 1
            generation = self._generation
        self._worker = threading.Thread(
            target=self._run, args=(generation,), name="livehist-engine", daemon=True
        )
        self._worker.start()
        self.source = source
        if source is not None:
            self.source_name = getattr(source, "source_name", None)
            source.count_lost = self.count_lost
            source.topic_renewed = self.topic_renewed
            source.start(self.feed)

    def attach(self, source) -> None:
        """Replace the source of a running acquisition (a reconnect); histograms are kept."""
        old, self.source = self.source, source
        if old is not None:
            old.stop()
            if hasattr(source, "resume_after"):  # continue where the old one stopped reading
                source.resume_after(old)
        self.source_name = getattr(source, "source_name", None)
        source.count_lost = self.count_lost
        source.topic_renewed = self.topic_renewed
        source.start(self.feed)

    def stop(self, reason: str = "stopped") -> None:
        """Stop the source, histogram what it already queued, stop accumulating."""
        source, self.source = self.source, None
        if source is not None:
            source.stop()
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            self._stop_worker.set()
            worker.join(timeout=self.stop_wait)
        self._end(reason)

    def _end(self, reason: str) -> None:
        with self._lock:
            if not self._accumulating:
                return
            self._accumulating = False
            self._elapsed_before += time.monotonic() - self._started_at
            self._started_at = None
        if self.on_end:
            self.on_end(reason)

    def feed(self, item, block: bool = False, timeout: float | None = None, retry: bool = False) -> bool:
        """Queue a raw message (bytes) or an EventBatch. False (and counted) when dropped;
        `retry`: the caller (a paced source) tries again, so a full queue is no drop."""
        if not self._accumulating:
            return False
        if self.queue.put(item, block=block, timeout=timeout):
            self._fed += 1  # one feeding thread: the source's
            return True
        if retry:
            return False
        with self._lock:
            self.dropped_messages += 1
        return False

    def topic_renewed(self, topic: str) -> None:
        """A Kafka topic was deleted and created again: its offsets begin anew, so the ranges counted
        of the old one say nothing about the new one's (they read as counted twice)."""
        with self._lock:
            for key in [k for k in self.ranges if k[0] == topic]:
                del self.ranges[key]

    def count_lost(self, n: int) -> None:
        """Count `n` messages the transport lost before they reached the queue (a source saw a gap
        in a sender's message ids: ZeroMQ's PUB drops at its high-water mark without a word)."""
        if n > 0 and self._accumulating:
            with self._lock:
                self.dropped_messages += n

    def _run(self, generation: int | None = None) -> None:
        try:
            self._loop(generation)
        except Exception as exc:  # never die silently: end the acquisition, keep the histograms, say why
            log.exception("histogramming failed")
            if generation is not None and generation != self._generation:
                return  # a stale worker's failure is not the running acquisition's
            first = (str(exc).strip().splitlines() or [""])[0]  # numba's typing errors run to pages
            self.fault = f"{type(exc).__name__}: {first[:300]}"
            self.queue.clear()
            source, self.source = self.source, None
            if source is not None:
                source.stop(wait=False)
            self._end(f"histogramming failed: {self.fault}")

    def _loop(self, generation: int | None = None) -> None:
        while True:
            if generation is not None and generation != self._generation:
                return  # Stop gave up waiting for this worker and a Start made another
            item = self.queue.get(timeout=self._wait())
            if item is not None and self._accumulating:
                self.process(item, generation)
            if item is not None:
                self._processed += 1
            elif item is None and self._stop_worker.is_set():
                return
            if self._accumulating:
                reason = self._preset_reached()
                source = self.source
                if (
                    not reason
                    and source is not None
                    and getattr(source, "ended", None)
                    and not len(self.queue)
                ):
                    reason = source.ended  # e.g. Kafka's stop=TIME: everything before it is counted
                if reason:
                    self.queue.clear()
                    source, self.source = self.source, None
                    if source is not None:
                        source.stop(wait=False)
                    self._end(reason)
                    return
            elif self._stop_worker.is_set():
                return

    def _wait(self) -> float:
        """How long the worker may wait for data: wake up when a time preset falls due."""
        if self.preset_time and self._accumulating:
            left = self.preset_time - (self.elapsed - self._preset_base[2])
            return min(max(left, 0.0005), 0.05)
        return 0.05

    def _preset_reached(self) -> str | None:
        events0, pulses0, elapsed0 = self._preset_base
        if self.preset_events and self.events - events0 >= self.preset_events:
            return "preset events reached"
        if self.preset_pulses and self.pulses - pulses0 >= self.preset_pulses:
            return "preset pulses reached"
        if self.preset_time and self.elapsed - elapsed0 >= self.preset_time:
            return "preset time reached"
        return None

    def process(self, item, generation: int | None = None) -> int:
        """Decode (if bytes) and histogram one message now; return the events taken."""
        origin = None
        if isinstance(item, Tagged):  # read from Kafka but no batch: its offset is covered all the same
            origin, item = item.origin, item.payload
            if item is None:
                with self._lock:
                    self._covered(origin)
                return 0
        if isinstance(item, EventBatch):
            batch = item
        else:
            try:
                batch = decode(item)
            except BadMessage as exc:
                with self._lock:
                    self.messages += 1
                    self.bad_messages += 1
                    self._covered(origin)
                self._bad_log.warning("bad", f"bad message skipped: {exc}")
                return 0
            batch.origin = origin
        if self.source_name and batch.source_name and batch.source_name != self.source_name:
            with self._lock:
                self.foreign_messages += 1
                if len(self.foreign_sources) < 5:  # what to say when `source=` matches nothing
                    self.foreign_sources.add(batch.source_name)
                self._covered(batch.origin)
            return 0
        while True:
            hset = self._set
            hset.prepare(batch)  # a first batch of new dtypes or histograms compiles here, not under the lock
            with self._lock:
                if generation is not None and generation != self._generation:
                    self.dropped_messages += 1  # held by a worker Stop gave up on: not lost silently
                    return 0
                if self._set is not hset:  # a Configure meanwhile: compile its kernel outside the lock too
                    continue  # (compiling under the lock froze Stop, and the device, for minutes)
                batch = self._within_presets(batch)
                hset.add(batch)  # one pass over the batch for every histogram
                self.messages += 1
                self.events += len(batch)
                self.pulses += batch.pulse_time.size
                self._covered(batch.origin)
                now = time.monotonic()
                if now - self._rate_samples[-1][0] >= 0.05:  # samples span seconds at any message rate
                    self._rate_samples.append((now, self.events))
            return len(batch)

    def _covered(self, origin: tuple[str, int, int] | None) -> None:
        """The Kafka offset `origin` has been dealt with (counted, or counted as bad, foreign or
        outside the window); under the lock, with the counts."""
        if origin is not None:
            topic, partition, offset = origin
            first = self.offsets.get((topic, partition), (offset, offset))[0]
            self.offsets[(topic, partition)] = (first, offset)
            if add_offset(self.ranges.setdefault((topic, partition), []), offset):
                self.recounted += 1

    def _within_presets(self, batch: EventBatch) -> EventBatch:
        """Cut a batch so that event and pulse presets end exactly where asked."""
        events0, pulses0, _ = self._preset_base
        if self.preset_events and self.events - events0 + len(batch) > self.preset_events:
            batch = batch.head(max(self.preset_events - (self.events - events0), 0))
        if self.preset_pulses and self.pulses - pulses0 + batch.pulse_time.size > self.preset_pulses:
            keep = max(self.preset_pulses - (self.pulses - pulses0), 0)
            n = int(batch.pulse_index[keep]) if keep < batch.pulse_index.size else len(batch)
            batch = batch.head(n)
            batch.pulse_time, batch.pulse_index = batch.pulse_time[:keep], batch.pulse_index[:keep]
        return batch

    def wait_processed(self, timeout: float = 10.0) -> bool:
        """Wait until every item fed so far has been histogrammed (or acquisition ended):
        a checkpoint taken then covers everything the source handed over."""
        target = self._fed
        deadline = time.monotonic() + timeout
        while self._processed < target and self._accumulating and len(self.queue):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        while self._processed < target and self._accumulating:  # the last item, being histogrammed
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def restore(self, counts: dict[str, np.ndarray], counters: dict[str, float],
                offsets: dict[tuple[str, int], tuple[int, int]], ranges: dict | None = None) -> list[str]:  # fmt: skip
        """Load counts, counters and offsets (a checkpoint) into the current histograms; returns
        the names restored (the others are emptied; windowed histograms are left as they are)."""
        restored = []
        with self._lock:
            for name, h in self._hists.items():
                c = counts.get(name)
                if h.spec.window:
                    continue
                h.clear()
                if c is not None and c.size == h._cells:
                    h.parts[0][-1][: h._cells] = np.asarray(c, np.int64).ravel()  # the int64 counts of part 0
                    restored.append(name)
            self.events = int(counters.get("events", 0))
            self.messages = int(counters.get("messages", 0))
            self.bad_messages = int(counters.get("bad_messages", 0))
            self.dropped_messages = int(counters.get("dropped_messages", 0))
            self.pulses = int(counters.get("pulses", 0))
            self._elapsed_before = float(counters.get("elapsed", 0.0))
            self.offsets = {(str(t), int(p)): (int(a), int(b)) for (t, p), (a, b) in offsets.items()}
            # a checkpoint without ranges (older livehist): what (first, last) spans
            self.ranges = {
                k: [list(r) for r in (ranges or {}).get(k, [[a, b]])] for k, (a, b) in self.offsets.items()
            }
            self.recounted = int(counters.get("recounted", 0))
        return restored

    # --- reading -------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        started = self._started_at
        return self._elapsed_before + (time.monotonic() - started if started is not None else 0.0)

    def event_rate(self, over: float = 2.0) -> float:
        """Events per second over about the last `over` seconds of this acquisition (0 when idle)."""
        if not self._accumulating:
            return 0.0
        now = time.monotonic()
        samples = list(self._rate_samples)
        older = [s for s in samples if now - s[0] >= over]
        t0, e0 = older[-1] if older else samples[0]  # samples[0]: the Start (or Reset) itself
        return (self.events - e0) / max(now - t0, 0.25)  # no wild figure from the first message

    def snapshot(self) -> Snapshot:
        with self._lock:
            hists = list(self._hists.values())
            return Snapshot(
                counts={h.name: h.data() for h in hists},
                edges={h.name: h.edges for h in hists if h.edges is not None},
                specs={h.name: h.spec for h in hists},
                out_of_range={h.name: h.out_of_range for h in hists},
                events=self.events,
                messages=self.messages,
                bad_messages=self.bad_messages,
                dropped_messages=self.dropped_messages,
                pulses=self.pulses,
                elapsed=self.elapsed,
                event_rate=self.event_rate(),
                running=self._accumulating,
                offsets=dict(self.offsets),
                ranges={k: [list(r) for r in v] for k, v in self.ranges.items()},
                recounted=self.recounted,
            )
