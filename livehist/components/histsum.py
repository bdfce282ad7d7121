"""The histogram-sum component: several EventHistogrammers presented as one, without Tango.

The HistogramSum device is a thin shell over this class, like EventHistogrammer over
`Histogrammer`: it gives each member a client (`connect(name) -> MemberClient`, Tango
proxies in the device) and maps `last`, `state`, `status` and `on_update` onto attributes
and events.

How members are followed, so that no member can block the sum:
- each member has its own thread; it is woken by the member's small events (the client
  calls `kick` on each UpdateCounter change event) and at least once per poll period;
- it reads the member's counters, state, configuration and histograms in one call with a
  client timeout, and reads again if its data changed in between (UpdateCounter, counters,
  state: Stop and a preset end change the data before UpdateCounter follows);
- a member that fails a read is marked DOWN (its last counts are kept in the sum and
  flagged), never waited for; it is retried every poll period;
- the sum thread adds the members' last reads into one `Snapshot` and calls `on_update`.

Members whose histogram list differs from the others' (the list most members share, ties
broken by the order of `Members`) are flagged MISMATCH and left out of the sum.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from livehist.components.histogrammer import ALARM, FAULT, ON, RUNNING, Update
from livehist.engine import Snapshot
from livehist.engine.pipeline import overlap
from livehist.engine.spec import HistogramSpec, SpecError, parse_histograms
from livehist.errors import LivehistError

log = logging.getLogger("livehist.components.histsum")

DOWN, MISMATCH, UNKNOWN = "DOWN", "MISMATCH", "UNKNOWN"
# counter attribute -> Snapshot field; summed over the members (ElapsedTime: the longest)
SUMMED = {"EventCount": "events", "MessageCount": "messages", "BadMessageCount": "bad_messages",
          "DroppedMessageCount": "dropped_messages", "PulseCount": "pulses"}  # fmt: skip
SMALL = ["UpdateCounter", "State", "Status", *SUMMED, "EventRate", "ElapsedTime", "HistogramConfig",
         "PresetTime", "PresetEvents", "PresetPulses", "KafkaOffsets"]  # fmt: skip
SAME = ["UpdateCounter", "State", *SUMMED]  # equal in two reads: no new data in between
OPTIONAL = {"KafkaOffsets"}  # read where the member has it (EventHistogrammers before issue 19 do not)
DEVICE_NAME = re.compile(r"^(tango://[^/]+:\d+/)?[^/\s]+/[^/\s]+/[^/\s]+$")


class MemberError(Exception):
    """A member did not answer, or answered with an error (the message says which)."""


class MemberClient(Protocol):
    """What the component needs from a member device (the device gives Tango proxies)."""

    def read(self, names: list[str]) -> dict[str, Any]: ...

    def command(self, name: str, arg: Any = None) -> None: ...

    def write(self, values: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


@dataclass
class Member:
    """What the sum knows of one member: its last good read and whether it answers now."""

    name: str
    client: MemberClient | None = None
    state: str = UNKNOWN  # the member's own state, or DOWN / MISMATCH
    reason: str = "not read yet"
    counter: int = -1
    values: dict[str, Any] = field(default_factory=dict)  # last good read: counters + histograms
    config: tuple | None = None  # spec_key of each histogram of the last read
    specs: list[HistogramSpec] = field(default_factory=list)
    down_since: float | None = None
    kick: threading.Event = field(default_factory=threading.Event)
    connecting: threading.Lock = field(default_factory=threading.Lock)
    reset_pending: bool = False  # down at a Reset of the sum: reset it when it answers again
    lost: int = 0  # events it had counted before a restart and came back without (until a Reset)
    came_back: bool = False  # answers again after being DOWN (until the next Start or Reset)
    timed_out: bool = False  # DOWN because it did not answer in time (frozen, overloaded), not refused
    resets: int | None = None  # the member's own Reset count, as last read
    expect_reset: bool = False  # the sum sent it a Reset: its count going up is ours
    reset_apart: int = 0  # events in the sum it dropped in a Reset not the sum's (until a Reset)

    @property
    def answers(self) -> bool:
        return self.state not in (DOWN, UNKNOWN)

    def describe(self) -> str:
        return f"{self.name}: {self.state}" + (f" ({self.reason})" if self.state in (DOWN, MISMATCH) else "")


def _device_key(name: str, local_host: str | None) -> tuple:
    """(host address, port, device) of a member name, lower case: `tango://HOST:PORT/a/b/c` and
    `a/b/c` on the same database are one device (HOST resolved, so localhost is 127.0.0.1)."""
    import socket

    m = re.match(r"^tango://([^/]+):(\d+)/(.*)$", name)
    if m:
        host, port, device = m.groups()
    else:
        host, _, port = (local_host or "").rpartition(":")
        device = name
    try:
        host = socket.gethostbyname(host) if host else host
    except OSError:
        pass
    return host.lower(), str(port).lstrip("0"), device.lower()


def check_members(
    members: list[str] | tuple[str, ...], own_name: str = "", local_host: str | None = None
) -> list[str]:
    """The member names, or LivehistError naming the bad entry and the fix. `local_host`: the
    Tango host names without tango:// are on (default $TANGO_HOST)."""
    import os

    local_host = local_host if local_host is not None else os.environ.get("TANGO_HOST", "").split(",")[0]
    names = [m.strip() for m in members if m.strip()]
    if not names:
        raise LivehistError("Members is empty; set it to the EventHistogrammer device names and run Init")
    seen: dict[tuple, int] = {}
    for i, name in enumerate(names):
        if not DEVICE_NAME.match(name):
            raise LivehistError(
                f"Members[{i}] {name!r} is not a Tango device name (domain/family/member); fix it and run Init"
            )
        key = _device_key(name, local_host)
        if key in seen:
            raise LivehistError(
                f"Members[{i}] {name!r} repeats Members[{seen[key]}] {names[seen[key]]!r}; each member counts once"
            )
        if own_name and key[2].split("/") == own_name.lower().split("/")[-3:]:
            raise LivehistError(f"Members[{i}] {name!r} is this HistogramSum itself; list EventHistogrammers")
        seen[key] = i
    return names


def _kafka(values: dict[str, Any]) -> dict:
    """A member's KafkaOffsets (offsets, group, brokers, assigned) as a dict; {} if none or unreadable."""
    try:
        kafka = json.loads(values.get("KafkaOffsets") or "{}")
    except (ValueError, TypeError):
        return {}
    return kafka if isinstance(kafka, dict) else {}


def spec_key(s: HistogramSpec) -> tuple:
    """What makes two specs count the same events into the same bins (not how the JSON was written)."""
    tof = (s.tof.unit, s.tof.scale, s.tof.edges.tobytes()) if s.tof is not None else None
    roi = s.roi_pixels.tobytes() if s.roi_pixels is not None else None
    return (s.name, s.kind, tof, s.first_pixel, tuple(s.shape), roi, s.window)


def _canonical(config: str) -> tuple[tuple, list[HistogramSpec]]:
    specs = parse_histograms(config, "HistogramConfig", max_bytes=2**62)
    return tuple(spec_key(x) for x in specs), specs


class HistogramSum:
    """Follows `members` through `connect` and publishes their sum through `on_update`."""

    def __init__(
        self,
        members: list[str],
        connect: Callable[[str, Callable[[], None]], MemberClient],
        publish_period: float = 0.5,
        timeout: float = 1.0,
        on_update: Callable[[Update], None] | None = None,
        thread_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        own_name: str = "",
    ) -> None:
        if not publish_period > 0 or publish_period > 3600:
            raise LivehistError(f"PublishPeriod must be in (0, 3600] s, got {publish_period!r}")
        if not timeout > 0 or timeout > 600:
            raise LivehistError(f"MemberTimeout must be in (0, 600] s, got {timeout!r}")
        names = check_members(members, own_name)
        self.publish_period = float(publish_period)
        self.poll_period = min(self.publish_period, 1.0)
        self.timeout = float(timeout)
        self.on_update = on_update
        self._connect = connect
        self._thread_context = thread_context
        self._lock = threading.RLock()
        self.members = [Member(n) for n in names]
        self.presets = {"PresetTime": 0.0, "PresetEvents": 0, "PresetPulses": 0}
        self.specs: list[HistogramSpec] = []
        self.config: tuple | None = None  # the histogram list the sum presents (spec keys)
        self.config_json = "[]"  # ... as the JSON of the member it was taken from
        self.update_counter = 0
        self._unchanged: tuple | None = None  # what the last update showed (see `publish`)
        self.last = self._empty()
        self.provenance: dict = {"update": 0, "members": {}}
        self._state, self._status = FAULT, "no member read yet"
        self._end_reason: str | None = None
        self._stopping = False
        self._configured = True
        self._kick = threading.Event()
        self._closed = threading.Event()
        self.refresh()  # one read of every member now, so that the attributes exist from the start
        self._threads = [threading.Thread(target=self._follow, args=(m,), name=f"livehist-sum-{m.name}",
                                          daemon=True) for m in self.members]  # fmt: skip
        self._threads.append(threading.Thread(target=self._publish_loop, name="livehist-sum", daemon=True))
        for t in self._threads:
            t.start()

    # --- state ------------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self._state

    @property
    def status(self) -> str:
        return self._status

    @property
    def running(self) -> bool:
        """As of the last publish, like `state` and `last`: a count seen ended has its final sum."""
        with self._lock:
            return self._state in (RUNNING, ALARM) and self.last.running

    def member_states(self) -> list[str]:
        return [m.describe() for m in self.members]

    def _compute_state(self) -> tuple[str, str]:
        answering = [m for m in self.members if m.answers]
        down = [m for m in self.members if not m.answers]
        if not answering:
            return FAULT, "no member answers: " + "; ".join(m.describe() for m in self.members)
        if all(m.state == FAULT for m in answering):
            # as one EventHistogrammer whose source broke says FAULT (a broker down: every worker
            # reconnecting); 'ALARM, idle' read as a count ended well, and Sardana recorded it so
            return FAULT, "every member that answers is in FAULT: " + "; ".join(
                f"{m.name}: {m.reason}" for m in self.members
            )
        acquiring = any(m.state in (RUNNING, ALARM) for m in answering)
        trouble = [m for m in self.members if m.state in (DOWN, UNKNOWN, MISMATCH, ALARM, FAULT)]
        if acquiring:
            text = f"RUNNING on {sum(m.state in (RUNNING, ALARM) for m in answering)} of {len(self.members)} members"
        else:
            ref = next((m for m in answering if m.config == self.config), None)
            text = self._end_reason or (
                f"idle; {ref.name}: {ref.reason}" if ref else "idle; Start to acquire"
            )
        twice = self._counted_twice()
        lost = [m for m in self.members if m.lost]
        apart = [m for m in self.members if m.reset_apart]
        # a member restarted (or frozen) during a count comes back idle: the others go on without it
        idle = [m for m in answering if acquiring and m.came_back and m.state == ON]
        unsaved = [m for m in answering if _kafka(m.values).get("checkpoint_error")]
        if trouble or twice or lost or idle or unsaved or apart:
            parts = [twice] if twice else []
            if down:
                parts.append("down: " + ", ".join(f"{m.name} ({m.reason})" for m in down))
            if lost:
                parts.append("events lost by a restart: " + ", ".join(f"{m.name} ({m.lost:,})" for m in lost)
                             + " are no longer in the sum; Reset to count afresh")  # fmt: skip
            if apart:
                parts.append("reset on its own, not through the sum: " + ", ".join(
                    f"{m.name} ({m.reset_apart:,} events)" for m in apart)
                    + " no longer in the sum; Reset the sum to count afresh")  # fmt: skip
            if idle:
                parts.append("back from DOWN but idle while the others acquire: " + ", ".join(m.name for m in idle)
                             + "; Stop and Start the sum to include it")  # fmt: skip
            if unsaved:  # a worker sets its counts back to its last checkpoint at a Stop or hand-over
                parts.append("checkpoints not written: " + ", ".join(
                    f"{m.name} ({_kafka(m.values)['checkpoint_error']})" for m in unsaved)
                    + "; what they counted since their last checkpoint leaves the sum at a Stop or "
                    "hand-over and is counted again after it: the total is not final")  # fmt: skip
            for kind, what in ((MISMATCH, "left out, histograms differ"), (ALARM, "dropping messages"),
                               (FAULT, "in FAULT")):  # fmt: skip
                bad = [m for m in self.members if m.state == kind]
                if bad:
                    parts.append(f"{what}: " + ", ".join(f"{m.name} ({m.reason})" for m in bad))
            return ALARM, f"{text}; " + "; ".join(parts)
        return (RUNNING if acquiring else ON), text

    def _counted_twice(self) -> str:
        """Members in the sum that read the same Kafka partitions outside one consumer group
        (no group=, or different groups): each counts every message, so the sum holds them twice."""
        seen: dict[str, tuple[str, set[str], str | None]] = {}
        for m in self.members:
            if m.config != self.config or m.config is None:
                continue
            kafka = _kafka(m.values)
            if not isinstance(kafka.get("offsets"), dict):
                continue
            brokers = {b.strip().lower() for b in str(kafka.get("brokers") or "").split(",") if b.strip()}
            group = kafka.get("group")
            for partition in kafka["offsets"]:
                other = seen.get(partition)
                if other is None:
                    seen[partition] = (m.name, brokers, group)
                elif (other[1] & brokers or not (other[1] and brokers)) and (
                    group is None or group != other[2]
                ):
                    return (f"counted twice: {other[0]} and {m.name} both read {partition} outside one consumer "
                            "group, so the sum holds those events twice; give both the same group= in "
                            "EventSource (or read other topics)")  # fmt: skip
        return self._offsets_counted_twice()

    def _offsets_counted_twice(self) -> str:
        """Kafka messages that two members of the sum (or one member, twice) have counted: a worker
        frozen past its session (SIGSTOP, a stalled VM) counts on when it wakes, while the group has
        given its partitions to another that counts them too. Found from the offset ranges each
        member reports; the sum is then too high by these messages' events."""
        seen: dict[str, list[tuple[str, set[str], list[list[int]]]]] = {}
        twice: dict[str, list[list[int]]] = {}
        pairs: list[str] = []
        own = []
        for m in self.members:
            if m.config != self.config or m.config is None:
                continue
            kafka = _kafka(m.values)
            if int(kafka.get("recounted") or 0):
                own.append(f"{m.name} ({int(kafka['recounted']):,})")
            ranges = kafka.get("ranges")
            if not isinstance(ranges, dict):
                continue
            brokers = {b.strip().lower() for b in str(kafka.get("brokers") or "").split(",") if b.strip()}
            for partition, mine in ranges.items():
                for name, theirs_brokers, theirs in seen.get(partition, []):
                    if brokers and theirs_brokers and not brokers & theirs_brokers:
                        continue  # another cluster's topic of the same name
                    both = overlap(mine, theirs)
                    if both:
                        twice.setdefault(partition, []).extend(both)
                        pair = f"{name} and {m.name}"
                        if pair not in pairs:
                            pairs.append(pair)
                seen.setdefault(partition, []).append((m.name, brokers, mine))
        parts = []
        if twice:
            n = sum(b - a + 1 for r in twice.values() for a, b in r)
            where = ", ".join(f"{p} offsets " + ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in r[:3])
                              for p, r in sorted(twice.items()))  # fmt: skip
            parts.append(f"counted twice: {n:,} Kafka messages are in the counts of both {'; '.join(pairs)} "
                         f"({where}): a member cut off from its group (frozen, stalled) counted on after the "
                         "group gave its partitions to another; the sum is too high by their events")  # fmt: skip
        if own:
            parts.append("counted twice by one member (a partition read again from an older commit): "
                         + ", ".join(own) + " messages")  # fmt: skip
        if parts:
            parts.append("Reset and count again for an exact total")
        return "; ".join(parts)

    # --- reading the members ----------------------------------------------------------
    def _client(self, m: Member) -> MemberClient:
        with m.connecting:  # one client per member, whichever thread asks first
            if m.client is None:
                m.client = self._connect(m.name, lambda: self._on_member_event(m))
            return m.client

    def _on_member_event(self, m: Member) -> None:
        m.kick.set()

    def _read(self, m: Member) -> None:
        """One consistent read of a member; marks it DOWN or MISMATCH instead of raising."""
        began = time.monotonic()
        try:
            client = self._client(m)
            small = client.read(SMALL)
            counter = int(small["UpdateCounter"])
            values = small
            # a member's data also changes without a publish (Stop, preset end, Reset set `last`
            # at once; UpdateCounter follows): new counters or state mean new histograms too
            if (
                counter != m.counter
                or small["HistogramConfig"] != m.values.get("HistogramConfig")
                or any(small[k] != m.values.get(k) for k in SAME)
            ):
                for _ in range(3):  # again if the member's data changed between the reads
                    config, specs = _canonical(small["HistogramConfig"])
                    names = [s.name for s in specs]
                    values = client.read(["UpdateCounter", *SMALL[1:], *names]) if names else small
                    # histograms and counters from one `last`: the same UpdateCounter, counters, state after
                    after = client.read(SAME) if names else values
                    if int(values["UpdateCounter"]) == counter and all(after[k] == values[k] for k in SAME):
                        break
                    counter, small = int(after["UpdateCounter"]), values
                for s in specs:
                    values[s.name] = np.asarray(values[s.name], dtype=np.int64)
                    if values[s.name].shape != s.data_shape:
                        raise MemberError(
                            f"{s.name} has shape {values[s.name].shape}, its spec says {s.data_shape}"
                        )
            else:
                values = {**m.values, **small}  # nothing new published: keep the histograms read last
                config, specs = m.config, m.specs
        except MemberError as exc:
            self._mark_down(m, str(exc), timed_out=time.monotonic() - began >= 0.9 * self.timeout)
            return
        except (SpecError, ValueError, KeyError, TypeError) as exc:
            self._mark_down(m, f"not an EventHistogrammer as livehist knows it: {exc}")
            return
        if m.reset_pending:  # it missed a Reset of the sum while down: its counts are older than it
            m.reset_pending = False
            if str(values["State"]) in (RUNNING, ALARM):
                # a worker restarted from its checkpoint goes on acquiring with its old counts: they
                # must not enter the sum. What it counted between its restart and this read goes too
                log.warning("member %s came back acquiring after a Reset it missed: reset now; the events "
                            "it counted since its restart (%s in all) are not in the sum",
                            m.name, values.get("EventCount"))  # fmt: skip
            try:
                m.expect_reset = True
                self._client(m).command("Reset")
            except MemberError as exc:
                m.reset_pending = True
                self._mark_down(m, str(exc))
                return
            m.kick.set()  # its stale counts never enter the sum: read it again, cleared
            return
        with self._lock:
            was_down = not m.answers
            # a Kafka consumer-group worker is exempt: the group hands what it had not committed to
            # the others (or to itself, restarted from its checkpoint), and they count it again
            if m.state == DOWN and _kafka(values).get("group") is None:
                m.came_back = True
                # restarted without its counts (no checkpoint, or an older one): they leave the sum
                before, now = m.values.get("EventCount"), values.get("EventCount")
                if before is not None and now is not None and int(now) < int(before):
                    m.lost += int(before) - int(now)
                    log.warning("member %s came back with %s events fewer than it had", m.name, m.lost)
            self._check_resets(m, values)
            m.values, m.counter, m.config, m.specs = values, counter, config, specs
            m.state, m.reason, m.down_since = str(values["State"]), str(values["Status"]), None
            m.timed_out = False
            self._match_specs()
        if was_down:
            log.info("member %s answers (%s)", m.name, m.state)
            self._sync_presets(m)
        self._kick.set()

    def _check_resets(self, m: Member, values: dict) -> None:
        """A Reset of the member not sent by the sum (a client of the member itself): what it had
        counted left the sum's total, which no longer holds everything read."""
        resets = _kafka(values).get("resets")
        if not isinstance(resets, int):
            return
        if m.resets is None or resets < m.resets:
            # first read, or a new process (its count starts again at 0): a Reset the sum sent is
            # done before the read that follows it, so it is in this count already
            m.expect_reset = False
        elif resets > m.resets:
            if m.expect_reset:
                m.expect_reset = False
            elif m.config is not None and m.config == self.config:
                m.reset_apart += int(m.values.get("EventCount") or 0)
                log.warning("member %s was reset, not by the sum: %s events left the sum", m.name,
                            m.reset_apart)  # fmt: skip
        m.resets = resets

    def _mark_down(self, m: Member, reason: str, timed_out: bool = False) -> None:
        with self._lock:
            m.timed_out = timed_out
            if m.state != DOWN:
                log.warning("member %s is down: %s", m.name, reason or "no answer")
                m.down_since = time.monotonic()
            elif not reason:  # a retry the client held back: the first reason still holds
                reason = m.reason
            m.state, m.reason = DOWN, reason or "does not answer"
            self._match_specs()
        self._kick.set()

    def _match_specs(self) -> None:
        """Pick the histogram list most members share; flag the others MISMATCH."""
        known = [m for m in self.members if m.config is not None]
        if not known:
            return
        votes = Counter(m.config for m in known if m.answers) or Counter(m.config for m in known)
        best = max(votes.values())
        config = next(m.config for m in known if votes.get(m.config) == best)
        if config != self.config:
            self.config = config
            ref = next(m for m in known if m.config == config)
            self.specs, self.config_json = ref.specs, ref.values["HistogramConfig"]
            self._configured = True
        for m in known:
            if m.answers and m.config != config:
                m.state = MISMATCH
                mine, ours = {spec_key(s) for s in m.specs}, {spec_key(s) for s in self.specs}
                diff = sorted({k[0] for k in mine ^ ours})
                m.reason = "histograms differ from the other members': " + ", ".join(diff or ["order"])

    def _follow(self, m: Member) -> None:
        with self._thread_context():
            while not self._closed.is_set():
                m.kick.wait(self.poll_period)
                m.kick.clear()
                if self._closed.is_set():
                    break
                try:
                    self._read(m)
                except Exception:  # never lose the thread that follows a member
                    log.exception("reading %s failed", m.name)

    def refresh(self, skip_frozen: bool = False) -> None:
        """Read every member now (in parallel, each with its timeout) and publish the sum.

        A read still running at the deadline marks its member DOWN (its thread goes on: Tango's
        first timeout on a frozen server takes several times the client timeout). `skip_frozen`
        (the commands): members already DOWN for not answering in time are not waited for again;
        the thread that follows each member sees them answer again."""
        targets = [m for m in self.members if not (skip_frozen and m.state == DOWN and m.timed_out)]
        threads = [threading.Thread(target=self._read_in_context, args=(m,), daemon=True) for m in targets]
        for t in threads:
            t.start()
        deadline = time.monotonic() + self.timeout + 0.25
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for t, m in zip(threads, targets, strict=True):
            if t.is_alive():
                self._mark_down(m, "does not answer in time", timed_out=True)
        self.publish()

    def _read_in_context(self, m: Member) -> None:
        with self._thread_context():
            try:
                self._read(m)
            except Exception:
                log.exception("reading %s failed", m.name)

    # --- the sum ----------------------------------------------------------------------
    def _empty(self) -> Snapshot:
        return Snapshot(counts={}, edges={}, specs={}, out_of_range={}, events=0, messages=0, bad_messages=0,
                        dropped_messages=0, pulses=0, elapsed=0.0, event_rate=0.0, running=False)  # fmt: skip

    def _sum(self) -> Snapshot:
        included = [m for m in self.members if m.config == self.config and m.config is not None]
        counts: dict[str, np.ndarray] = {}
        for s in self.specs:
            total = np.zeros(s.data_shape, np.int64)
            for m in included:
                total += m.values[s.name]
            counts[s.name] = total
        summed = {f: sum(int(m.values.get(a, 0)) for m in included) for a, f in SUMMED.items()}
        live = [m for m in included if m.answers]
        return Snapshot(
            counts=counts,
            edges={s.name: s.tof.edges for s in self.specs if s.tof is not None},
            specs={s.name: s for s in self.specs},
            out_of_range={},
            elapsed=max((float(m.values.get("ElapsedTime", 0.0)) for m in included), default=0.0),
            event_rate=sum(float(m.values.get("EventRate", 0.0)) for m in live),
            running=any(m.state in (RUNNING, ALARM) for m in live),
            **summed,
        )

    def publish(self, force: bool = True) -> Update | None:
        """Add the members' last reads, update state, check the event preset, hand out the update.
        Not `force`d (the periodic publish): nothing is handed out while idle and unchanged (the
        same members' updates, states, total and status), so clients are not made to re-read a
        sum that did not move (a panel read all its histograms 10 times a second)."""
        with self._lock:
            snap = self._sum()
            state, status = self._compute_state()
            unchanged = (snap.running, snap.events, state, status,
                         tuple((m.counter, m.state, m.config) for m in self.members))  # fmt: skip
            if not force and not snap.running and not self._configured and unchanged == self._unchanged:
                return None
            self._unchanged = unchanged
            preset = int(self.presets["PresetEvents"])
            if preset and snap.running and snap.events >= preset and not self._stopping:
                self._stopping = True
                self._end_reason = f"preset events reached on the total ({snap.events:,} >= {preset:,})"
                threading.Thread(target=self._stop_for_preset, daemon=True).start()
            self.update_counter += 1
            self.last = snap
            self.provenance = self._provenance()
            self._state, self._status = state, status
            update = Update(snap, self.update_counter, state, status, self._configured)
            self._configured = False
        if self.on_update is not None:
            try:
                self.on_update(update)
            except Exception:  # a failing shell must not stop the sum
                log.exception("publishing the sum failed")
        return update

    def _provenance(self) -> dict:
        """Per member: what its counts in this update cover (Kafka offsets per partition)."""
        members = {}
        for m in self.members:
            kafka = _kafka(m.values)
            members[m.name] = {
                "state": m.state, "update": m.counter, "in_sum": m.config == self.config and m.config is not None,
                "offsets": kafka.get("offsets", {}), "group": kafka.get("group"), "assigned": kafka.get("assigned", []),
            }  # fmt: skip
        return {"update": self.update_counter, "time": time.time(), "members": members}

    def _publish_loop(self) -> None:
        with self._thread_context():
            while not self._closed.is_set():
                self._kick.wait(self.publish_period)
                if self._closed.is_set():
                    break
                # let the other members' updates of this period arrive: one sum for all of them
                time.sleep(min(0.05, self.publish_period / 10))
                self._kick.clear()
                try:
                    self.publish(force=False)
                except Exception:  # never lose the publisher
                    log.exception("adding up the members failed")

    def _stop_for_preset(self) -> None:
        with self._thread_context():
            try:
                self._fan_out("Stop", lambda c: c.command("Stop"), only_answering=True)
                self.refresh(skip_frozen=True)
            finally:
                self._stopping = False

    # --- commands ---------------------------------------------------------------------
    def _fan_out(self, what: str, action: Callable[[MemberClient], None], only_answering: bool = True
                 ) -> dict[str, str]:  # fmt: skip
        """Run `action` on the members in parallel (each bounded by the client timeout);
        returns member -> error for those that failed (they are marked DOWN if they do not answer)."""
        errors: dict[str, str] = {}
        targets = [m for m in self.members if m.answers or not only_answering]

        def one(m: Member) -> None:
            with self._thread_context():
                try:
                    action(self._client(m))
                except MemberError as exc:
                    errors[m.name] = str(exc)

        threads = [threading.Thread(target=one, args=(m,), daemon=True) for m in targets]
        for t in threads:
            t.start()
        deadline = time.monotonic() + self.timeout + 0.25
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for t, m in zip(threads, targets, strict=True):
            if t.is_alive():
                errors[m.name] = f"{what} did not return within {self.timeout + 0.25:g} s"
                self._mark_down(m, errors[m.name], timed_out=True)
        return errors

    def _require_answering(self, what: str) -> list[Member]:
        for delay in (0.0, 1.1):  # Tango holds a reconnection back for 1 s after a failure
            if all(m.answers or m.timed_out for m in self.members):
                break  # a frozen member is not asked again: each try cost a client timeout
            time.sleep(delay)
            self.refresh(skip_frozen=True)
        answering = [m for m in self.members if m.answers]
        if not answering:
            raise LivehistError(
                f"{what}: no member answers: " + "; ".join(m.describe() for m in self.members)
            )
        return answering

    def start(self) -> None:
        # the members' states now, not as of their last event; one that did not answer in time
        # (a Stop slower than the timeout: a Kafka worker handing over in a rebalance) is asked
        # again, so that it is not left out of the count once it answers (a frozen one costs one timeout)
        self.refresh(skip_frozen=False)
        answering = self._require_answering("Start")
        running = [m.name for m in answering if m.state in (RUNNING, ALARM)]
        if running:
            raise LivehistError(f"already RUNNING ({', '.join(running)}); Stop first")
        mismatched = [m.name for m in answering if m.state == MISMATCH]
        if mismatched:
            raise LivehistError(
                f"members {', '.join(mismatched)} have other histograms than the rest; "
                "call Configure on the sum to give every member the same list"
            )
        self._end_reason = None
        for m in self.members:
            m.came_back = False
        values = dict(self.presets)
        errors = self._fan_out("Start", lambda c: (c.write(values), c.command("Start")))
        self.refresh(skip_frozen=True)
        if len(errors) == len(answering):
            raise LivehistError(
                "Start failed on every member: " + "; ".join(f"{k}: {v}" for k, v in errors.items())
            )

    def stop(self) -> None:
        """Stop every member; the data of the sum is final when this returns. Harmless when idle."""
        self._fan_out("Stop", lambda c: c.command("Stop"))
        if self._end_reason is None:
            self._end_reason = "stopped"
        self.refresh(skip_frozen=True)

    def reset(self) -> None:
        """Reset the members that answer; the others leave the sum and are reset when they answer again."""
        self._require_answering("Reset")
        for m in self.members:
            m.expect_reset = True
        errors = self._fan_out("Reset", lambda c: c.command("Reset"))
        with self._lock:
            for m in self.members:
                m.lost, m.came_back, m.reset_apart = 0, False, 0
                if not m.answers or m.name in errors:
                    m.reset_pending = True
                    m.values = {
                        k: v for k, v in m.values.items() if k in ("HistogramConfig", "State", "Status")
                    }
                    m.counter = -1
                    m.config = None
        self.refresh(skip_frozen=True)

    def configure(self, histograms: str) -> list[HistogramSpec]:
        """Give every member the same histogram list; all or nothing."""
        specs = parse_histograms(histograms, "Configure", max_bytes=2**62)  # SpecError names the field
        self._require_answering("Configure")
        down = [m.describe() for m in self.members if not m.answers]
        if down:
            raise LivehistError(
                f"Configure needs every member to answer; {'; '.join(down)}; nothing was changed"
            )
        before = {m.name: m.values["HistogramConfig"] for m in self.members}
        errors = self._fan_out("Configure", lambda c: c.command("Configure", histograms))
        if errors:
            for m in self.members:  # put back the members that took it
                if m.name not in errors:
                    with contextlib.suppress(MemberError):
                        self._client(m).command("Configure", before[m.name])
            self.refresh(skip_frozen=True)
            raise LivehistError("Configure failed on " + "; ".join(f"{k}: {v}" for k, v in errors.items())
                                + "; every member keeps its previous histograms")  # fmt: skip
        self.refresh(skip_frozen=True)
        return specs

    def set_presets(self, **values: float) -> None:
        """PresetTime (s) goes to every member; PresetEvents/PresetPulses are met on the total
        (each member also gets them as an upper bound, exact when one member does all the work)."""
        for key, v in values.items():
            if not np.isfinite(v) or v < 0:
                raise LivehistError(f"{key} must be >= 0 (0 = no preset), got {v!r}")
        errors = self._fan_out("preset", lambda c: c.write(values))
        self.presets.update(values)
        if errors:
            log.warning("preset not written to %s (written when they answer again)", ", ".join(errors))

    def _sync_presets(self, m: Member) -> None:
        """A member that answers again gets the sum's presets (it missed them while down)."""
        if m.state in (RUNNING, ALARM):
            return
        wrong = {k: v for k, v in self.presets.items() if m.values.get(k) != v}
        if wrong:
            with contextlib.suppress(MemberError):
                self._client(m).write(wrong)

    def close(self) -> None:
        self._closed.set()
        self._kick.set()
        for m in self.members:
            m.kick.set()
            if m.client is not None:
                with contextlib.suppress(Exception):
                    m.client.close()
