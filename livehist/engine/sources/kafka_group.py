"""A consumer-group worker that hands over exactly: `kafka://BROKER/TOPIC?group=G` with a checkpoint.

`KafkaSource` with these changes, for an owner that checkpoints its counts (the histogrammer
component with a checkpoint file, issue 19):
- paced: Kafka keeps the data, so a full queue waits instead of dropping (a drop would be a loss);
- on assignment, each partition starts at the latest of the group's committed offset, the
  owner's checkpoint (`start_from`) and the checkpoints of the group's other workers
  (`peers()`): a survivor that went on is not counted again, our own counts past a commit that
  did not land are not counted twice, and neither are those of a worker that was killed after
  its checkpoint and before its commit reached the broker (its checkpoint holds them, and it
  adds them back when it restarts);
- before partitions are revoked (a rebalance) and when consumption ends, the owner's
  `handover()` waits until everything fed is histogrammed, writes a checkpoint and returns
  the next offsets, which are committed synchronously before the partitions go;
- periodic commits (`commit`, after each checkpoint) are asynchronous, one in flight at a
  time, touch only partitions still assigned and never move an offset back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from livehist.engine.sources.kafka import KafkaSource, Key

log = logging.getLogger("livehist.engine.sources.kafka_group")

END = "end of acquisition"
HANDOVER_WAIT_S = 3.0  # at Stop, for the broker to answer the last commit (`_commit_and_wait`)


class GroupWorkerSource(KafkaSource):
    paced = True

    def __init__(
        self,
        uri: str,
        handover: Callable[[], dict[Key, int]] | None = None,
        peers: Callable[[], dict[Key, tuple[int, str]]] | None = None,
        lost: Callable[[set[Key]], str] | None = None,
    ) -> None:
        super().__init__(uri)
        self.handover = handover
        self.lost = lost  # the owner's hook when partitions are lost (session expired): set counts back
        self.peers = peers  # per partition: the furthest next offset a group checkpoint covers, and whose
        self.assigned: set[Key] = set()
        self.unassigned_since: float | None = None  # since when (monotonic) no partition is ours
        self.committed: dict[Key, int] = {}  # the last offsets this worker committed
        self.notes: list[str] = []  # what an operator should know (a commit that did not land)
        self._consumer = None

    def emit(self, item) -> bool:
        """Paced, and a commit asked for meanwhile goes out at once: a checkpoint's offsets reach
        the broker within one message, not after the queue has room again."""
        consumer = self._consumer
        while not self.stopping:
            if consumer is not None and self._commit_request:
                self._do_commit(consumer)
            if self._feed(item, block=True, timeout=0.05):
                return True
        return False

    def _consume(self, consumer) -> None:
        self.handover_done = False
        self._consumer = consumer
        try:
            super()._consume(consumer)
        finally:
            try:
                if self.assigned and self.handover is not None and self._fatal is None:
                    self._hand_over(consumer, set(self.assigned), END)
            finally:  # even if a callback raised in the hand-over's poll: close() must not hand over again
                self.handover_done = True
                self._consumer = None

    def _rebalance_callbacks(self) -> dict:
        self.handover_done = False
        self.assigned = set()
        self.unassigned_since = time.monotonic()
        return {"on_assign": self._this_session(self._on_assign), "on_revoke": self._this_session(self._on_revoke),
                "on_lost": self._this_session(self._on_lost)}  # fmt: skip

    def _on_assign(self, consumer, partitions) -> None:
        from confluent_kafka import TopicPartition

        keys = [(tp.topic, tp.partition) for tp in partitions]
        try:
            committed = {
                (tp.topic, tp.partition): tp.offset for tp in consumer.committed(partitions, timeout=10)
            }
        except Exception as exc:  # no answer: start as a plain group member would
            log.warning("committed offsets not read (%s): starting from the checkpoint or `start`", exc)
            committed = {}
        peers = self._peer_positions(consumer, keys)
        out, rest = [], []
        for k in keys:
            mine, group = self._resume.get(k), committed.get(k, -1)
            if mine is not None and group >= 0 and group < mine:
                note = (f"{k[0]}[{k[1]}]: the group's commit is at {group}, our checkpoint at {mine} "
                        "(our last commit did not land); reading on from the checkpoint")  # fmt: skip
                log.warning(note)
                self.notes.append(note)
            peer, who = peers.get(k, (None, ""))
            if peer is not None and peer > max(group, mine if mine is not None else -1):
                note = (f"{k[0]}[{k[1]}]: the group's commit is at {group}, but {who}'s checkpoint covers "
                        f"it up to {peer} (its commit did not land before it stopped); reading on from {peer}")  # fmt: skip
                log.warning(note)
                self.notes.append(note)
            known = [x for x in (mine, group, peer) if x is not None and x >= 0]
            if known:
                out.append(TopicPartition(k[0], k[1], max(known)))
            else:
                rest.append(k)
        out += self._positions_for(consumer, rest, group=True) if rest else []
        self.assigned |= set(keys)
        self.unassigned_since = None if self.assigned else self.unassigned_since
        log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in out))
        consumer.assign(out)

    def _peer_positions(self, consumer, keys: list[Key]) -> dict[Key, tuple[int, str]]:
        """The group's other checkpoints, cut to what the topic holds: an offset past a
        partition's end is from a topic deleted and created again, and is ignored."""
        from confluent_kafka import TopicPartition

        if self.peers is None:
            return {}
        try:
            peers = {k: v for k, v in self.peers().items() if k in keys}
        except Exception as exc:  # unreadable folder: the group's commits, as before
            log.warning("the group's checkpoints not read (%s): starting from the group's commits", exc)
            return {}
        out = {}
        for k, (offset, who) in peers.items():
            try:
                _, high = consumer.get_watermark_offsets(TopicPartition(*k), timeout=5.0)
            except Exception as exc:
                log.warning("%s[%d]: end offset not read (%s): %s's checkpoint ignored", k[0], k[1], exc, who)
                continue
            if offset > high:
                log.warning("%s[%d]: %s's checkpoint says %d, past the partition's end %d (a topic created "
                            "anew?): ignored", k[0], k[1], who, offset, high)  # fmt: skip
                if self.topic_renewed is not None:  # a broker back without its topics, met without a
                    self.topic_renewed(k[0])  # reconnect: the offsets we counted were of the old one
                continue
            out[k] = (offset, who)
        return out

    def _on_revoke(self, consumer, partitions) -> None:
        keys = {(tp.topic, tp.partition) for tp in partitions}
        if keys and self.handover is not None and not getattr(self, "handover_done", False):
            self._hand_over(consumer, keys & self.assigned, "rebalance")
        self.assigned -= keys
        self._none_left()
        for k in keys:
            self._next.pop(k, None)
            self._resume.pop(k, None)  # if it comes back, the group's commit is the truth
        consumer.unassign()

    def _none_left(self) -> None:
        if not self.assigned and self.unassigned_since is None:
            self.unassigned_since = time.monotonic()

    def _on_lost(self, consumer, partitions) -> None:
        """Partitions lost without a revoke (our session expired): another member has them now."""
        keys = {(tp.topic, tp.partition) for tp in partitions}
        log.warning("partitions lost (session expired): %s", sorted(keys))
        self.assigned -= keys
        self._none_left()
        for k in keys:
            self._next.pop(k, None)
            self._resume.pop(k, None)
        if keys and self.lost is not None:
            # the members that have them now read on from our checkpoint: what we counted after it
            # (before a freeze, or since waking) they count too
            try:
                note = self.lost(keys)
            except Exception as exc:
                note = f"partitions {sorted(keys)} lost; counts not set back to the checkpoint: {exc}"
                log.error(note)
            if note:
                self.notes.append(note)

    def _hand_over(self, consumer, keys: set[Key], why: str) -> None:
        """Everything fed is counted and checkpointed; then commit those partitions' next offsets."""
        from confluent_kafka import KafkaException, TopicPartition

        try:
            offsets = self.handover()
        except Exception as exc:  # no checkpoint: commit nothing, the group re-reads from the last one
            log.error("checkpoint before %s failed: %s; offsets not committed", why, exc)
            return
        todo = {k: o for k, o in offsets.items() if k in keys and o > self.committed.get(k, -1)}
        if not todo:
            return
        if self.error is not None:  # no broker heard from: a synchronous commit would wait for ever
            log.warning("%s: %s; offsets not committed (the checkpoint holds them)", why, self.error)
            return
        if why == END:  # Stop: waits HANDOVER_WAIT_S at most for the broker's answer
            self._commit_and_wait(consumer, todo)
            return
        try:
            consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in todo.items()], asynchronous=False
            )
            self.committed.update(todo)
            log.info("%s: committed %s", why, todo)
        except KafkaException as exc:
            self.commit_error = str(exc)
            log.warning("%s: commit failed: %s", why, exc)

    def _commit_and_wait(self, consumer, todo: dict[Key, int]) -> None:
        """The end of acquisition's commit, asynchronous, its answer awaited HANDOVER_WAIT_S at most:
        a synchronous one waited as long as a frozen or cut-off broker stayed away, and Stop with
        it (10 s, then the thread lived on). Unanswered, the checkpoint, marked uncommitted, tells
        the group where to read on."""
        deadline = time.monotonic() + HANDOVER_WAIT_S
        sent = False
        while time.monotonic() < deadline:
            if not self._commit_in_flight:
                if sent:
                    break
                self._send_commit(consumer, todo)
                sent = True
                if not self._commit_in_flight:  # refused at once (commit_error says why)
                    break
            try:
                consumer.poll(0.1)  # serves `_on_commit`; a message it returns is not counted (stopping)
            except Exception as exc:  # a callback's error: the checkpoint holds the offsets
                log.warning("%s: waiting for the commit's answer: %s", END, exc)
                break
        if self._commit_in_flight or not sent:
            log.warning("%s: the broker did not answer the commit of %s within %g s (the checkpoint holds them)",
                        END, todo, HANDOVER_WAIT_S)  # fmt: skip
        elif self.commit_error is None:
            log.info("%s: committed %s", END, todo)
        else:
            log.warning("%s: commit failed: %s", END, self.commit_error)

    def _do_commit(self, consumer) -> None:
        if self._commit_held():
            return
        with self._commit_lock:
            request, self._commit_request = self._commit_request, None
        if not request:
            return
        todo = {k: o for k, o in request.items() if k in self.assigned and o > self.committed.get(k, -1)}
        if todo:
            self._send_commit(consumer, todo)

    def _forget_commits(self, topic: str) -> None:
        self.committed = {k: o for k, o in self.committed.items() if k[0] != topic}

    def _committed(self, offsets: list[tuple[Key, int]]) -> None:
        for k, o in offsets:
            if o >= 0 and o > self.committed.get(k, -1):
                self.committed[k] = o
