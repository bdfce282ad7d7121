"""livehist's recorders for Sardana; this folder is the MacroServer's RecorderPath.

- LivehistRecorder: one file of ScanFile through livehist's sinks, chosen by extension
  (.nxs NeXus, .spec SPEC, .jsonl JSON lines). The default configuration sets
  `ScanRecorder` to it, because Sardana's SPEC_FileRecorder also claims `.spec`; Sardana's
  recorders work as before when named in `ScanRecorder`.
- SPSRecorder: replaces Sardana's shared-memory recorder of the same name (a RecorderPath
  module wins over the built-in), so `senv SharedMemory sps` feeds livehist's SPS sink.

Both take the metadata of the MetadataManager named by the `LivehistMetadata` environment
variable (default livehist/metadata/1) at scan start.
"""

import copy
import json
import os
import re
import threading
import weakref

from livehist.recorders.base import Recorder, RecorderError, open_sink
from livehist.recorders.records import RecordError, ScanEnd
from livehist.recorders.sardana_adapter import ScanMapping, safe_name
from sardana.macroserver.scan.recorder.datarecorder import DataRecorder
from sardana.macroserver.scan.recorder.storage import BaseFileRecorder

from livehist import __version__
from livehist.errors import tango_text

METADATA_DEVICE = "livehist/metadata/1"
HISTOGRAMMER = "livehist/histogrammer/1"


def _env(macro, name, default=None):
    try:
        return macro.getEnv(name)
    except Exception:  # UnknownEnv and friends
        return default


METADATA_WAIT = 4.0  # seconds a scan start waits for the MetadataManager


def _metadata(macro, recordlist=None) -> dict:
    """The MetadataManager's snapshot, fetched once per scan for all its files; a scan goes on
    without it, with one warning. A hung device (a stopped server) held each file's start for
    12 s (36 s for .nxs, .spec and .jsonl): the wait is bounded to METADATA_WAIT."""
    if macro is None:
        return {}
    cache = recordlist.__dict__ if recordlist is not None else {}
    if "_livehist_metadata" in cache:
        return copy.deepcopy(cache["_livehist_metadata"])
    device = _env(macro, "LivehistMetadata", METADATA_DEVICE)
    result = {}

    def fetch():
        import tango

        try:
            proxy = tango.DeviceProxy(device)
            proxy.set_timeout_millis(2000)
            result["metadata"] = json.loads(proxy.GetMetadata())
        except Exception as exc:  # a DevFailed says why (a FAULT's Status): 'DevFailed' alone did not
            args = getattr(exc, "args", None)
            desc = getattr(args[0], "desc", "") if args else ""
            result["error"] = (
                f"{exc.__class__.__name__}: {' '.join(str(desc).split())}" if desc else exc.__class__.__name__
            )

    worker = threading.Thread(target=fetch, name="livehist-metadata", daemon=True)
    worker.start()
    worker.join(METADATA_WAIT)
    if "metadata" not in result:
        why = result.get("error", f"no answer within {METADATA_WAIT:g} s")
        macro.warning(f"livehist: no metadata from {device} ({why}); files carry none")
    cache["_livehist_metadata"] = result.get("metadata", {})
    return copy.deepcopy(cache["_livehist_metadata"])


def _once(recordlist, key: str, fn, wait: float = 4.0):
    """`fn()` once per scan (shared by the scan's files), given at most `wait` seconds (a hung
    device must not hold each file's start or end for Tango's 12 s); None if it did not answer."""
    cache = recordlist.__dict__ if recordlist is not None else {}
    if key not in cache:
        result = {}
        worker = threading.Thread(target=lambda: result.setdefault("value", fn()), daemon=True)
        worker.start()
        worker.join(wait)
        cache[key] = result.get("value")
    return cache[key]


def _histogram_watch(macro, env) -> dict | None:
    """The histograms this scan's spectrum and image channels read (axis attribute `Histogram`
    of livehist's controllers) and the histogrammer's HistogramConfig now, to tell at the end
    whether a Configure changed their binning part way (the points then mix two binnings)."""
    import tango

    columns = {}
    for dd in env.get("datadesc") or []:
        if not getattr(dd, "shape", None) or "/" not in str(dd.name):
            continue
        try:
            channel = tango.DeviceProxy(str(dd.name))
            channel.set_timeout_millis(1000)
            columns[safe_name(dd.label)] = str(channel.read_attribute("Histogram").value)
        except Exception:  # not a livehist channel
            continue
    if not columns:
        return None
    device = _env(macro, "LivehistHistogrammer", HISTOGRAMMER)
    try:
        proxy = tango.DeviceProxy(device)
        proxy.set_timeout_millis(2000)
        return {"device": device, "columns": columns, "config": proxy.HistogramConfig}
    except Exception:
        return None


def _reconfigured_columns(watch: dict | None) -> dict[str, str]:
    """Column -> why, for the watched histograms whose binning changed since the scan started."""
    if not watch:
        return {}
    import tango

    from livehist.components.capture import reconfigured

    try:
        proxy = tango.DeviceProxy(watch["device"])
        proxy.set_timeout_millis(2000)
        changed = set(reconfigured(watch["config"], proxy.HistogramConfig))
    except Exception:  # the device is gone: the channels' reads said so already
        return {}
    return {col: (f"{col}: histogram {name} of {watch['device']} was reconfigured during the scan "
                  "(Configure): its points before and after hold different binnings")
            for col, name in watch["columns"].items() if name in changed}  # fmt: skip


def _macro_of(recordlist):
    """A weak reference to the scan's macro, from a recorder that has it (Sardana's output
    recorder always does): the shared-memory recorder gets none, so SPS carried no metadata."""
    for other in getattr(getattr(recordlist, "datahandler", None), "recorders", None) or []:
        for ref in (getattr(other, "macro", None), getattr(other, "_stream", None)):
            try:
                macro = ref() if callable(ref) else None
            except TypeError:
                continue
            if macro is not None and hasattr(macro, "getEnv"):
                return weakref.ref(macro)
    return None


class _Adapter:
    """Shared by both recorders: Sardana record list -> livehist Recorder over some sinks."""

    def _macro(self):
        return self.macro() if self.macro is not None else None

    def _warn(self, msg):
        macro = self._macro()
        if macro is not None:
            macro.warning(tango_text(f"livehist: {msg}"))  # the Door's output is Latin-1

    def _open(self, recordlist, targets):
        env = recordlist.getEnviron()
        self.mapping = ScanMapping(self._warn)
        config = {"ScanFile": env.get("ScanFile"), "ScanDir": env.get("ScanDir"),
                  "recorder": type(self).__name__, "livehist": __version__}  # fmt: skip
        self._ended = None  # custom data added after the end goes to the scan that ended last
        try:  # a unit or metadata no file can hold: refused for every file, named
            start = self.mapping.start(env, _metadata(self._macro(), recordlist), config)
        except RecordError as exc:
            self.recorder = None
            self._fail_siblings(recordlist, str(exc))
            raise RuntimeError(tango_text(f"livehist: cannot record this scan: {exc}")) from None
        macro = self._macro()
        self._watch = _once(recordlist, "_livehist_watch", lambda: _histogram_watch(macro, env))
        try:
            self.recorder = Recorder([open_sink(t) for t in targets])
            self.recorder.start(start)  # a bad target fails here, before the scan moves anything
        except RecorderError as exc:
            self.recorder = None
            self._fail_siblings(recordlist, str(exc))
            raise RuntimeError(tango_text(f"livehist: {exc}")) from None
        self._reported = set()
        if self.recorder.errors and not self.recorder.sinks:  # failed while starting: nothing written
            errors = "; ".join(f"{k}: {v}" for k, v in self.recorder.errors.items())
            self.recorder = None
            self._fail_siblings(recordlist, errors)
            raise RuntimeError(tango_text(f"livehist: cannot record this scan: {errors}"))

    def _fail_siblings(self, recordlist, why):
        """Sardana ends no recorder when one fails to start: end those of ours already started."""
        handler = getattr(recordlist, "datahandler", None)
        for other in list(getattr(handler, "recorders", None) or []):
            if (
                other is not self
                and isinstance(other, _Adapter)
                and getattr(other, "recorder", None) is not None
            ):
                recorder, other.recorder = other.recorder, None
                recorder.end(ScanEnd("failed", reason=f"the scan did not start: {why}"))

    def _write(self, record):
        if self.recorder is None:
            return
        try:
            self.recorder.point(self.mapping.point(record))
        except RecordError as exc:
            self.mapping.dropped.append(str(exc))
            self._warn(f"point {record.recordno} not recorded: {exc}")
        for sink, error in self.recorder.errors.items():
            if sink not in self._reported:
                self._reported.add(sink)
                n = self.recorder.points.get(sink, 0)
                kept = f"the {n} points before it are kept" if n else "no point of this scan is in it"
                self._warn(f"{sink} stopped recording: {error} ({kept})")

    def _close(self, recordlist):
        if self.recorder is not None:
            watch = getattr(self, "_watch", None)
            changed = _once(recordlist, "_livehist_reconfigured", lambda: _reconfigured_columns(watch)) or {}
            for col, why in changed.items():
                if col not in self.mapping.changed:
                    self.mapping.changed[col] = why
                    warned = recordlist.__dict__.setdefault("_livehist_warned", set())
                    if why not in warned:  # once, not once per file of the scan
                        warned.add(why)
                        self._warn(why)
            self.recorder.end(self.mapping.end(recordlist.getEnviron()))
            self._ended, self.recorder = self.recorder, None


class LivehistRecorder(_Adapter, BaseFileRecorder):
    """NeXus (.nxs), SPEC (.spec) and JSON lines (.jsonl) through livehist's sinks."""

    formats = {"nxs": ".nxs", "spec": ".spec", "jsonl": ".jsonl"}

    def __init__(self, filename=None, macro=None, **pars):
        BaseFileRecorder.__init__(self, **pars)
        self.macro = weakref.ref(macro) if macro is not None else None
        self.filename = filename
        self.recorder = None

    def getFormat(self):
        return os.path.splitext(self.filename or "")[1].lstrip(".") or "nxs"

    def getFileName(self):
        # only shown ("Operation will be saved in ...") in the Door's Output, which is Latin-1: a
        # name beyond it (ScanDir under a DataRoot /data/实验) failed every scan with UnicodeError
        return tango_text(self.filename) if self.filename else self.filename

    def _startRecordList(self, recordlist):
        if not self.filename:
            return
        handler = getattr(recordlist, "datahandler", None)
        for other in getattr(handler, "recorders", None) or []:
            if other is self:
                break
            if (
                isinstance(other, LivehistRecorder)
                and other.filename
                and (os.path.realpath(other.filename) == os.path.realpath(self.filename))
            ):  # the same file twice in ScanFile: the scan was refused as if another Door wrote it
                self.recorder, self._ended = None, None
                self._warn(f"{self.filename} is listed twice in ScanFile: recorded once")
                return
        folder = os.path.dirname(self.filename)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise RuntimeError(f"livehist: ScanDir {folder} cannot be created: {exc.strerror}; "
                               "senv ScanDir to a writable folder") from None  # fmt: skip
        self._open(recordlist, [self.filename])

    def _writeRecord(self, record):
        self._write(record)

    def _endRecordList(self, recordlist):
        self._close(recordlist)

    def _addCustomData(self, value, name, **kwargs):
        if self.recorder is not None:
            self.mapping.add_custom(value, name)
            return
        # Sardana's scan macros add custom data after the scan loop, when the record list has
        # ended (its example ascan_with_addcustomdata, ascanct_midtrigger): appended to the
        # scan's files as Sardana's own recorders do; it was dropped without a word
        ended = getattr(self, "_ended", None)
        if ended is None or not ended.sinks:
            self._warn(f"custom data {name!r} not recorded in {self.filename}: no scan of it was recorded")
            return
        for sink in ended.sinks:
            try:
                sink.add_custom(safe_name(name), value)
            except Exception as exc:
                self._warn(f"custom data {name!r} not recorded: {exc}")


class SPSRecorder(_Adapter, DataRecorder):
    """`senv SharedMemory sps`: livehist's SPS sink, named after the Door (sps://door_x_1)."""

    def __init__(self, program=None, array=None, shape=None, macro=None, **pars):
        DataRecorder.__init__(self, **pars)
        self.macro = None
        # Sardana asks for one 0D and one 1D shared-memory recorder; livehist's sink holds both
        self.active = not str(array or "").upper().endswith("_1D")
        self.name = re.sub(r"[^A-Za-z0-9_]", "_", str(program or "livehist")).strip("_")[:32] or "livehist"
        self.recorder = None

    def _startRecordList(self, recordlist):
        if self.active:
            if self.macro is None:  # Sardana makes shared-memory recorders without their macro
                self.macro = _macro_of(recordlist)
            self._open(recordlist, [f"sps://{self.name}"])

    def _writeRecord(self, record):
        self._write(record)

    def _endRecordList(self, recordlist):
        self._close(recordlist)
