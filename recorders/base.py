"""Sinks, the fan-out Recorder, sink discovery and the data folder policy.

A sink is one small class with one method per record kind (after Bluesky's suitcases).
`open_sink("scan.nxs")`, `open_sink("sps://livehist")` or `open_sink("scan.jsonl")` finds
it by URI scheme or file extension among the entry points of group `livehist.recorders`,
so a third-party package adds a format without touching livehist:

    [options.entry_points]  /  setup(entry_points=...)
    livehist.recorders =
        csv = mypackage.sinks:CsvSink      # the name is the extension (or URI scheme)

A `Recorder` feeds one record stream to several sinks. Every sink checks its target
before anything is written (`prepare`), so a bad path fails the scan at its start; later,
a sink that fails is closed and dropped with its error kept, and the others go on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path

from livehist.recorders.records import Histogram, Point, RecordError, ScanEnd, ScanStart

from livehist.components.metadata import make_folder
from livehist.errors import LivehistError

log = logging.getLogger("livehist.recorders")
GROUP = "livehist.recorders"


class RecorderError(LivehistError):
    """A sink cannot record (bad target, unknown format, write failure); names the fix."""


class TextAppender:
    """A text file a sink appends whole lines to, opened O_APPEND: each `write` is whole or not
    at all. A write that fails (a full disk) is cut back to the file's size before it, so a
    reader never finds a torn line that passes for a record; the error goes on to the Recorder.
    A file that did not end with a newline gets one first (no record glued to another's end)."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        size = os.fstat(fd).st_size
        self.size = size
        self._newline = False
        if size:
            try:
                with open(path, "rb") as f:
                    f.seek(size - 1)
                    self._newline = f.read(1) != b"\n"
            except OSError:
                pass

    def write(self, text: str) -> None:
        data = ("\n" if self._newline else "").encode() + text.encode("utf-8", "replace")
        before = os.fstat(self.fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError:
            try:
                os.ftruncate(self.fd, before)  # no torn line left behind
            except OSError as exc:
                log.error("cutting %s back after a failed write: %s", self.fd, exc)
            raise
        self._newline = False
        self.size = before + len(data)

    def close(self) -> None:
        os.close(self.fd)


class Sink:
    """One output. Subclasses set `extensions` and/or `schemes` and implement the four methods."""

    extensions: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ()

    def __init__(self, target: str, **options) -> None:
        self.target = target
        self.options = options

    def prepare(self, start: ScanStart) -> None:
        """Check the target now (writable, not locked...); raise RecorderError naming the fix."""

    def start(self, record: ScanStart) -> None:
        raise NotImplementedError

    def point(self, record: Point) -> None:
        raise NotImplementedError

    def histogram(self, record: Histogram) -> None:
        raise NotImplementedError

    def end(self, record: ScanEnd) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release files and resources; called once, also after a failure."""

    def add_custom(self, name: str, value) -> None:
        """After `end`: data a macro adds once the scan has ended (Sardana's addCustomData after
        the scan loop), appended to this scan's record. Sinks that cannot say so refuse."""
        raise RecorderError(f"{self} cannot add custom data after the scan ended; {name!r} not recorded")

    def discard(self) -> None:
        """The scan did not start (this or another sink refused it): remove what `prepare` created."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"


def sink_classes() -> dict[str, type[Sink]]:
    """Every registered sink, by entry point name (an extension or a URI scheme). A plug-in naming
    an extension or scheme livehist has (nxs, spec, ...) is refused with a warning: which one won
    went by the order of installation, without a word, and files changed format."""
    out, owner = {}, {}
    for ep in entry_points(group=GROUP):
        key, dist = ep.name.lower(), getattr(ep.dist, "name", None) or "?"
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plug-in must not hide the others
            log.error("recorder plug-in %s (%s) cannot be loaded: %s", ep.name, ep.value, exc)
            continue
        if key in out and out[key] is not cls:
            ours, theirs = (dist, owner[key]) if dist == "livehist" else (owner[key], dist)
            log.warning("recorder plug-in %r of %s is not used: %s has %r already; give the plug-in an extension "
                        "or scheme of its own", key, theirs, ours, key)  # fmt: skip
            if dist != "livehist":
                continue
        out[key], owner[key] = cls, dist
    return out


def open_sink(target: str | os.PathLike, **options) -> Sink:
    target = os.fspath(target)
    classes = sink_classes()
    if "://" in target:
        key = target.split("://", 1)[0].lower()
    else:
        key = "".join(Path(target).suffixes[-1:]).lstrip(".").lower()
    cls = classes.get(key)
    if cls is None:
        known = ", ".join(sorted(classes))
        raise RecorderError(
            f"no recorder for {target!r} ({'scheme' if '://' in target else 'extension'} {key!r}); "
            f"known: {known}; a package can add one through the entry point group {GROUP!r}"
        )
    return cls(target, **options)


class DataPolicy:
    """Where files go: under `root`, at `pattern` (e.g. "{proposal}/{dataset}"), created with
    `group` and `mode` so users read what a service account writes."""

    def __init__(
        self, root: str | os.PathLike, pattern: str = "", group: str = "", mode: int = 0o2775
    ) -> None:
        self.root = Path(root).resolve()
        self.pattern, self.group, self.mode = pattern, group, mode

    def path(self, name: str | os.PathLike, fields: dict | None = None) -> Path:
        """The file for `name` (relative to root/pattern); refuse anything that leaves the root."""
        name = os.fspath(name)
        if ".." in Path(name).parts:
            raise RecorderError(f"file name {name!r} contains '..'; give a name inside {self.root}")
        try:
            sub = self.pattern.format(**(fields or {})) if self.pattern else ""
        except KeyError as exc:
            raise RecorderError(
                f"data folder pattern {self.pattern!r} needs {exc} (from the metadata)"
            ) from None
        folder = (self.root / sub).resolve()
        path = (folder / name).resolve()
        if self.root != path and self.root not in path.parents:
            raise RecorderError(f"{name!r} resolves to {path}, outside the data root {self.root}")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            make_folder(path.parent, self.root, self.group, self.mode)
        except LivehistError as exc:
            raise RecorderError(str(exc)) from None
        return path


class Recorder:
    """Feed one record stream to several sinks; a failing sink never stops the others."""

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks = list(sinks)
        self.errors: dict[str, str] = {}  # sink repr -> error, for sinks dropped mid-scan
        self.points: dict[str, int] = {}  # sink repr -> points it took before it was dropped (or in all)
        self._start: ScanStart | None = None

    def start(self, record: ScanStart) -> None:
        if self._start is not None:  # refused before any sink is touched: the open scan goes on
            raise RecordError(
                f"scan {self._start.scan_number} is still open; end it before starting scan {record.scan_number}"
            )
        problems = []
        for sink in self.sinks:
            try:
                sink.prepare(record)
            except Exception as exc:
                problems.append(f"{sink}: {exc}")
        if problems:
            for sink in self.sinks:
                self._close(sink)
                try:
                    sink.discard()  # no empty file is left behind by a scan that never started
                except Exception as exc:
                    log.error("discarding %s: %s", sink, exc)
            raise RecorderError("cannot record this scan: " + "; ".join(problems))
        self._start = record
        self.points = {repr(s): 0 for s in self.sinks}
        self._each("start", record)

    def point(self, record: Point) -> None:
        if self._start is None:
            raise RecordError("point before scan start")
        self._each("point", record.checked(self._start))
        for sink in self.sinks:
            self.points[repr(sink)] += 1

    def histogram(self, record: Histogram) -> None:
        if self._start is None:
            raise RecordError("histogram before scan start")
        self._each("histogram", record.checked(self._start))

    def end(self, record: ScanEnd) -> None:
        if self._start is None:
            raise RecordError("no scan is open: end() comes once, after start()")
        try:
            self._each("end", record)
        finally:
            for sink in self.sinks:
                self._close(sink)
            self._start = None

    @property
    def recorded(self) -> list[str]:
        """Targets of the sinks still recording (none of them failed so far)."""
        return [s.target for s in self.sinks]

    def _each(self, method: str, record) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(record)
            except Exception as exc:
                where = "at scan start" if method == "start" else f"in {method}"
                self.errors[repr(sink)] = f"{type(exc).__name__} {where}: {exc}"
                if isinstance(
                    getattr(sink, "written", None), int
                ):  # a sink that buffers: what is in its file
                    self.points[repr(sink)] = sink.written
                log.error("recorder %s failed in %s, dropped for the rest of the scan: %s", sink, method, exc)
                self.sinks.remove(sink)
                self._close(sink)
                if method == "start":  # nothing of this scan is in it: leave no empty file
                    try:
                        sink.discard()
                    except Exception as exc2:
                        log.error("discarding %s: %s", sink, exc2)

    @staticmethod
    def _close(sink: Sink) -> None:
        try:
            sink.close()
        except Exception as exc:
            log.error("closing %s: %s", sink, exc)
