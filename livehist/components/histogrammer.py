"""The histogrammer component: engine + source + publisher + state machine, without Tango.

The EventHistogrammer device is a thin shell over this class (SKA's component-manager
split): it maps `state`/`status` onto Tango, and `on_update` onto change events.

States: ON (idle), RUNNING, ALARM (running, messages dropped in the last `alarm_hold` s),
FAULT (the source failed or the EventSource is unusable; `status` says why). A failed
source is reopened with exponential back-off while the histograms are kept.

Clients read `last`, the snapshot of the latest publish: every read between two publishes
sees the same data as the change event that carried it. Stop, Reset, Configure and the
end of a preset refresh `last` before they return, so data read after them is final.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from livehist.components.checkpoint import Checkpoint, group_offsets, next_offsets, path_for
from livehist.engine import Engine, Snapshot
from livehist.engine.histograms import check_memory
from livehist.engine.sources import SourceError, open_source
from livehist.engine.sources.kafka_group import GroupWorkerSource
from livehist.engine.spec import DEFAULT_MAX_BYTES, HistogramSpec, SpecError, parse_histograms
from livehist.errors import LivehistError

log = logging.getLogger("livehist.components.histogrammer")

ON, RUNNING, ALARM, FAULT = "ON", "RUNNING", "ALARM", "FAULT"
MIN_PUBLISH_PERIOD = 0.02  # s; shorter costs CPU for no display gain (1e-6 took 32% of a core idle)
MIN_QUEUE_BYTES = 2**20
FROZEN_AFTER = 2.0  # s between two ticks of a group worker's clock: the process was frozen (see `_watch`)
UNASSIGNED_AFTER = 10.0  # s a RUNNING group worker has had no partition before its Status says so
CHECKPOINT_HOLD = 10.0  # s then without checkpoints, for the group to say whether our partitions are gone
SILENT_AFTER = 5.0  # s without a message before Status says so (a network peer that sends nothing)


@dataclass
class Update:
    """What one publish hands to the shell: data, counters, state; `configured` if specs changed."""

    snapshot: Snapshot
    counter: int
    state: str
    status: str
    configured: bool


class Histogrammer:
    def __init__(
        self,
        source_uri: str,
        histograms: str | list,
        publish_period: float = 0.5,
        max_histogram_bytes: int = DEFAULT_MAX_BYTES,
        on_update: Callable[[Update], None] | None = None,
        thread_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        max_queue_items: int = 64,
        max_queue_bytes: int = 256 * 2**20,
        reconnect_delays: tuple[float, float] = (0.5, 10.0),
        alarm_hold: float = 2.0,
        threads: int = 1,
        name: str = "",
        checkpoint_dir: str | None = None,
    ) -> None:
        from livehist.engine.histograms import MAX_THREADS

        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
            raise LivehistError(
                f"AccumulatingThreads must be an integer in 1..{MAX_THREADS} (1 = the default), got {threads!r}"
            )
        if not MIN_PUBLISH_PERIOD <= publish_period <= 3600:
            raise LivehistError(
                f"PublishPeriod must be {MIN_PUBLISH_PERIOD} to 3600 s, got {publish_period!r}"
            )
        if not MIN_QUEUE_BYTES <= max_queue_bytes < 2**63:
            raise LivehistError(
                f"MaxQueueBytes must be >= {MIN_QUEUE_BYTES} (1 MiB) and < 2**63, got {max_queue_bytes!r}"
            )
        if not 0 < max_histogram_bytes < 2**63:
            raise LivehistError(f"MaxHistogramBytes must be > 0 and < 2**63, got {max_histogram_bytes!r}")
        self.publish_period = float(publish_period)
        self.max_histogram_bytes = int(max_histogram_bytes)
        self.on_update = on_update
        self.reconnect_delays = reconnect_delays
        self.alarm_hold = alarm_hold
        self._thread_context = thread_context
        self._lock = threading.RLock()
        self.problem: str | None = None  # a configuration problem: FAULT until fixed and re-inited
        specs: list[HistogramSpec] = []
        try:
            specs = parse_histograms(histograms, "Histograms", self.max_histogram_bytes)
            check_memory(specs, threads, self.max_histogram_bytes, "Histograms")
        except ValueError as exc:
            self.problem = f"{exc}; fix the Histograms property and run Init, or call Configure"
        self.source_uri = source_uri
        self.name = name or "histogrammer"
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint: Checkpoint | None = None  # a consumer-group worker's durable counts + offsets
        self._source = None  # kept between acquisitions: opening one can be slow (sim model, file index)
        try:
            self._source = self._open(source_uri)  # check the URI (and a replay's file) now
        except SourceError as exc:
            self.problem = f"{exc}; fix the EventSource property and run Init"
        self.engine = Engine(specs, max_queue_items, max_queue_bytes, on_end=self._ended, threads=threads)
        threading.Thread(target=self._warm_up, args=(specs,), name="livehist-warm-up", daemon=True).start()
        self.update_counter = 0
        self.last = self.engine.snapshot()
        self._state = FAULT if self.problem else ON
        self._status = self.problem or "idle; Start to acquire"
        self._end_reason: str | None = None
        self._source_error: str | None = None
        self._reconnecting: str | None = None  # the error a reconnect is under way for
        self._next_reconnect = 0.0
        self._reconnects = 0
        self._last_drop_count = 0
        self._last_drop_time = -1e9
        self._configured = True
        self._fresh = True  # nothing counted since Init or Reset (see `start`)
        self.resets = 0  # Resets since Init: a HistogramSum tells its own from one behind its back
        self._hold_checkpoints_until = 0.0  # after a freeze (see `_watch`)
        self._tick = time.monotonic()
        self._set_back_at = 0.0  # when counts were last set back to the checkpoint (`_set_back`)
        self._kick = threading.Event()
        self._closed = threading.Event()
        resume = self._restore() if self.checkpoint is not None and not self.problem else False
        if self.checkpoint is not None:
            threading.Thread(target=self._watch, name="livehist-watch", daemon=True).start()
        self._publisher = threading.Thread(target=self._publish_loop, name="livehist-publisher", daemon=True)
        self._publisher.start()
        if resume:  # killed while acquiring: go on from the checkpoint, as the group expects
            log.warning("resuming the acquisition from checkpoint %s", self.checkpoint.path)
            self.start()

    # --- commands --------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.engine.running

    @property
    def state(self) -> str:
        return self._state

    @property
    def status(self) -> str:
        return self._status

    def start(self) -> None:
        with self._lock:
            if self.problem:
                raise LivehistError(self.problem)
            if self.engine.running:
                raise LivehistError("already RUNNING; Stop first")
            old = self._source
            source = old if old is not None and old.error is None else None
            source = source or self._open(self.source_uri)
            self._source = source
            if (
                self.checkpoint is not None
            ):  # each partition from where our counts end (or the group's commit)
                source.start_from(next_offsets(self.engine.offsets))
            elif (
                not self._fresh
                and old is not None
                and hasattr(source, "resume_after")
                and not getattr(source, "group", None)
            ):
                # Start after Stop, without Reset: the counts go on, so reading goes on where it
                # stopped (a private Kafka reader would read `start=earliest` or a time again:
                # every event twice). After Reset, reading begins at `start` again. A group member's
                # partitions may have moved on meanwhile: it starts where the group says
                source.resume_after(old)
            elif hasattr(source, "start_from") and not getattr(source, "group", None):
                source.start_from({})  # a kept source forgets where the last count stopped reading
            self._fresh = False
            source.finished = False
            self._end_reason = None
            self._source_error = self._reconnecting = None
            self._reconnects = 0
            self._last_drop_count = self.engine.dropped_messages
            self.engine.start(source)
            self._set_state()
        self._kick.set()

    def stop(self) -> None:
        """Stop acquiring; what was queued is histogrammed first. Harmless when idle."""
        self.engine.stop("stopped")  # calls _ended, which refreshes `last`
        with self._lock:
            self._set_state()
        self._kick.set()

    def reset(self) -> None:
        with self._lock:
            self.engine.reset()
            self.resets += 1
            self._fresh = True  # the next Start reads from the EventSource's `start` again
            self._last_drop_count = 0
            self._last_drop_time = -1e9
            self._refresh()
            self._set_state()
        self._kick.set()

    def check(self, histograms: str | list) -> tuple[list[HistogramSpec], dict]:
        """Parse and allocate a new list without changing anything; SpecError names what is wrong."""
        specs = parse_histograms(histograms, "Configure", self.max_histogram_bytes)
        check_memory(specs, self.engine.threads, self.max_histogram_bytes, "Configure")
        try:
            return specs, self.engine.prepare(specs)
        except MemoryError:
            need = sum(s.nbytes for s in specs)
            raise SpecError(
                f"Configure: this machine cannot allocate {need / 2**20:.0f} MiB of counts now; "
                "use fewer bins/pixels"
            ) from None

    def configure(self, histograms: str | list, checked: tuple | None = None) -> list[HistogramSpec]:
        """Swap the histogram list atomically; on a bad spec raise and keep the old one."""
        specs, prepared = checked or self.check(histograms)
        with self._lock:
            self.engine.commit(prepared)
            self.engine.fault = None
            if self.problem and "Histograms" in self.problem:
                self.problem = None
            self._configured = True
            self._refresh()
            self._set_state()
        self._kick.set()
        return specs

    def set_presets(self, time_s: float | None = None, events: int | None = None,
                    pulses: int | None = None) -> None:  # fmt: skip
        for name, value in (("PresetTime", time_s), ("PresetEvents", events), ("PresetPulses", pulses)):
            if value is not None and not value >= 0:
                raise LivehistError(f"{name} must be >= 0 (0 = no preset), got {value}")
        if self.engine.running:
            raise LivehistError("presets cannot change while RUNNING; Stop first, then set them and Start")
        if time_s is not None:
            self.engine.preset_time = float(time_s)
        if events is not None:
            self.engine.preset_events = int(events)
        if pulses is not None:
            self.engine.preset_pulses = int(pulses)

    def provenance(self) -> dict:
        """What the last published counts cover: Kafka offsets per partition, checkpoint, notes."""
        snap = self.last
        source = self._source
        return {
            "offsets": {f"{t}/{p}": [a, b] for (t, p), (a, b) in sorted(snap.offsets.items())},
            "ranges": {f"{t}/{p}": r for (t, p), r in sorted(snap.ranges.items())},
            "recounted": snap.recounted,
            "resets": self.resets,
            "group": getattr(source, "group", None),
            "brokers": getattr(source, "brokers", None),
            "assigned": sorted(f"{t}/{p}" for t, p in getattr(source, "assigned", ())),
            "checkpoint": str(self.checkpoint.path) if self.checkpoint else None,
            "checkpoint_error": self.checkpoint.last_error if self.checkpoint else None,
            "notes": list(getattr(source, "notes", ()))[-10:],
        }

    def config_json(self) -> str:
        """The current histogram list, as JSON a Configure accepts."""
        return json.dumps([s.source for s in self.engine.specs])

    def close(self) -> None:
        self._closed.set()
        self._kick.set()
        self.engine.stop("device shut down")

    # --- internals -------------------------------------------------------------------
    @staticmethod
    def _warm_up(specs: list[HistogramSpec]) -> None:
        """Compile the device's fused kernel for int32 events now, not during the first acquisition's preset."""
        from livehist.engine import histograms

        histograms.warm_up(specs)
        if any(len(spec.data_shape) == 2 for spec in specs):  # and the display block sums
            import numpy as np

            from livehist.engine.preview import block_sum

            block_sum(np.zeros((513, 2), np.int64))  # 2x2 blocks: the compiled kernel, as counts take

    def _refresh(self) -> None:
        ck = self.checkpoint
        if ck is None or self._held():
            self.last = self.engine.snapshot()  # held after a freeze: see `_watch`
            return
        with ck.lock:  # snapshots reach the file in the order they were taken
            snap = self.engine.snapshot()
            try:
                written = self._write_checkpoint(ck, snap)
                ck.last_error = None
            except OSError as exc:  # nothing committed past the last good checkpoint
                ck.last_error = f"checkpoint {ck.path} not written: {exc}"
                log.error(ck.last_error)
                written = False
        source = self.engine.source
        if written and isinstance(source, GroupWorkerSource) and snap.offsets:
            source.commit(next_offsets(snap.offsets))  # only after the checkpoint that covers them
        self.last = snap

    # --- consumer-group workers (issue 19) ---------------------------------------------
    def _write_checkpoint(self, ck, snap: Snapshot) -> bool:
        """`snap` to the checkpoint (the caller holds `ck.lock`); once acquisition has ended (Stop,
        preset, stop=) the hand-over's commit comes after this write, so it may say `uncommitted`."""
        running = self.engine.running
        return ck.write(snap, self.config_json(), running, still=self._free,
                        uncommitted=not running and self._uncommitted(snap))  # fmt: skip

    def _uncommitted(self, snap: Snapshot) -> bool:
        """Whether the group's commit does not reach what `snap` counted (a hand-over whose commit the
        broker did not take: down or cut off at Stop). The stopped worker's checkpoint then tells the
        group where to read on; without it a member given these partitions counted them again."""
        source = self._source
        if not isinstance(source, GroupWorkerSource):
            return False
        committed = source.committed
        return any(o > committed.get(k, -1) for k, o in next_offsets(snap.offsets).items())

    def _open(self, uri: str):
        """The source for `uri`; a Kafka consumer-group worker gets checkpoints and exact hand-overs."""
        source = open_source(uri)
        if getattr(source, "group", None) and self.checkpoint_dir != "":
            from livehist.engine.sources.kafka import KafkaSource

            if isinstance(source, KafkaSource):
                if self.checkpoint is None or self.checkpoint.uri != uri:
                    self.checkpoint = Checkpoint(path_for(self.name, self.checkpoint_dir), uri)
                folder = self.checkpoint.path.parent  # the group's other workers checkpoint here too
                source = GroupWorkerSource(
                    uri, handover=self._handover, peers=lambda: group_offsets(folder, uri), lost=self._lost
                )
        return source

    def _handover(self) -> dict:
        """From the consumer thread, before partitions go: all fed counted, checkpointed; next offsets.
        Just after a freeze (see `_watch`), or when the checkpoint cannot be written (a full disk),
        the others read on from our last checkpoint: counts set back to it, nothing to commit."""
        self.engine.wait_processed(timeout=10.0)
        ck = self.checkpoint
        why = "partitions handed over just after a freeze"
        with ck.lock:
            snap = self.engine.snapshot()
            try:
                written = not self._held() and self._write_checkpoint(ck, snap)
            except OSError as exc:  # kept, our counts past the last checkpoint were counted twice
                ck.last_error = f"checkpoint {ck.path} not written: {exc}"
                why, written = f"partitions handed over, {ck.last_error}", False
        if not written:
            note = self._set_back(why)
            notes = getattr(self._source, "notes", None)
            if note and notes is not None:
                notes.append(note)
            return {}
        return next_offsets(snap.offsets)

    def _watch(self) -> None:
        """A consumer-group worker's clock: ticks 5 times a second, so that a gap between two ticks
        tells that this process was frozen (SIGSTOP, a stalled VM). Our group session may then have
        expired and our partitions gone to others, who read on after our checkpoint on disk: no
        checkpoint is written for `CHECKPOINT_HOLD` s, until the group has said so (`_lost` sets our
        counts back to that checkpoint) or not."""
        while not self._closed.wait(0.2):
            self._check_frozen()

    def _held(self) -> bool:
        """Whether a freeze may have cost us our partitions, the group not having said yet: no
        checkpoint may then be written (the others read on from the last one)."""
        self._check_frozen()
        return self.engine.running and time.monotonic() < self._hold_checkpoints_until

    def _free(self) -> bool:
        return not self._held()

    def _check_frozen(self) -> None:
        now = time.monotonic()
        gap = now - self._tick
        # a gap that began before the group told us (`_set_back`) is dealt with already
        if gap > FROZEN_AFTER and self.engine.running and self._tick > self._set_back_at:
            self._hold_checkpoints_until = now + CHECKPOINT_HOLD
            log.warning(
                "no tick for %.1f s (process frozen?): checkpoints held for %.0f s", gap, CHECKPOINT_HOLD
            )
        self._tick = now  # after the hold: a thread that sees this tick sees the hold too

    def _lost(self, keys: set) -> str:
        """From the consumer thread: our group session expired (the process frozen, SIGSTOP, a stalled
        VM) and the group gave our partitions to others, who read on after our checkpoint. What we
        counted after that checkpoint they count too: set our counts back to it (a woken worker left
        6 messages in the sum twice). Checkpoints were held since the freeze, so it is still the one
        they read."""
        return self._set_back(f"partitions {', '.join(f'{t}[{p}]' for t, p in sorted(keys))} lost (our group "
                              "session expired: frozen or cut off)")  # fmt: skip

    def _set_back(self, why: str) -> str:
        """Counts, counters and offsets back to the checkpoint on disk (see `_lost`)."""
        ck = self.checkpoint
        if ck is None or not self.engine.running:
            return ""
        self.engine.wait_processed(timeout=10.0)  # nothing of the lost partitions lands after the reset
        with ck.lock:
            data = ck.read()
            if data is not None and data.get("uri") != self.source_uri:
                return ""
            to = f"checkpoint {ck.path}"
            if data is None:  # none written yet: the others read from where our counts began
                data = {"counters": {"events": 0}, "counts": {}, "offsets": {}, "ranges": {}}
                to = "nothing (no checkpoint written yet)"
            before = self.engine.events
            counters = {**data["counters"], "recounted": data.get("recounted", 0)}
            self.engine.restore(data["counts"], counters, data["offsets"], data["ranges"])
        self._set_back_at = time.monotonic()
        self._hold_checkpoints_until = 0.0
        note = (f"{why}: counts set back to {to} ({data['counters'].get('events'):,} events, "
                f"{before - self.engine.events:,} fewer), from which the group's other members read on")  # fmt: skip
        log.warning(note)
        self._kick.set()  # the publisher shows (and checkpoints) the counts set back
        return note

    def _restore(self) -> bool:
        """Load the checkpoint if it belongs to this source; True if it was acquiring. Another histogram
        list is taken as Configure takes it: a histogram of the same name and binning keeps its counts
        (set aside, the events counted and committed were in no member's counts)."""
        ck = self.checkpoint
        data = ck.read()
        if data is None:
            return False
        if data.get("uri") != self.source_uri:
            stale = ck.path.with_suffix(".stale")
            os.replace(ck.path, stale)
            log.warning("checkpoint %s is for another source: moved to %s", ck.path, stale)
            return False
        if json.loads(data.get("histograms", "[]")) != json.loads(self.config_json()):
            data["counts"] = self._same_binning(data)
            log.warning("checkpoint %s is for another histogram list: counts kept for %s, the others start "
                        "empty", ck.path, ", ".join(data["counts"]) or "none")  # fmt: skip
        counters = {**data["counters"], "recounted": data.get("recounted", 0)}
        restored = self.engine.restore(data["counts"], counters, data["offsets"], data["ranges"])
        self.last = self.engine.snapshot()  # not rewritten yet: it still says whether we were acquiring
        log.warning("restored %s from checkpoint %s (%s events; offsets %s)", ", ".join(restored), ck.path,
                    data["counters"].get("events"), data["offsets"])  # fmt: skip
        return bool(data.get("running"))

    def _same_binning(self, data: dict) -> dict:
        """The checkpoint's counts of histograms that the current list has with the same binning."""
        from livehist.engine.histograms import same_binning

        try:
            theirs = {s.name: s for s in parse_histograms(data.get("histograms", "[]"), "checkpoint", 2**62)}
        except ValueError:  # a list this version no longer reads: nothing carries over
            return {}
        mine = {s.name: s for s in self.engine.specs}
        same = [n for n in mine if n in theirs and same_binning(mine[n], theirs[n])]
        return {n: data["counts"][n] for n in same if n in data["counts"]}

    def _ended(self, reason: str) -> None:
        """Engine callback when accumulation ends (Stop, preset, shutdown): data first, then state."""
        with self._lock:
            self._end_reason = reason
            self._refresh()
            self._set_state()
        self._kick.set()

    def _set_state(self) -> None:
        e = self.engine
        if self.problem:
            self._state, self._status = FAULT, self.problem
        elif not e.running:
            done = f"{self.last.events:,} events in {self.last.elapsed:.1f} s"
            if e.fault:
                self._state = FAULT
                self._status = (
                    f"histogramming failed: {e.fault}; acquisition ended, histograms kept ({done}); "
                    "fix the cause (histogram spec or EventSource) and Start again"
                )
            elif self._end_reason:
                self._state, self._status = ON, f"idle ({self._end_reason}): {done}"
            else:
                self._state, self._status = ON, "idle; Start to acquire"
            if self._source_error:
                self._status += f"; last source error: {self._source_error}"
        elif self._reconnecting:
            self._state = FAULT
            self._status = (
                f"source {self.source_uri} failed: {self._reconnecting}; reconnecting now "
                f"(attempt {self._reconnects}); histograms kept"
            )
        elif self._source_error:
            wait = max(self._next_reconnect - time.monotonic(), 0.0)
            self._state = FAULT
            self._status = (
                f"source {self.source_uri} failed: {self._source_error}; reconnecting in {wait:.1f} s "
                f"(attempt {self._reconnects + 1}); histograms kept"
            )
        elif time.monotonic() - self._last_drop_time < self.alarm_hold:
            self._state = ALARM
            self._status = (
                f"dropping messages: {e.dropped_messages:,} dropped so far (the source sends faster "
                f"than histogramming keeps up); {e.events:,} events counted" + self._refused_note()
            )
        else:
            source = e.source
            finished = source is not None and source.finished
            silent = source.silent_for() if source is not None and not source.paced else 0.0
            self._state = RUNNING
            self._status = (
                f"acquiring from {self.source_uri}"
                + (" (replay finished, waiting for Stop or a preset)" if finished else "")
                + f": {e.events:,} events, {e.event_rate():.3g} events/s"
                + (
                    f"; no message for {silent:.0f} s (is the sender running?)"
                    if silent >= SILENT_AFTER
                    else ""
                )
                + self._foreign_note()
                + self._refused_note()
                + self._partitions_note()
            )

        ck = self.checkpoint
        if ck is not None and ck.last_error and self._state != FAULT:
            self._status += f"; {ck.last_error} (offsets are not committed until it is)"

    def _partitions_note(self) -> str:
        """A group worker the group gives no partition counts nothing, and said only '0 events/s'."""
        since = getattr(self.engine.source, "unassigned_since", None)
        idle = time.monotonic() - since if since is not None else 0.0
        if idle < UNASSIGNED_AFTER:
            return ""
        return (f"; no Kafka partition assigned to this member for {idle:.0f} s (more members than the "
                "topic has partitions, or the group still rebalancing; see KafkaOffsets)")  # fmt: skip

    def _refused_note(self) -> str:
        """Messages a ZeroMQ source refused for their size: in DroppedMessageCount; this says why."""
        source = self.engine.source
        refused = getattr(source, "refused_messages", 0)
        if not refused:
            return ""
        return (f"; {refused:,} messages over max_message_bytes={source.max_message_bytes} refused since "
                "Init (counted as dropped; raise max_message_bytes in the EventSource if they are real)")  # fmt: skip

    def _foreign_note(self) -> str:
        """Messages skipped for another `source=` name: a typo there counted nothing, without a word."""
        e = self.engine
        if not e.foreign_messages:
            return ""
        names = ", ".join(ascii(n[:40]) for n in sorted(e.foreign_sources))  # any name, in Latin-1
        return (f"; {e.foreign_messages:,} messages of other sources skipped ({names}; "
                f"EventSource has source={e.source_name})")  # fmt: skip

    def _supervise(self) -> None:
        """Notice drops and failed sources; reopen a failed source with back-off."""
        e = self.engine
        with self._lock:
            if not e.running:
                return
            if e.dropped_messages > self._last_drop_count:
                self._last_drop_count = e.dropped_messages
                self._last_drop_time = time.monotonic()
            source = e.source
            if self._source_error is None and source is not None and source.error:
                self._source_error, self._reconnecting = source.error, None
                first, cap = self.reconnect_delays
                delay = min(first * 2**self._reconnects, cap)
                self._next_reconnect = time.monotonic() + delay
                log.warning("source failed: %s; reconnecting in %.1f s", source.error, delay)
            elif self._source_error is not None and time.monotonic() >= self._next_reconnect:
                self._reconnects += 1
                try:
                    self._source = self._open(self.source_uri)
                    if source is not None and hasattr(self._source, "notes"):  # what an operator should
                        self._source.notes[:0] = getattr(source, "notes", [])[-20:]  # know stays
                    e.attach(self._source)
                    # FAULT until the new source reaches its broker: not RUNNING while it only tries
                    self._reconnecting, self._source_error = self._source_error, None
                except SourceError as exc:  # still broken: try again later, longer
                    self._source_error = str(exc)
                    first, cap = self.reconnect_delays
                    self._next_reconnect = time.monotonic() + min(first * 2**self._reconnects, cap)
            elif self._reconnecting and source is not None and source.connected:
                self._reconnecting = None
            elif self._source_error is None and source is not None and self._reconnects:
                if source.error is None and e.event_rate() > 0:
                    self._reconnects = 0  # healthy again: next failure starts the back-off anew
            self._set_state()

    def _publish_loop(self) -> None:
        with self._thread_context():
            while not self._closed.is_set():
                # idle: nothing to publish until a command kicks us, so a short period costs nothing
                period = self.publish_period if self.engine.running else max(self.publish_period, 1.0)
                kicked = self._kick.wait(period)
                self._kick.clear()
                if self._closed.is_set():
                    return
                try:
                    self._supervise()
                    if not (kicked or self.engine.running):
                        continue
                    with self._lock:
                        if self.engine.running:
                            self._refresh()
                        self.update_counter += 1
                        update = Update(self.last, self.update_counter, self._state, self._status,
                                        self._configured)  # fmt: skip
                        self._configured = False
                    if self.on_update is not None:
                        self.on_update(update)
                except Exception:  # the publisher must outlive any one bad publish
                    log.exception("publish failed")
