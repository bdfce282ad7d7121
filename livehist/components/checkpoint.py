"""Durable checkpoints of a consumer-group worker: counts + the Kafka offsets they cover.

One file per device (`<dir>/<domain>_<family>_<member>.npz`), replaced atomically at each
publish (written to a temporary file, fsynced, renamed over the old one, directory fsynced),
so a SIGKILL at any moment leaves either the previous checkpoint or the new one, whole.
The offsets are committed to Kafka only after the checkpoint that covers them is on disk;
on restart the worker loads it and reads each partition it gets from the latest of its
checkpoint, the group's commit and the other checkpoints of its group in the same folder
(`group_offsets`): a worker SIGKILLed after its checkpoint and before its commit reached the
broker has counted more than the group's commit says, and whoever takes its partitions over
starts after what it counted. Workers on several hosts share the folder (a network file
system) for this; each file is only ever replaced whole, by its one writer.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from livehist.engine import Snapshot

log = logging.getLogger("livehist.components.checkpoint")
VERSION = 1


def default_dir() -> Path:
    state = os.environ.get("LIVEHIST_STATE_DIR") or Path.home() / ".local" / "state" / "livehist"
    return Path(state) / "checkpoints"


def path_for(device: str, directory: str | Path | None = None) -> Path:
    safe = "_".join(p for p in device.replace("\\", "/").split("/")[-3:] if p) or "histogrammer"
    return Path(directory or default_dir()) / f"{safe}.npz"


def group_of(uri: str) -> tuple[str, str] | None:
    """(topics, group) of a kafka://...?group=G URI (brokers may be spelled differently)."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(uri)
    group = parse_qs(parts.query).get("group", [""])[0]
    return (parts.path.strip("/"), group) if parts.scheme == "kafka" and group else None


def group_offsets(directory: str | Path, uri: str) -> dict[tuple[str, int], tuple[int, str]]:
    """Per partition, the furthest next offset any checkpoint of `uri`'s group in `directory`
    covers, written while acquiring, and the file that says so. Only the small `meta` entry of
    each file is read."""
    me = group_of(uri)
    out: dict[tuple[str, int], tuple[int, str]] = {}
    if me is None:
        return out
    for path in sorted(Path(directory).glob("*.npz")):
        try:
            with np.load(path) as z:
                meta = json.loads(bytes(z["meta"]).decode())
        except Exception as exc:  # being replaced, damaged, not ours: its owner deals with it
            log.debug("checkpoint %s not read: %s", path, exc)
            continue
        if group_of(str(meta.get("uri", ""))) != me:
            continue
        if not meta.get("running") and not meta.get("uncommitted"):
            continue  # a worker that stopped in order handed over and committed: its commit says it all
        for t, p, _, last in meta.get("offsets", []):
            k = (str(t), int(p))
            if k not in out or int(last) + 1 > out[k][0]:
                out[k] = (int(last) + 1, path.stem)
    return out


def next_offsets(offsets: dict) -> dict[tuple[str, int], int]:
    """(first, last) counted per partition -> the next offset to read."""
    return {k: int(last) + 1 for k, (_, last) in offsets.items()}


class Checkpoint:
    """Writes and reads one worker's checkpoint file; `lock` orders snapshot + write."""

    def __init__(self, path: str | Path, uri: str) -> None:
        self.path = Path(path)
        self.uri = uri
        self.lock = threading.Lock()
        self.written = 0
        self.last_error: str | None = None
        # a write cut short by a SIGKILL left its temporary file for good: none is under way now
        for tmp in self.path.parent.glob(f"{glob.escape(self.path.name)}*.tmp"):
            with_suppress_unlink(str(tmp))
            log.info("removed %s, a checkpoint write that never finished", tmp)

    def write(
        self,
        snap: Snapshot,
        specs_json: str,
        running: bool,
        still: Callable[[], bool] | None = None,
        uncommitted: bool = False,
    ) -> bool:
        """Write `snap` whole; False (nothing changed) if `still()`, asked just before the rename over
        the last checkpoint, says it no longer may: a process frozen mid-write (SIGSTOP, a stalled VM)
        must not finish it on waking, since the group's other members may have read on from the last.
        `uncommitted`: stopped, but the group's commit (as far as this worker knows) does not reach
        what it counted (the broker was away at its hand-over): the group reads on from this file."""
        meta = {
            "version": VERSION, "uri": self.uri, "histograms": specs_json, "running": running,
            "uncommitted": bool(uncommitted), "written_at": time.time(), "seq": self.written + 1,
            "counters": {"events": snap.events, "messages": snap.messages, "bad_messages": snap.bad_messages,
                         "dropped_messages": snap.dropped_messages, "pulses": snap.pulses, "elapsed": snap.elapsed},
            "offsets": [[t, p, a, b] for (t, p), (a, b) in sorted(snap.offsets.items())],
            "ranges": [[t, p, r] for (t, p), r in sorted(snap.ranges.items())], "recounted": snap.recounted,
        }  # fmt: skip
        arrays = {f"counts/{name}": c for name, c in snap.counts.items() if not snap.specs[name].window}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
                f.flush()
                os.fsync(f.fileno())
            if still is not None and not still():
                with_suppress_unlink(tmp)
                return False
            os.replace(tmp, self.path)
            dirfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
        except BaseException:
            with_suppress_unlink(tmp)
            raise
        self.written += 1
        return True

    def read(self) -> dict[str, Any] | None:
        """The checkpoint, or None if there is none; a damaged one is set aside and named."""
        if not self.path.exists():
            return None
        try:
            with np.load(self.path) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                counts = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("counts/")}
        except Exception as exc:  # truncated, not a zip, not ours: never block the start
            bad = self.path.with_suffix(".damaged")
            os.replace(self.path, bad)
            log.error(
                "checkpoint %s unreadable (%s): moved to %s, starting from the group's commits",
                self.path,
                exc,
                bad,
            )
            return None
        meta["counts"] = counts
        meta["offsets"] = {(t, int(p)): (int(a), int(b)) for t, p, a, b in meta.get("offsets", [])}
        meta["ranges"] = {(t, int(p)): [[int(a), int(b)] for a, b in r] for t, p, r in meta.get("ranges", [])}
        self.written = int(meta.get("seq", 0))
        return meta


def with_suppress_unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
