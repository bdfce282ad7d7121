"""JSON lines sink: one object per record, arrays as lists, valid for `json.loads` line by line.

    {"record": "start", "title": ..., "scan_number": ..., "columns": [...], "metadata": {...}}
    {"record": "point", "index": 0, "time": 0.1, "values": {"mot01": 0.0, "tof": [...]}}
    {"record": "histogram", "name": "tof", "counts": [...], "edges": [...], ...}
    {"record": "end", "status": "ok", ...}
    {"record": "custom", "scan_number": ..., "name": ..., "value": ...}   (added after the end)

NaN and infinities have no JSON form: they are written as null and their column names are
listed in the record's "nonfinite". `publish="tcp://*:5556"` also sends every line on a
ZeroMQ PUB socket (live GUIs); `jsonl+pub://tcp://HOST:PORT` does only that.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os

import numpy as np
from livehist.recorders.base import RecorderError, Sink, TextAppender
from livehist.recorders.records import Histogram, Point, ScanEnd, ScanStart


def plain(value, nonfinite: list, where: str):
    """JSON-able copy; non-finite floats become None and are noted in `nonfinite`."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            nonfinite.append(where)
            return [plain(v, [], where) for v in value.tolist()]
        return value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        nonfinite.append(where)
        return None
    if isinstance(value, dict):
        return {str(k): plain(v, nonfinite, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v, nonfinite, where) for v in value]
    return value


def _own_file(path: str) -> bool:
    """Empty, not a regular file (a pipe), or a JSON lines file of records: one we may append to.
    A user's own text (notes.jsonl) got scans appended after its lines."""
    if not os.path.isfile(path):
        return True
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 20)
    except OSError:
        return True  # the write will say what is wrong
    if not first.strip():
        return os.path.getsize(path) == 0
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and "record" in record


LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}  # escaped in a JSON string


class JsonLinesSink(Sink):
    extensions = ("jsonl", "ndjson")
    schemes = ("jsonl+pub",)

    def __init__(self, target: str, publish: str | None = None, **options) -> None:
        super().__init__(target, **options)
        self.publish = publish
        if target.startswith("jsonl+pub://"):
            self.publish, self.path = target.split("://", 1)[1], None
        else:
            self.path = target
        self.f = None
        self.pub = None

    def prepare(self, start: ScanStart) -> None:
        if self.path is not None:
            self.created = not os.path.exists(self.path)
            fd = None
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o664)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self.created = False  # another writer's file
                raise RecorderError(f"{self.path} is locked by another writer; use another file") from None
            except OSError as exc:
                raise RecorderError(f"cannot open {self.path} for writing: {exc.strerror}") from None
            if not self.created and not _own_file(self.path):
                os.close(fd)
                raise RecorderError(
                    f"{self.path} exists and is not a livehist JSON lines file (its first line is no "
                    '{"record": ...} object); give a new file name (livehist appends only to its own files)'
                )
            self.f = TextAppender(fd, self.path)
        if self.publish:
            import zmq

            self.pub = zmq.Context.instance().socket(zmq.PUB)
            self.pub.setsockopt(zmq.SNDHWM, 1000)  # a slow GUI loses lines, the scan goes on
            self.pub.setsockopt(zmq.LINGER, 0)
            try:
                self.pub.bind(self.publish)
            except zmq.ZMQError as exc:
                raise RecorderError(f"cannot publish JSON lines on {self.publish}: {exc}") from None

    def _emit(self, obj: dict) -> None:
        nonfinite: list[str] = []
        obj = plain(obj, nonfinite, "")
        if nonfinite:
            obj["nonfinite"] = sorted(set(nonfinite))
        # JSON leaves NEL and the Unicode line and paragraph separators as they are: a reader
        # splitting lines as Python's str.splitlines() does broke a record at them
        line = json.dumps(obj, allow_nan=False, ensure_ascii=False).translate(LINE_BREAKS)
        if self.f is not None:
            self.f.write(line + "\n")  # whole or not at all
        if self.pub is not None:
            import zmq

            try:
                self.pub.send_string(line, flags=zmq.NOBLOCK)
            except zmq.Again:
                pass

    def start(self, record: ScanStart) -> None:
        self.scan_number = record.scan_number
        d = dataclasses.asdict(record)
        self._emit({"record": "start", **d})

    def point(self, record: Point) -> None:
        self._emit({"record": "point", "index": record.index, "time": record.time, "values": record.values})

    def histogram(self, record: Histogram) -> None:
        self._emit({"record": "histogram", **dataclasses.asdict(record)})

    def end(self, record: ScanEnd) -> None:
        self._emit({"record": "end", **dataclasses.asdict(record)})

    def add_custom(self, name: str, value) -> None:
        """A record of its own after the scan's end: {"record": "custom", "scan_number", "name", "value"}."""
        if self.path is None or getattr(self, "scan_number", None) is None:
            raise RecorderError(f"{self} has no file to add {name!r} to")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RecorderError(f"{self.path} is being written by another scan; {name!r} not added") from None
        except OSError as exc:
            raise RecorderError(f"cannot append {name!r} to {self.path}: {exc.strerror}") from None
        self.f = TextAppender(fd, self.path)
        try:
            self._emit({"record": "custom", "scan_number": self.scan_number, "name": name, "value": value})
        finally:
            self.close()

    def discard(self) -> None:
        path = self.path
        if getattr(self, "created", False) and path and os.path.isfile(path) and os.path.getsize(path) == 0:
            os.unlink(path)

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        if self.pub is not None:
            self.pub.close(0)
            self.pub = None
