"""livehist macros for spock; this folder is the MacroServer's MacroPath.

Histogrammer: histo_start, histo_stop, histo_reset, histo_count SECONDS
Metadata:     meta_set KEY VALUE, meta_show, dataset_start NAME, dataset_end
Scans:        livehist_check (a pre-scan general hook: fails a scan before any motion when
              a histogrammer of the active measurement group is down, in FAULT or acquiring,
              or when ScanDir is the folder of a closed dataset)
Counts:       ct, Sardana's own, except that `ct 0` on livehist channels is refused (Sardana then
              acquires nothing and shows the last values, those of an earlier count)

The devices are named by the environment variables LivehistHistogrammer (default
livehist/histogrammer/1) and LivehistMetadata (default livehist/metadata/1).

Text beyond Latin-1: spock sends macro arguments as Latin-1 (Tango strings), so type
such characters as escapes, which meta_set turns into the character:
    meta_set sample.name \u03b1-Fe2O3        (alpha-Fe2O3)
    meta_set sample.name "\N{GREEK SMALL LETTER BETA}-Ga2O3"
    meta_set users "Anton\u00edn Dvo\u0159\u00e1k (PI)"   (\\ for one backslash)
Latin-1 letters (é, ö, µ, °, Å) can be typed as they are. Output shows such characters
as the same escapes; GetMetadata (JSON) is exact.
"""

import json
import math
import os
import threading
import time

import tango
from sardana.macroserver.macro import Macro, Type
from sardana.macroserver.macros.standard import ct as _SardanaCt
from sardana.macroserver.msexception import AbortException, ReleaseException

from livehist.components.metadata import STRING_KEYS, canonical_key
from livehist.errors import LivehistError, from_tango_text, tango_text

HISTOGRAMMER, METADATA = "livehist/histogrammer/1", "livehist/metadata/1"
SCANDIR_BEFORE = "_LivehistScanDirBeforeDataset"  # ScanDir when dataset_start ran
# Doors of one MacroServer share its ScanID: two histo_counts ending together (one stops the other)
# both took ScanID + 1, and one failed on the NeXus file the other was writing
_NUMBERS = threading.Lock()
_IN_FLIGHT: set[tuple[int, int]] = set()  # (id of the MacroServer, scan number) being recorded
_WRITING = threading.Lock()  # histo_count records one at a time in this MacroServer


def _refuse_a_closed_dataset(folder) -> None:
    """A folder holding dataset.json is a dataset that was closed (EndDataset wrote its summary, and
    its name cannot be opened again): files recorded there would be in no dataset summary."""
    summary = os.path.join(folder, "dataset.json")
    if not os.path.isfile(summary):
        return
    try:
        with open(summary, encoding="utf-8") as f:
            written = json.load(f)
    except (OSError, ValueError):
        return  # not a summary EndDataset wrote: another program's file
    if not (isinstance(written, dict) and {"dataset", "files", "metadata"} <= written.keys()):
        return
    name = str(written["dataset"])
    raise RuntimeError(tango_text(f"ScanDir {folder} is the folder of dataset {name!r}, closed (its dataset.json "
                                  "is written): what is recorded there now would be in no dataset summary; "
                                  "dataset_start a new dataset or senv ScanDir to another folder"))  # fmt: skip


class _Livehist:
    """Device access shared by the macros, with errors a spock user can act on."""

    def _env(self, name, default):
        try:
            return self.getEnv(name)
        except Exception:
            return default

    def _device(self, env_name, default, kind, commands):
        name = self._env(env_name, default)
        try:
            proxy = tango.DeviceProxy(name)
            proxy.set_timeout_millis(10_000)
            proxy.ping()
            missing = sorted(set(commands) - {c.cmd_name for c in proxy.command_list_query()})
        except tango.DevFailed as exc:
            raise RuntimeError(f"{name} does not answer ({exc.args[0].desc.strip()}); "
                               f"start it with `livehist up` or set {env_name}") from None  # fmt: skip
        if missing:  # another kind of device: its errors would be 'AttributeError: Start'
            try:
                what = f"a {proxy.info().dev_class}"
            except tango.DevFailed:
                what = "another kind of device"
            raise RuntimeError(f"{name} is not {kind}: it is {what}, without {', '.join(missing)}; "
                               f"senv {env_name} to one, e.g. senv {env_name} {default}")  # fmt: skip
        return proxy

    def histogrammer(self):
        return self._device("LivehistHistogrammer", HISTOGRAMMER, "a histogrammer (EventHistogrammer or HistogramSum)",
                            ("Start", "Stop", "Reset", "Configure"))  # fmt: skip

    def metadata_device(self):
        return self._device("LivehistMetadata", METADATA, "a MetadataManager",
                            ("SetMetadata", "GetMetadata", "StartDataset", "EndDataset"))  # fmt: skip

    def call(self, fn, *args):
        """Run a device call; show its DevFailed reason (the device's own message) plainly."""
        try:
            return fn(*args)
        except tango.DevFailed as exc:
            raise RuntimeError(exc.args[0].desc.strip()) from None

    def counting_for_another(self, h) -> str:
        """What a device acquiring with a preset is counting for someone else (a histo_count, ct or
        scan point of another Door), for a refusal; '' when it is not (acquiring without a preset
        is histo_start's)."""
        if h.state() not in (tango.DevState.RUNNING, tango.DevState.ALARM):
            return ""
        presets = {a.name: a.value for a in h.read_attributes(["PresetTime", "PresetEvents"]) if a.value}
        if not presets:
            return ""
        shown = ", ".join(f"{k} {v:g}" for k, v in presets.items())
        return (f"{h.dev_name()} is acquiring ({shown}, {h.EventCount:,} events since its Reset: a histo_count, "
                "ct or scan of another Door?)")  # fmt: skip

    def write(self, h, values):
        """Write attributes one by one: a refused write_attributes says only 'Failed to execute
        DeviceProxy::write_attributes', not the device's reason ('presets cannot change while RUNNING')."""
        for name, value in values:
            self.call(h.write_attribute, name, value)

    def counters_line(self, h):
        values = {a.name: a.value for a in h.read_attributes(["EventCount", "EventRate", "ElapsedTime",
                                                              "DroppedMessageCount"])}  # fmt: skip
        return (f"{values['ElapsedTime']:8.2f} s  {values['EventRate']:10.4g} events/s  "
                f"{values['EventCount']:>14,} events  {values['DroppedMessageCount']} dropped")  # fmt: skip


class histo_start(Macro, _Livehist):
    """Start accumulating on the EventHistogrammer; it runs until histo_stop (presets left by
    the last histo_count, ct or scan are cleared)."""

    def run(self):
        h = self.histogrammer()
        busy = self.counting_for_another(h)  # it is not ours to end
        if busy:
            raise RuntimeError(f"{busy}; let it end, or histo_stop first")
        left = {a.name: a.value for a in h.read_attributes(["PresetTime", "PresetEvents"]) if a.value}
        if h.state() in (tango.DevState.RUNNING, tango.DevState.ALARM):
            self.output(f"{h.dev_name()}: already acquiring (since an earlier histo_start?); it runs until "
                        "histo_stop")  # fmt: skip
            return
        # presets are what the last histo_count, ct or scan left behind: kept, they stopped this
        # acquisition after that count's time (0.1 s after an ascan ... 0.1) without a word
        if left:
            self.write(h, [("PresetTime", 0.0), ("PresetEvents", 0)])
        self.call(h.Start)
        self.output(f"{h.dev_name()}: {h.state()} from {h.EventSourceURI}")
        if left:
            shown = ", ".join(f"{k} {v:g}" for k, v in left.items())
            self.output(f"  presets of the last count cleared ({shown}): it runs until histo_stop")


class histo_stop(Macro, _Livehist):
    """Stop accumulating; what is in the histograms stays."""

    def run(self):
        h = self.histogrammer()
        self.call(h.Stop)
        self.output(f"{h.dev_name()}: {h.state()}  " + self.counters_line(h))


class histo_reset(Macro, _Livehist):
    """Clear every histogram and counter of the EventHistogrammer."""

    def run(self):
        h = self.histogrammer()
        busy = self.counting_for_another(h)  # a Reset now would cut that count short
        if busy:
            raise RuntimeError(f"{busy}; let it end, or histo_stop first")
        self.call(h.Reset)
        self.output(f"{h.dev_name()}: histograms and counters cleared ({h.state()})")


class histo_count(Macro, _Livehist):
    """Acquire for SECONDS, then record every histogram with the metadata to the scan files
    (ScanDir/ScanFile: .nxs, .spec, .jsonl) as a scan of its own."""

    param_def = [["seconds", Type.Float, None, "acquisition time in seconds (> 0)"]]

    def prepare(self, seconds):
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ValueError(f"seconds must be > 0 and finite, got {seconds}; e.g. histo_count 10")
        self.targets = self._targets()  # refused before the device is touched: nothing cleared
        self._scan_id()  # likewise: an unusable ScanID failed only after the whole count
        self.h = self.histogrammer()
        busy = self.counting_for_another(self.h)  # stopping it would cut that count short
        if busy:
            raise RuntimeError(f"{busy}; let it end, or histo_stop first")
        self._try_files(self.h)

    def _try_files(self, h) -> None:
        """Open each file as its sink will at the end, and leave it as it was: a foreign or locked
        file, or a histogram NeXus cannot hold, was found only after the whole count."""
        from livehist.recorders.records import HistogramDecl, RecordError, ScanStart

        try:
            names = [spec["name"] for spec in json.loads(h.HistogramConfig)]
        except (tango.DevFailed, ValueError, KeyError, TypeError):
            return  # judged when recording
        try:
            start = ScanStart("histo_count", 0, [], histograms=[HistogramDecl(n, (1,)) for n in names])
        except RecordError as exc:
            raise RuntimeError(tango_text(f"histograms not recorded: {exc}; nothing was counted")) from None
        problems: list[str] = []
        while not _WRITING.acquire(timeout=0.2):  # another Door's count is trying or writing them
            self.checkPoint()
        try:
            for target in self.targets:
                if "://" not in str(target):  # shared memory: nothing to find out before
                    self._try_file(target, start, problems)
        finally:
            _WRITING.release()
        if problems:
            raise RuntimeError(
                tango_text(f"histograms not recorded: {'; '.join(problems)}; nothing was counted")
            )

    def _try_file(self, target, start, problems: list[str]) -> None:
        from livehist.recorders.base import open_sink

        try:
            sink = open_sink(target)
        except Exception as exc:
            problems.append(str(exc))
            return
        try:
            sink.prepare(start)
        except Exception as exc:
            problems.append(f"{sink}: {exc}")
        finally:
            for undo in (sink.close, sink.discard):  # as a scan that did not start: nothing left
                try:
                    undo()
                except Exception as exc:
                    self.warning(tango_text(f"{sink}: {exc}"))

    def _scan_id(self) -> int:
        """The last scan's number (ScanID; 0 when unset), or a refusal naming the fix."""
        value = self._env("ScanID", 0)
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = -1
        if number < 0 or isinstance(value, bool):
            raise RuntimeError(tango_text(f"ScanID is {value!r}, not the number of a scan (a whole number >= 0); "
                                          "senv ScanID to the last scan's number (senv ScanID 0 to start again)"))  # fmt: skip
        return number

    def _targets(self):
        """The files (and SPS) this count records to; a ScanDir that cannot be made fails now,
        before the acquisition, not after it."""
        from livehist.recorders.base import sink_classes

        known = tuple(f".{k}" for k in sink_classes() if k.isalnum() and k != "sps")
        scan_dir = self._env("ScanDir", None)
        files = self._env("ScanFile", [])
        files = [files] if isinstance(files, str) else list(files or [])
        skipped = [f for f in files if f and not f.lower().endswith(known)]
        if skipped:
            self.warning(tango_text(f"histo_count records {', '.join(known)} files only; not in "
                                    f"{', '.join(skipped)}"))  # fmt: skip
        targets, seen = [], set()
        for f in files:
            if scan_dir and f and f.lower().endswith(known):
                path = os.path.join(scan_dir, f)
                if os.path.realpath(path) in seen:  # refused the count as if another Door wrote it
                    self.warning(tango_text(f"{path} is listed twice in ScanFile: recorded once"))
                    continue
                seen.add(os.path.realpath(path))
                targets.append(path)
        if targets:
            for folder in sorted({os.path.dirname(t) for t in targets}):
                try:
                    os.makedirs(folder, exist_ok=True)
                except OSError as exc:
                    raise RuntimeError(tango_text(
                        f"ScanDir {folder} cannot be created: {exc.strerror}; senv ScanDir to a writable "
                        "folder")) from None  # fmt: skip
                if not os.access(folder, os.W_OK):
                    raise RuntimeError(tango_text(f"ScanDir {folder} is not writable; senv ScanDir to a "
                                                  "writable folder"))  # fmt: skip
                _refuse_a_closed_dataset(folder)
        if str(self._env("SharedMemory", "")).lower() == "sps":
            targets.append("sps://livehist")
        return targets

    def run(self, seconds):
        h = self.h
        self._seconds, self._phase = seconds, "preparing"  # counting -> recording -> done
        if h.state() in (tango.DevState.RUNNING, tango.DevState.ALARM):
            self.call(h.Stop)
            self.warning(f"{h.dev_name()} was acquiring ({h.EventCount:,} events since its Reset, "
                         "from histo_start): histo_count stopped it and counts from zero")  # fmt: skip
        self.call(h.Reset)
        self.write(h, [("PresetEvents", 0), ("PresetTime", float(seconds))])
        self._config_at_start = h.HistogramConfig  # a Configure during the count is judged against it
        self._most, self._started = 0.0, time.monotonic()
        self._phase = "counting"  # from here a stop or abort records what was counted
        self.call(h.Start)
        self.output(f"counting {seconds:g} s on {h.dev_name()} ({h.EventSourceURI})")
        last, line = time.monotonic(), ""
        seen = time.monotonic()
        try:
            while h.state() in (tango.DevState.RUNNING, tango.DevState.ALARM):
                seen = time.monotonic()
                self.checkPoint()  # Ctrl-C lands here; on_stop / on_abort record what was counted
                time.sleep(0.05)
                self._most = max(self._most, self._elapsed(h))
                if time.monotonic() - last >= 1.0:
                    last, line = time.monotonic(), self.counters_line(h)
                    self.output(line)
        except tango.DevFailed as exc:
            self._phase = "done"
            raise RuntimeError(
                f"{h.dev_name()} stopped answering after {seen - self._started:.1f} s of {seconds:g} s "
                f"({exc.args[0].desc.strip()}); nothing was recorded: restart it (`livehist up`) and count again"
            ) from None
        if h.state() == tango.DevState.FAULT:
            self._failed(h, seconds)
        if self.counters_line(h) != line:  # the final counts, unless just shown
            self.output(self.counters_line(h))
        self.record(h, seconds, self._most, seen - self._started)

    def _failed(self, h, seconds):
        """FAULT mid-count (a source that failed: the device keeps its histograms and reconnects;
        or histogramming failed): stop it, so that it does not count on unwatched, and record what
        it had counted as failed; then fail."""
        from livehist.components.capture import CountOutcome

        status = " ".join(h.status().split())
        try:
            h.Stop()
        except tango.DevFailed:
            pass
        counted, events = self._elapsed(h), int(h.EventCount)
        fault = f"{h.dev_name()} went to FAULT after {counted:.2f} s of {seconds:g} s: {status}"
        if not events:
            self._phase = "done"
            raise RuntimeError(tango_text(f"{fault}; nothing was counted, nothing recorded"))
        reason = "; ".join(filter(None, [fault, self._reconfigured(h, seconds)]))
        try:
            self.record(h, seconds, outcome=CountOutcome("failed", counted, reason))
        except RuntimeError as exc:
            raise RuntimeError(tango_text(f"{fault}; {exc}")) from None
        w = self._writer
        if w is None:  # no ScanDir or ScanFile: said above
            raise RuntimeError(
                tango_text(f"{fault}; the {events:,} events counted until then are not recorded")
            )
        raise RuntimeError(tango_text(f"{fault}; the {events:,} events counted until then are recorded as failed "
                                      f"(scan {w.serial})"))  # fmt: skip

    @staticmethod
    def _elapsed(h):
        try:
            return float(h.ElapsedTime)
        except tango.DevFailed:  # restarting: judged at the end
            return 0.0

    def _outcome(self, h, seconds, most, running_for):
        from livehist.components.capture import CountOutcome, count_outcome

        try:
            black_box = list(h.black_box(30))
        except tango.DevFailed:
            black_box = []
        outcome = count_outcome(seconds, self._elapsed(h), most, black_box, running_for)
        note = self._reconfigured(h, seconds)
        if note:  # restarted from zero mid-count: the file must not say they hold the whole count
            outcome = CountOutcome(
                "interrupted", outcome.counted, "; ".join(filter(None, [outcome.reason, note]))
            )
        return outcome

    def _reconfigured(self, h, seconds) -> str:
        from livehist.components.capture import reconfigured

        try:
            changed = reconfigured(getattr(self, "_config_at_start", None), h.HistogramConfig)
        except tango.DevFailed:
            changed = []
        if not changed:
            return ""
        return (f"{', '.join(changed)} reconfigured during the count (Configure): counted only since "
                f"then, not for the {seconds:g} s and events recorded with them")  # fmt: skip

    def record(self, h, seconds, most=0.0, running_for=0.0, outcome=None, wait=None):
        self._phase, self._writer = "recording", None
        if outcome is None:
            outcome = self._outcome(h, seconds, most, running_for)
        self._final = outcome  # a Ctrl-C from here on records the count as it ended
        if outcome.status != "ok":
            self.warning(tango_text(outcome.reason))
        targets = self.targets
        if not targets:
            self._phase = "done"
            self.warning("histograms not recorded: set ScanDir and ScanFile (e.g. senv ScanFile scan.nxs)")
            return
        metadata = {}
        try:
            m = self.metadata_device()
            metadata = json.loads(self.call(m.GetMetadata))
        except RuntimeError as exc:  # down, or answering but unusable (FAULT): the count is kept
            self.warning(tango_text(f"{exc}; recording without metadata"))
        serial = self._take_number()
        self._writer = _Writer(h, targets, f"histo_count {seconds:g}", serial, metadata, outcome)
        self._writer.wait(wait)  # an abort now lands in this wait, not half-way through a file
        if not self._writer.done:
            self.warning(f"the count is still being recorded after {wait:g} s (a slow disk or device?): "
                         "its files may not be complete yet")  # fmt: skip
            return
        self._recorded(h, seconds, outcome)

    def _take_number(self) -> int:
        """The next scan number, past those other Doors' counts are recording now."""
        key = id(self.macro_server)
        with _NUMBERS:
            serial = max([self._scan_id(), *(n for k, n in _IN_FLIGHT if k == key)]) + 1
            _IN_FLIGHT.add((key, serial))
        return serial

    def _give_number(self, serial: int, recorded: bool) -> None:
        """The number is taken (ScanID) only by a scan that was recorded; never set back."""
        key = id(self.macro_server)
        with _NUMBERS:
            try:
                if recorded:
                    self.setEnv("ScanID", max(self._scan_id(), serial))
            finally:
                _IN_FLIGHT.discard((key, serial))

    def _recorded(self, h, seconds, outcome):
        """Say what the writer recorded; the ScanID is taken only by a scan in a file."""
        w, self._phase = self._writer, "done"
        self._give_number(w.serial, recorded=w.error is None)
        if w.error is not None:  # refused at scan start: nothing was written anywhere
            raise RuntimeError(tango_text(f"histograms not recorded: {w.error}"))
        r, serial, targets = w.recorder, w.serial, w.targets
        for name in json.loads(h.HistogramConfig):
            counts = h.read_attribute(name["name"]).value
            self.output(f"  {name['name']:<16} {name['kind']:<10} {int(counts.sum()):>14,} counts")
        for sink, error in r.errors.items():  # a sink failing after its start line leaves a part in its file
            held = ("nothing of this scan is in it" if " at scan start: " in error
                    else "its file holds this scan only in part (its start, not its end)")  # fmt: skip
            self.warning(tango_text(f"{sink} failed, {held}: {error}"))
        done = [str(t) for t in targets if str(t) in r.recorded]
        if not done:
            raise RuntimeError(f"scan {serial} was not recorded in any file; see the warnings above")
        state = "recorded" if outcome.status == "ok" else f"recorded as {outcome.status}"
        self.output(tango_text(f"scan {serial} {state} in " + ", ".join(done)))

    def on_stop(self):  # Ctrl-C in spock (StopMacro)
        self._ended_by_user("stopped by the user (Ctrl-C, StopMacro)")

    def on_abort(self):  # AbortMacro (a second Ctrl-C)
        self._ended_by_user("aborted by the user (AbortMacro)")

    def _ended_by_user(self, how):
        """Stop the device and record what was counted, as aborted, saying how long; a count that
        was being recorded is left to finish. Warns instead of raising (Sardana would only log it)."""
        from livehist.components.capture import CountOutcome

        h = getattr(self, "h", None)
        phase = getattr(self, "_phase", None)
        if h is None or phase == "done":
            return
        try:
            h.set_timeout_millis(3000)  # a hung device must not hold the Door for 10 s a call
            h.Stop()
        except tango.DevFailed as exc:
            if phase == "counting":
                self._phase = "done"
                self.warning(tango_text(f"{h.dev_name()} does not answer ({exc.args[0].desc.strip()}): the "
                                        "counts of this histo_count are not recorded"))  # fmt: skip
            return
        try:
            if phase == "counting":
                seconds = self._seconds
                counted = self._elapsed(h)  # final once Stop has returned
                notes = [f"{how} after {counted:.2f} s of {seconds:g} s"]
                if counted + 1e-3 < self._most:  # our Stop is the last command: judged by the counts
                    notes.append(f"the device's histograms were cleared after {self._most:.2f} s (Reset or "
                                 f"Init by another client): this record holds only the {counted:.2f} s after it")  # fmt: skip
                notes.append(self._reconfigured(h, seconds))
                outcome = CountOutcome("aborted", counted, "; ".join(filter(None, notes)))
                self.record(h, seconds, outcome=outcome, wait=60.0)
            elif phase == "recording" and getattr(self, "_writer", None) is None:  # not yet writing
                outcome = getattr(self, "_final", None) or self._outcome(h, self._seconds, self._most, 0.0)
                self.record(h, self._seconds, outcome=outcome, wait=60.0)
            elif phase == "recording":
                self._writer.wait(60.0)  # the count had ended: its record goes on in its own thread
                if self._writer.done:
                    self._recorded(h, self._seconds, self._writer.outcome)
                else:
                    self.warning("the count is still being recorded after 60 s (a slow disk or device?): "
                                 "its files may not be complete yet")  # fmt: skip
        except (AbortException, ReleaseException):  # a second Ctrl-C: on_abort takes over, or release
            raise
        except Exception as exc:
            self._phase = "done"
            self.warning(tango_text(f"histo_count stopped, but what it counted could not be recorded: {exc}"))


class _Writer:
    """Records the histograms in a thread of its own: Sardana aborts a macro by raising in its
    thread wherever it is, which must not cut a file write in half."""

    def __init__(self, h, targets, title, serial, metadata, outcome):
        self.targets, self.serial, self.outcome = targets, serial, outcome
        self.recorder, self.error, self.done = None, None, False
        args = (h, targets, title, serial)
        kwargs = {"metadata": metadata, "status": outcome.status, "reason": outcome.reason}
        self.thread = threading.Thread(target=self._run, args=(args, kwargs), name="histo_count-record",
                                       daemon=True)  # fmt: skip
        self.thread.start()

    def _run(self, args, kwargs):
        from livehist.components.capture import record_histograms

        try:
            with _WRITING:  # another Door's count may be writing the same files
                self.recorder = record_histograms(*args, **kwargs)
        except Exception as exc:
            self.error = exc
        finally:
            self.done = True

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.thread.is_alive() and (deadline is None or time.monotonic() < deadline):
            self.thread.join(0.1)


def _parse(key, value):
    """`value` as typed in spock -> the metadata value (escapes such as \\u03b1 decoded)."""
    try:
        value = from_tango_text(value, key)
    except LivehistError as exc:
        raise ValueError(tango_text(str(exc))) from None
    if key == "users":
        # 'Doe, Jane (PI)' was cut into two users, 'Doe' and 'Jane' (PI): with a ';' anywhere the
        # users are split at ';' only, and a JSON list is taken as it is
        if value.lstrip().startswith("["):
            try:
                users = json.loads(value)
            except ValueError:
                users = None
            if isinstance(users, list):
                return users
        return [u.strip() for u in value.split(";" if ";" in value else ",") if u.strip()]
    if key == "sample.temperature":
        try:
            t = float(value)
        except ValueError:
            t = math.nan
        if not math.isfinite(t):
            raise ValueError(tango_text(f"sample.temperature must be a number in K, got {value!r}"))
        return t
    if key in STRING_KEYS or key.startswith("sample."):
        return value
    try:
        parsed = json.loads(value)  # free-form keys: numbers, lists, true/false, null
    except ValueError:
        return value
    if not _finite(parsed):  # 1e400, NaN, Infinity: JSON (and so the metadata) has no such number
        raise ValueError(tango_text(f"{key}: {value[:80]!r} is not a finite number; give a finite "
                                    f"number, or quote it to keep it as text: '\"{value[:40]}\"'"))  # fmt: skip
    return parsed


def _finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


class meta_set(Macro, _Livehist):
    """Set one metadata key: proposal, title, instrument, data_root, sample.name,
    sample.description, sample.chemical_formula, sample.temperature (K), users
    ('Jane Doe (PI), Li Wei'; with ';' between users when a name holds a comma:
    'Doe, Jane (PI); Li, Wei'; or a JSON list) or any free-form key (JSON values are parsed).
    Attribute names work too (Proposal, SampleName, DataRoot...). Characters beyond
    Latin-1 (spock cannot send them) as escapes: \\u03b1 or \\N{GREEK SMALL LETTER ALPHA}."""

    param_def = [["key", Type.String, None, "metadata key, e.g. sample.name"],
                 ["value", Type.String, None, "the value (quote it if it has spaces; \\u03b1 escapes for "
                                              "characters beyond Latin-1)"]]  # fmt: skip

    def run(self, key, value):
        key = canonical_key(key)
        parsed = _parse(key, value)
        update = {"sample": {key.split(".", 1)[1]: parsed}} if key.startswith("sample.") else {key: parsed}
        m = self.metadata_device()
        self.call(m.SetMetadata, json.dumps(update))  # ASCII JSON: any Unicode travels exactly
        self.output(f"{key} = {json.dumps(parsed)}")


class meta_show(Macro, _Livehist):
    """Show the experiment metadata held by the MetadataManager."""

    def run(self):
        m = self.metadata_device()
        md = json.loads(self.call(m.GetMetadata))
        rows = []
        for key, value in md.items():
            if isinstance(value, dict):
                rows += [(f"{key}.{k}", v) for k, v in value.items()]
            elif key == "users":
                shown = [f"{u['name']} ({u['role']})" if u.get("role") else u["name"] for u in value]
                # as meta_set takes them: '; ' between users when a name holds a comma
                rows += [("users", ("; " if any("," in u for u in shown) else ", ").join(shown))]
            else:
                rows.append((key, value))
        width = max((len(k) for k, _ in rows), default=4)
        self.output(f"{'key':<{width}}  value")
        for k, v in rows:  # the Door's Output is Latin-1: other characters shown as \u escapes
            self.output(
                tango_text(f"{k:<{width}}  {v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}")
            )
        self.output(f"state: {m.state()}  {m.status()}")


class dataset_start(Macro, _Livehist):
    """Open a dataset: the MetadataManager creates its folder, and ScanDir is set to it."""

    param_def = [["name", Type.String, None, "dataset name (ASCII letters, digits, _ . -)"]]

    def run(self, name):
        m = self.metadata_device()
        before = self._env("ScanDir", "")
        folder = self.call(m.StartDataset, name)
        self.setEnv(SCANDIR_BEFORE, before or "")  # dataset_end sets it back
        self.setEnv("ScanDir", from_tango_text(folder))
        self.output(f"dataset {name} open: ScanDir = {folder}")


class dataset_end(Macro, _Livehist):
    """Close the dataset; its summary (metadata, files, times) is written as JSON in its folder."""

    def run(self):
        m = self.metadata_device()
        path = self.call(m.EndDataset)
        with open(from_tango_text(path), encoding="utf-8") as f:
            summary = json.load(f)
        self.output(f"dataset {summary['dataset']} closed: {len(summary['files'])} files, summary {path}")
        for f in summary["files"]:
            self.output(tango_text(f"  {f['path']}  ({f['size']:,} bytes)"))
        # scans after this one must not go on into the closed dataset's folder (its summary is written)
        if os.path.normpath(str(self._env("ScanDir", ""))) == os.path.normpath(
            str(summary.get("folder", ""))
        ):
            before = self._env(SCANDIR_BEFORE, "")
            if before:
                self.setEnv("ScanDir", before)
                self.output(tango_text(f"ScanDir = {before} (as before dataset_start)"))
            else:
                self.warning(tango_text(f"ScanDir is still {summary['folder']}, the closed dataset's folder: "
                                        "dataset_start another dataset or senv ScanDir before the next scan"))  # fmt: skip


def _histogrammers(macro, channels) -> set[str]:
    """The histogrammer devices that livehist's controllers read for these channels (by name)."""
    try:
        controllers = {macro.getExpChannel(ch).getControllerName() for ch in channels}
    except Exception:  # not ours to judge: Sardana reports channel problems itself
        return set()
    devices = set()
    for ctrl_name in controllers:
        ctrl = macro.getController(ctrl_name)
        if ctrl is not None and str(ctrl.getClassName()).startswith("Livehist"):
            prop = ctrl.get_property("Histogrammer").get("Histogrammer") or [HISTOGRAMMER]
            devices.add(prop[0])
    return devices


class ct(_SardanaCt, _Livehist):
    """Count for the specified time on the measurement group or experimental channel given as
    second argument (if not given the active measurement group is used). Sardana's ct; `ct 0`
    on livehist channels is refused: Sardana then acquires nothing and shows the channels' last
    values, those of an earlier count."""

    def run(self, integ_time, countable_elem):
        if not integ_time:
            if countable_elem is not None:
                name = countable_elem.name
                if getattr(countable_elem, "type", None) == "MeasurementGroup":
                    channels = countable_elem.getChannelLabels()
                else:
                    channels = [name]
            else:
                name = self._env("ActiveMntGrp", None)
                try:
                    mg = self.getMeasurementGroup(name) if name else None
                    channels = mg.getChannelLabels() if mg is not None else []
                except Exception:
                    channels = []
            if _histogrammers(self, channels):
                raise RuntimeError(
                    f"ct {integ_time:g} acquires nothing: Sardana then shows the channels' last values, on "
                    f"{name} those of an earlier count; give a time, e.g. ct 0.1 (or a monitor count of "
                    "events, < 0)"
                )
        return super().run(integ_time, countable_elem)


class livehist_check(Macro, _Livehist):
    """Pre-scan hook: the histogrammers behind the active measurement group must answer, and
    ScanDir must not be the folder of a closed dataset."""

    def run(self):
        scan_dir = self._env("ScanDir", None)
        if scan_dir and self._env("ScanFile", None):
            _refuse_a_closed_dataset(str(scan_dir))
        mg_name = self._env("ActiveMntGrp", None)
        if not mg_name:
            return
        try:
            mg = self.getMeasurementGroup(mg_name)
            channels = mg.getChannelLabels() if hasattr(mg, "getChannelLabels") else []
        except Exception:  # not ours to judge: Sardana reports measurement group problems itself
            return
        devices = _histogrammers(self, channels)
        parent = self.getParentMacro()
        integ_time = getattr(parent, "integ_time", None)
        if devices and isinstance(integ_time, int | float) and not integ_time:
            raise RuntimeError(f"integration time {integ_time}: livehist channels ({mg_name}) need seconds "
                               "(> 0) or a monitor count of events (< 0)")  # fmt: skip
        for name in sorted(devices):
            try:
                p = tango.DeviceProxy(name)
                p.set_timeout_millis(3000)
                state = p.state()
            except tango.DevFailed:
                raise RuntimeError(f"{name} (used by {mg_name}) does not answer: start it "
                                   "(`livehist up`) or choose another ActiveMntGrp") from None  # fmt: skip
            if state == tango.DevState.FAULT:
                raise RuntimeError(f"{name} (used by {mg_name}) is in FAULT: {p.status()}")
            if state in (tango.DevState.RUNNING, tango.DevState.ALARM):  # Sardana: "mg state is Moving"
                raise RuntimeError(f"{name} (used by {mg_name}) is acquiring ({p.EventCount:,} events since its "
                                   "Reset, e.g. from histo_start): histo_stop first; each scan point Resets it")  # fmt: skip
