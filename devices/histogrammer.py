"""EventHistogrammer: live histograms of an event stream as Tango attributes.

A thin shell over `livehist.components.histogrammer.Histogrammer`: properties and commands map onto
it, one attribute per histogram is created from its spec, and every publish of the
component becomes change events (counters, State/Status, histograms of fewer than 2048
values), data-ready events (every histogram and preview) and archive events (counters).
Events are pushed from the publisher thread, never from inside a read.

Large arrays are announced, not pushed: cppTango sends arrays of LARGE_EVENT (2048) values
or more zero-copy and waits, without timeout, until every subscriber's connection took the
buffer; pytango holds the device monitor (and the GIL) meanwhile, so one frozen subscriber
(a laptop asleep with a panel open) would freeze the device, reads and commands included.
Clients follow such attributes by their DATA_READY event (its counter is UpdateCounter) and
read them; a CHANGE subscription to one is refused by Tango (API_AttributePollingNotStarted),
which Taurus answers by polling.

    python -m livehist.devices.histogrammer INSTANCE
"""

from __future__ import annotations

import json
import logging
import sys
import threading

import numpy as np
import tango
from livehist.devices import events
from tango import AttrWriteType, DevState
from tango.server import Device, attribute, command, device_property, run

from livehist.components.histogrammer import Histogrammer, Update
from livehist.components.restream import Restreamer
from livehist.engine import preview
from livehist.engine.spec import DEFAULT_MAX_BYTES, HistogramSpec, SpecError, join_property
from livehist.errors import LivehistError, latin1_text, tango_error_text, tango_text

log = logging.getLogger(__name__)
# Tango keeps one attribute-definition list per device class and server, and commands of
# different devices run concurrently (serialisation by device): every change of a device's
# dynamic attributes, by any livehist device of the server, holds this lock
ATTRIBUTE_CHANGES = threading.RLock()

LARGE_EVENT = 2048  # cppTango's LARGE_DATA_THRESHOLD: events of this many values are sent zero-copy
NDIM = {tango.AttrDataFormat.SCALAR: 0, tango.AttrDataFormat.SPECTRUM: 1, tango.AttrDataFormat.IMAGE: 2}
MAX_DIM = 2**31 - 1  # max dims of every histogram attribute: one bound for every device and shape

STATES = {"ON": DevState.ON, "RUNNING": DevState.RUNNING, "ALARM": DevState.ALARM,
          "FAULT": DevState.FAULT}  # fmt: skip
DEFAULT_HISTOGRAMS = json.dumps([
    {"name": "tof", "kind": "tof", "tof": {"start": 0, "stop": 72_000_000, "bins": 1000, "unit": "ns"}},
    {"name": "image", "kind": "image", "pixels": {"first": 1, "shape": [128, 128]}},
])  # fmt: skip
# name -> (Tango type, attribute getter on the last snapshot)
COUNTERS = {
    "EventCount": (tango.DevLong64, "events", "events", "events decoded and histogrammed since Reset"),
    "MessageCount": (tango.DevLong64, "messages", "messages", "messages received since Reset"),
    "BadMessageCount": (tango.DevLong64, "bad_messages", "messages", "malformed messages skipped"),
    "DroppedMessageCount": (tango.DevLong64, "dropped_messages", "messages",
                            "whole messages dropped because histogramming fell behind"),
    "PulseCount": (tango.DevLong64, "pulses", "pulses", "source pulses seen since Reset"),
    "EventRate": (tango.DevDouble, "event_rate", "events/s", "events per second over the last 2 s"),
    "ElapsedTime": (tango.DevDouble, "elapsed", "s", "accumulating time since Reset"),
}  # fmt: skip


def _counter(name: str) -> attribute:
    """A read-only counter attribute, read from the last published snapshot."""
    dtype, field, unit, doc = COUNTERS[name]

    def read(self) -> float | int:
        return getattr(self.hg.last, field)

    return attribute(dtype=dtype, unit=unit, doc=doc, fget=read,
                     format="%.4g" if dtype == tango.DevDouble else "%d")  # fmt: skip


def fail(reason: str, desc: str, origin: str) -> None:
    # Latin-1 bytes: pytango would send a str as UTF-8 that clients read as Latin-1 (µs -> Âµs)
    tango.Except.throw_exception(f"livehist_{reason}", tango_error_text(desc), f"EventHistogrammer.{origin}")


def number_property(name: str, raw: str, minimum: float, example: str) -> float:
    """A numeric property given as text: a typo names the property and the fix, never a CORBA error."""
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise LivehistError(f"property {name} must be a number like {example}, got {raw!r}") from None
    if not value >= minimum or value == float("inf"):
        raise LivehistError(f"property {name} must be a number >= {minimum:g} like {example}, got {raw!r}")
    return value


def whole(value: float) -> int | float:
    """An integral number as int; anything else as it is, for the component to refuse by name."""
    return int(value) if value.is_integer() else value


class AttributeConflict(SpecError):
    """A histogram name that a sibling device of this server uses with another Tango type or format."""


class EventHistogrammer(Device):
    """Histograms of a neutron/X-ray event stream (ev44 over ZeroMQ/Kafka, NeXus replay, simulator)."""

    EventSource = device_property(dtype=str, default_value="sim://",
                                  doc="sim://, zmq://HOST:PORT, zmq+sub://HOST:PORT, nexus:///PATH, kafka://B/T")  # fmt: skip
    Histograms = device_property(dtype=(str,), default_value=[DEFAULT_HISTOGRAMS],
                                 doc="JSON list of histogram specs, or one spec object per line")  # fmt: skip
    # numbers as text: pytango's own conversion of a typo ("0.5s") fails Init with a bare CORBA error
    PublishPeriod = device_property(dtype=str, default_value="0.5", doc="seconds between publishes (>= 0.02)")
    MaxHistogramBytes = device_property(dtype=str, default_value=str(DEFAULT_MAX_BYTES),
                                        doc="cap on the memory of all histograms (counts, staging, a copy per thread), bytes")  # fmt: skip
    RestreamEndpoint = device_property(dtype=str, default_value="",
                                       doc="ZeroMQ PUB address for hs01 histograms, e.g. tcp://*:5560 ('' = off)")  # fmt: skip
    RestreamKafka = device_property(dtype=str, default_value="",
                                    doc="BROKER[,BROKER]/TOPIC for hs01 histograms ('' = off)")  # fmt: skip
    RestreamFormat = device_property(dtype=str, default_value="hs01",
                                     doc="hs01 or da00 (ESS DataArray) for RestreamEndpoint/RestreamKafka")  # fmt: skip
    AccumulatingThreads = device_property(dtype=str, default_value="1",
                                          doc="threads histogramming each large message, each with its own "
                                              "partial counts (memory: this many times the counts)")  # fmt: skip
    MaxQueueBytes = device_property(dtype=str, default_value=str(256 * 2**20),
                                    doc="cap on raw messages waiting to be histogrammed, bytes (>= 1 MiB)")  # fmt: skip

    # --- life cycle ------------------------------------------------------------------
    def init_device(self) -> None:
        self.hg: Histogrammer | None = None
        self.restream: Restreamer | None = None
        # attribute name -> signature (format, type); dynamic attributes outlive an Init
        self._dynamic: dict[str, tuple] = getattr(self, "_dynamic", {})
        self._readers: dict[str, object] = getattr(self, "_readers", {})
        self._large: set[str] = getattr(self, "_large", set())  # announced by data-ready events only
        self._preview_cache = None
        self._push_failures = events.PushFailures()
        try:  # anything failing here leaves FAULT with a Status naming it, never a bare CORBA error
            super().init_device()
            for name in ("State", "Status", *COUNTERS, "UpdateCounter"):
                self.set_change_event(name, True, False)
            for name in (*COUNTERS, "UpdateCounter"):
                self.set_archive_event(name, True, False)
            self.hg = Histogrammer(
                self.EventSource,
                join_property(self.Histograms),
                publish_period=number_property("PublishPeriod", self.PublishPeriod, 0.02, "0.5"),
                max_histogram_bytes=int(
                    number_property("MaxHistogramBytes", self.MaxHistogramBytes, 1, "2147483648")
                ),
                max_queue_bytes=int(number_property("MaxQueueBytes", self.MaxQueueBytes, 2**20, "268435456")),
                threads=whole(number_property("AccumulatingThreads", self.AccumulatingThreads, -1e18, "1")),
                on_update=self._publisher(),
                thread_context=tango.EnsureOmniThread,
                name=self.get_name(),
            )
            self.restream = Restreamer(self.get_name(), self.RestreamEndpoint, self.RestreamKafka,
                                       fmt=self.RestreamFormat)  # fmt: skip
            if getattr(self, "_served", False):  # the Init command: match attributes to the properties
                self._make_attributes(self.hg.engine.specs)
        except Exception as exc:  # a bad property or re-stream target, or no memory for what they ask
            if isinstance(exc, tango.DevFailed):
                why = exc.args[0].desc
            elif isinstance(exc, LivehistError | ValueError):
                why = str(exc)
            else:  # MemoryError has no text: an UNKNOWN CORBA error and a device left "ON" that would not Start
                why = f"Init failed with {type(exc).__name__}: {exc or 'no detail'} (EventSource {self.EventSource!r})"
            if self.hg is not None:
                self.hg.close()
                self.hg = None
            self.set_state(DevState.FAULT)
            self.set_status(f"{why}; fix the property and run Init")
            return
        self._sync_state()

    def initialize_dynamic_attributes(self) -> None:
        self._served = True
        events.open_event_socket(self.get_name())
        if self.hg is not None:
            try:
                self._make_attributes(self.hg.engine.specs)
            except (SpecError, tango.DevFailed) as exc:
                self.hg.close()
                self.hg = None
                self.set_state(DevState.FAULT)
                why = exc.args[0].desc if isinstance(exc, tango.DevFailed) else str(exc)
                self.set_status(f"{why}; fix the Histograms property and run Init")

    def delete_device(self) -> None:
        self._publishing = None  # the closed engine's publisher thread pushes nothing more
        if self.hg is not None:
            self.hg.close()  # never waits on the publisher: it may be waiting for our monitor
        if getattr(self, "restream", None) is not None:
            self.restream.close()

    def _sync_state(self) -> None:
        if self.hg is not None:
            self.set_state(STATES[self.hg.state])
            self.set_status(self._status_text(self.hg.status))

    def _status_text(self, status: str) -> str:
        """The status, plus what re-streaming fails with (a Kafka broker that does not take it) and
        which attributes' events could not be pushed lately; in Latin-1, as Tango carries it
        (a replayed file named in another script is shown with \\u escapes)."""
        problem = self.restream.problem if getattr(self, "restream", None) is not None else None
        return latin1_text((f"{status}; {problem}" if problem else status) + self._push_failures.note())

    def dev_state(self) -> DevState:
        self._sync_state()
        return self.get_state()

    def dev_status(self) -> str:
        self._sync_state()
        return self.get_status()

    # --- dynamic attributes, one per histogram ------------------------------------------
    # Why this scheme: cppTango keeps ONE list of attribute definitions per device class,
    # shared by every device of the class in the server, and each device's attribute holds an
    # index into it. add_attribute reuses a definition of the same name (its max dims, type,
    # format and default properties); remove_attribute drops it only when no other device uses
    # it, then shifts indices: the siblings' right, but on the removing device only those of
    # the attributes listed after the removed one. Erasing class entries ourselves (as before)
    # left siblings with stale indices: the segfaults with two devices in one server. So:
    #   1. every histogram attribute has the same generous max dims (MAX_DIM, upper bounds only:
    #      a client sees the value's shape), so one definition serves every device and shape,
    #      and a new shape keeps the attribute, its subscribers and their events;
    #   2. the class list is only changed through add_attribute/remove_attribute;
    #   3. each device keeps its dynamic attributes in class-list order (later ones are removed
    #      and re-added around a reused earlier definition), so cppTango's index shift is right;
    #   4. a name that a sibling device uses with another type or format is refused up front.
    @staticmethod
    def _signatures(spec: HistogramSpec) -> dict[str, tuple]:
        """name -> (format, Tango type, number of values) of every attribute of one histogram."""
        shape = spec.data_shape
        size = shape[0] * (shape[1] if len(shape) == 2 else 1)
        out = {spec.name: ("image" if len(shape) == 2 else "spectrum", tango.DevLong64, size)}
        if spec.tof is not None:
            out[f"{spec.name}_edges"] = ("spectrum", tango.DevDouble, spec.tof.bins + 1)
        if spec.kind == "roi":
            out[f"{spec.name}_total"] = ("scalar", tango.DevLong64, 1)
        if len(shape) == 2 and preview.factor(shape) > 1:
            py, px = preview.preview_shape(shape)
            out[f"{spec.name}_preview"] = ("image", tango.DevLong64, py * px)
        return out

    def _siblings(self) -> list:
        util = tango.Util.instance()
        return [d for d in util.get_device_list_by_class(self.get_device_class().get_name()) if d is not self]

    def _class_index(self) -> dict[str, tuple[int, tango.Attr]]:
        attrs = self.get_device_class().get_class_attr().get_attr_list()
        return {a.get_name().lower(): (i, a) for i, a in enumerate(attrs)}

    def _check_conflicts(self, specs: list[HistogramSpec]) -> None:
        """Refuse, before anything changes, a name a sibling device holds with another type/format."""
        formats = {"spectrum": tango.AttrDataFormat.SPECTRUM, "image": tango.AttrDataFormat.IMAGE,
                   "scalar": tango.AttrDataFormat.SCALAR}  # fmt: skip
        defined = self._class_index()
        for spec in specs:
            for name, (fmt, dtype, _) in self._signatures(spec).items():
                hit = defined.get(name.lower())
                if hit is None or (hit[1].get_format() == formats[fmt] and hit[1].get_type() == dtype):
                    continue
                users = [d.get_name() for d in self._siblings()
                         if name.lower() in {n.lower() for n in getattr(d, "_dynamic", {})}]  # fmt: skip
                if users or name not in self._dynamic:
                    raise AttributeConflict(
                        f"histogram {spec.name!r}: attribute {name} is already a {hit[1].get_format()} of "
                        f"{tango.CmdArgType(hit[1].get_type())} on {', '.join(users) or 'this device class'} "
                        "in this server (Tango shares attribute definitions per class and server); "
                        "choose another name"
                    )

    def _make_attributes(self, specs: list[HistogramSpec]) -> None:
        """Add, keep or remove attributes so that they match `specs` (same name, format and type: kept)."""
        with ATTRIBUTE_CHANGES:
            self._forget_missing()
            self._check_conflicts(specs)
            self._match_attributes(specs)

    def _forget_missing(self) -> None:
        """Drop from our books an attribute that Tango no longer holds for this device or class
        (never seen since the lock above; kept so that an Init always repairs the device)."""
        present = {a.get_name().lower() for a in self.get_device_attr().get_attribute_list()}
        index = self._class_index()
        for name in [n for n in self._dynamic if n.lower() not in present or n.lower() not in index]:
            if name.lower() in present:
                try:
                    self.remove_attribute(name, False, False)
                except tango.DevFailed as exc:
                    log.warning("could not remove the stale attribute %s: %s", name, exc.args[0].desc)
            log.warning("attribute %s was missing from Tango's lists; recreating it", name)
            del self._dynamic[name]
            self._large.discard(name)

    def _match_attributes(self, specs: list[HistogramSpec]) -> None:
        wanted: dict[str, tuple] = {}
        owner: dict[str, HistogramSpec] = {}
        for spec in specs:
            for name, (fmt, dtype, _size) in self._signatures(spec).items():
                wanted[name], owner[name] = (fmt, dtype), spec
                self._readers[name] = self._reader(name, spec)
        for name in [n for n, sig in self._dynamic.items() if wanted.get(n) != sig]:
            self.remove_attribute(name, False, False)  # clean_db=False: no database call, works with it down
            del self._dynamic[name]
            self._large.discard(name)
        pending = [n for n in wanted if n not in self._dynamic]
        while pending:  # add in class-list order (new definitions go last), see 3. above
            index = self._class_index()
            pending.sort(key=lambda n: index.get(n.lower(), (len(index), None))[0])
            name = pending.pop(0)
            at = index.get(name.lower(), (len(index), None))[0]
            later = [n for n in self._dynamic if index[n.lower()][0] > at]
            for n in reversed(later):  # the last one listed first: cppTango's shift stays right
                self.remove_attribute(n, False, False)
                del self._dynamic[n]
                pending.append(n)
            self.add_attribute(self._attribute(name, wanted[name], owner[name]), self._read_dynamic)
            self._dynamic[name] = wanted[name]
            self._large.discard(name)
            if wanted[name][0] != "scalar":
                self.set_data_ready_event(name, True)
        for spec in specs:
            for name, (_fmt, _, size) in self._signatures(spec).items():
                self._set_events(name, size)
                self._set_properties(name, owner[name])

    def _set_events(self, name: str, size: int) -> None:
        """Change events for attributes under LARGE_EVENT values; larger ones only announce (see top)."""
        large = size >= LARGE_EVENT
        if large and name not in self._large:
            if self._listened(name):  # tell CHANGE subscribers once, instead of going silent
                try:
                    fail("UseDataReady", f"{name} now has {size} values: from {LARGE_EVENT} values on, "
                         "livehist announces it by DATA_READY events (read it then), so that a frozen client "
                         "cannot block the device", "Configure")  # fmt: skip
                except tango.DevFailed as exc:
                    self._push(name, exc)
            self._large.add(name)
        elif not large:
            self._large.discard(name)
        self.set_change_event(name, not large, False)

    def _set_properties(self, name: str, spec: HistogramSpec) -> None:
        """This device's label, unit and description (a shared definition carries its first user's)."""
        label, unit, doc = self._describe(name, spec)
        attr = self.get_device_attr().get_attr_by_name(name)
        props = attr.get_properties()
        if (props.label, props.unit, props.description) == (label, unit, doc):
            return
        props.label, props.unit, props.description = label, unit, doc
        try:
            attr.set_properties(props)
        except tango.DevFailed as exc:  # cosmetic (the database may be away): the data are right
            self.warn_stream(f"could not update the description of {name}: {exc.args[0].desc}")

    def _attribute(self, name: str, sig: tuple, spec: HistogramSpec) -> tango.Attr:
        fmt, dtype = sig
        if fmt == "image":
            attr = tango.ImageAttr(name, dtype, AttrWriteType.READ, MAX_DIM, MAX_DIM)
        elif fmt == "spectrum":
            attr = tango.SpectrumAttr(name, dtype, AttrWriteType.READ, MAX_DIM)
        else:
            attr = tango.Attr(name, dtype, AttrWriteType.READ)
        label, unit, doc = self._describe(name, spec)
        props = tango.UserDefaultAttrProp()
        props.set_unit(unit)
        props.set_label(label)
        props.set_description(doc)
        attr.set_default_properties(props)
        return attr

    def _role(self, name: str, spec: HistogramSpec) -> str:
        for suffix in ("_edges", "_total", "_preview"):
            if name == spec.name + suffix:
                return suffix
        return ""

    def _reader(self, name: str, spec: HistogramSpec):
        return {"_edges": self._read_edges, "_total": self._read_total, "_preview": self._read_preview,
                "": self._read_histogram}[self._role(name, spec)]  # fmt: skip

    def _describe(self, name: str, spec: HistogramSpec) -> tuple[str, str, str]:
        """(label, unit, description) of one attribute of a histogram. Shapes stay out (the value
        and HistogramConfig carry them): a description that differs from the shared definition's
        is written to the database, under the device monitor, at every Configure."""
        tof_unit = spec.tof.unit if spec.tof else ""
        role = self._role(name, spec)
        events = "; DATA_READY events announce each update"
        if role == "_edges":
            return (f"{spec.name} TOF bin edges", tof_unit,
                    f"TOF bin edges of {spec.name} in {tof_unit}, half-open bins")  # fmt: skip
        if role == "_total":
            return f"{spec.name} total", "counts", f"events inside ROI {spec.name} and its TOF range"
        if role == "_preview":
            return (f"{spec.name} preview", "counts",
                    f"{spec.name} as sums of square blocks, at most {preview.LIMIT} per side, for displays; "
                    f"{spec.name} is exact" + events)  # fmt: skip
        doc = {"tof": f"TOF spectrum in {tof_unit} (edges: {name}_edges)",
               "image": "detector image, row, col = divmod(pixel - first, nx) (first, shape: HistogramConfig)",
               "pixel_tof": f"pixel x TOF map, TOF in {tof_unit} (edges: {name}_edges)",
               "roi": f"TOF spectrum of ROI {name} in {tof_unit} (edges: {name}_edges)",
               }[spec.kind]  # fmt: skip
        doc += f", last {spec.window:g} s" if spec.window else ", cumulative since Reset"
        return name, "counts", doc + events

    def _last(self, name: str, table: str):
        snap = self.hg.last
        try:
            return getattr(snap, table)[name]
        except KeyError:
            fail("Reconfigured", f"histogram {name!r} is not in the current configuration", "read")

    def _read_dynamic(self, attr: tango.Attribute) -> None:
        value = self._readers[attr.get_name()](attr)
        if np.ndim(value) != NDIM[attr.get_data_format()]:  # a Configure between attributes and data
            fail("Reconfigured", f"{attr.get_name()} is being reconfigured; read it again", "read")
        attr.set_value(value)

    def _read_histogram(self, attr: tango.Attribute) -> np.ndarray:
        return self._last(attr.get_name(), "counts")

    def _read_edges(self, attr: tango.Attribute) -> np.ndarray:
        return self._last(attr.get_name()[: -len("_edges")], "edges")

    def _preview(self, name: str) -> np.ndarray:
        """Block sums of the last published image, computed once per publish."""
        snap = self.hg.last
        cached = self._preview_cache
        if cached is None or cached[0] != name or cached[1] is not snap:
            cached = self._preview_cache = (name, snap, preview.block_sum(self._last(name, "counts")))
        return cached[2]

    def _read_preview(self, attr: tango.Attribute) -> np.ndarray:
        return self._preview(attr.get_name()[: -len("_preview")])

    def _read_total(self, attr: tango.Attribute) -> int:
        return int(self._last(attr.get_name()[: -len("_total")], "counts").sum())

    # --- publishing (publisher thread) ------------------------------------------------
    def _publisher(self):
        """The engine's on_update: publishes under our monitor, and only while this engine is
        the device's (an Init or a shutdown runs under the monitor too, so an engine's last
        update never meets attributes being replaced, or a server being torn down)."""
        token = self._publishing = object()

        def publish(update: Update) -> None:
            try:
                with tango.AutoTangoMonitor(self):
                    if token is self._publishing:
                        self._publish(update)
            except tango.DevFailed as exc:  # the monitor was busy too long: the next update carries it
                log.debug("update %s not published: %s", update.counter, exc.args[0].desc)

        return publish

    def _push(self, name: str, value, archive: bool = False) -> None:
        """Push one attribute's events (`value` may be a callable giving it); any failure costs
        this attribute only: the rest of the publish goes on."""
        if not events.ready():  # see devices/events.py
            return
        try:
            value = value() if callable(value) else value
            self.push_change_event(name, value)
            if archive and self._listened(name, tango.EventType.ARCHIVE_EVENT):
                self.push_archive_event(name, value)
        except tango.DevFailed:  # removed by a concurrent Configure, or the monitor timed out
            pass
        except Exception as exc:  # a value Tango cannot carry (text beyond Latin-1, say): counted, in Status
            self._push_failures.record(name, exc)

    def _listened(self, name: str, kind=tango.EventType.CHANGE_EVENT) -> bool:
        """Has this attribute subscribers of this event type? (A new subscriber reads the
        current value when it subscribes, so skipping pushes while there are none loses nothing.)"""
        try:
            return self.is_there_subscriber(name, kind)
        except tango.DevFailed:
            return False

    def _publish(self, update: Update) -> None:
        snap = update.snapshot
        state = STATES[update.state]
        status = self._status_text(update.status)
        if state != self.get_state() or status != self.get_status():
            self.set_state(state)
            self.set_status(status)
            self._push("State", state)
            self._push("Status", status)
        dynamic, large = dict(self._dynamic), set(self._large)  # Configure may replace them meanwhile
        for name, counts in snap.counts.items():
            if name not in dynamic:
                continue
            self._announce(name, counts, name in large, update.counter)
            if snap.specs[name].kind == "roi" and f"{name}_total" in dynamic:
                self._push(f"{name}_total", int(counts.sum()))
            view = f"{name}_preview"
            if view in dynamic:
                self._announce(view, lambda c=counts: preview.block_sum(c), view in large, update.counter)
            edges = f"{name}_edges"
            if update.configured and name in snap.edges and edges in dynamic:
                self._announce(edges, snap.edges[name], edges in large, update.counter)
        for name, (_, field, _, _) in COUNTERS.items():
            self._push(name, getattr(snap, field), archive=True)
        self._push("UpdateCounter", update.counter, archive=True)
        if self.restream is not None:
            self.restream.publish(snap, update.state, update.counter)

    def _announce(self, name: str, value, large: bool, counter: int) -> None:
        """A data-ready event always; the value itself only when small enough (see top)."""
        if not large and self._listened(name):  # a histogram nobody follows is not converted for nobody
            self._push(name, value)
        if (name.endswith("_edges") and not large) or not events.ready():
            return
        try:
            self.push_data_ready_event(name, counter)
        except tango.DevFailed:
            pass
        except Exception as exc:
            self._push_failures.record(name, exc)

    # --- counters and presets ---------------------------------------------------------
    EventCount = _counter("EventCount")
    MessageCount = _counter("MessageCount")
    BadMessageCount = _counter("BadMessageCount")
    DroppedMessageCount = _counter("DroppedMessageCount")
    PulseCount = _counter("PulseCount")
    EventRate = _counter("EventRate")
    ElapsedTime = _counter("ElapsedTime")

    @attribute(dtype=tango.DevLong64, doc="+1 per publish (change events carry it too)")
    def UpdateCounter(self) -> int:
        return self.hg.update_counter if self.hg else 0

    @attribute(dtype=tango.DevLong64, doc="events (change, archive, data-ready) that could not be pushed "
               "since Init, for a value Tango cannot carry; Status names the attribute and why")  # fmt: skip
    def PushFailedCount(self) -> int:
        return self._push_failures.count

    @attribute(dtype=tango.DevLong64,
               doc="hs01/da00 messages sent (ZeroMQ) or acknowledged by the broker (Kafka)")  # fmt: skip
    def RestreamSentCount(self) -> int:
        return self.restream.sent if self.restream else 0

    @attribute(
        dtype=tango.DevLong64,
        doc="updates or messages dropped for slow receivers, or not delivered to Kafka (never blocking)",
    )
    def RestreamDroppedCount(self) -> int:
        return self.restream.dropped if self.restream else 0

    @attribute(dtype=str, doc="the histogram list in use, as JSON that Configure accepts")
    def HistogramConfig(self) -> str:
        return self.hg.config_json() if self.hg else "[]"

    @attribute(
        dtype=str,
        doc="JSON: Kafka offsets (first, last) and every range counted per partition since Reset, group, checkpoint",
    )
    def KafkaOffsets(self) -> str:
        return json.dumps(self.hg.provenance()) if self.hg else "{}"

    @attribute(dtype=str, doc="the EventSource in use (set the property and run Init to change it)")
    def EventSourceURI(self) -> str:
        # tango_text: a file name beyond Latin-1 (nexus:///data/数据.nxs) failed the read with UnicodeError
        return tango_text(self.hg.source_uri if self.hg else self.EventSource)

    def _set_preset(self, **preset) -> None:
        if self.hg is None:  # FAULT after a bad property: say so, not a Python error
            fail("NotInitialised", self.get_status(), "write preset")
        try:
            self.hg.set_presets(**preset)
        except LivehistError as exc:
            fail("BadPreset", str(exc), "write preset")

    @attribute(dtype=tango.DevDouble, access=AttrWriteType.READ_WRITE, unit="s", memorized=False,
               doc="stop RUNNING after this accumulating time (0 = no preset)")  # fmt: skip
    def PresetTime(self) -> float:
        return self.hg.engine.preset_time

    @PresetTime.write
    def PresetTime(self, value: float) -> None:
        self._set_preset(time_s=value)

    @attribute(dtype=tango.DevLong64, access=AttrWriteType.READ_WRITE, unit="events",
               doc="stop RUNNING after exactly this many events (0 = no preset)")  # fmt: skip
    def PresetEvents(self) -> int:
        return self.hg.engine.preset_events

    @PresetEvents.write
    def PresetEvents(self, value: int) -> None:
        self._set_preset(events=value)

    @attribute(dtype=tango.DevLong64, access=AttrWriteType.READ_WRITE, unit="pulses",
               doc="stop RUNNING after exactly this many source pulses (0 = no preset)")  # fmt: skip
    def PresetPulses(self) -> int:
        return self.hg.engine.preset_pulses

    @PresetPulses.write
    def PresetPulses(self, value: int) -> None:
        self._set_preset(pulses=value)

    def read_attr_hardware(self, attr_list) -> None:
        if self.hg is None:
            fail("NotInitialised", self.get_status(), "read")

    # --- commands ---------------------------------------------------------------------
    @command(doc_in="start accumulating from EventSource (presets end it by themselves)")
    def Start(self) -> None:
        if self.hg is None or self.hg.running:
            fail("WrongState", f"Start is not allowed in {self.get_state()}: "
                 + ("Stop first" if self.hg else self.get_status()), "Start")  # fmt: skip
        try:
            self.hg.start()
        except LivehistError as exc:
            fail("StartFailed", str(exc), "Start")
        self._sync_state()

    @command(doc_in="stop accumulating; queued events are histogrammed first (harmless when idle)")
    def Stop(self) -> None:
        if self.hg is not None:
            self.hg.stop()
            self._sync_state()

    @command(doc_in="clear every histogram and counter (acquisition goes on if RUNNING)")
    def Reset(self) -> None:
        if self.hg is not None:
            self.hg.reset()
            self._sync_state()

    @command(dtype_in=str, doc_in="JSON list of histogram specs; replaces the list, kept in the database")
    def Configure(self, histograms: str) -> None:
        """All or nothing: a bad spec, a name clash or an unreachable database change nothing."""
        if self.hg is None:
            fail("NotInitialised", self.get_status(), "Configure")
        try:
            checked = self.hg.check(histograms)  # parsed and allocated; nothing changed yet
        except SpecError as exc:
            fail("BadSpec", f"{exc}; the previous histograms keep running", "Configure")
        with ATTRIBUTE_CHANGES:  # no sibling changes the class's attributes between check and change
            self._configure(histograms, checked)

    def _configure(self, histograms: str, checked) -> None:
        try:
            self._check_conflicts(checked[0])
        except SpecError as exc:
            fail("BadSpec", f"{exc}; the previous histograms keep running", "Configure")
        old = self.hg.config_json()
        self._store_histograms(json.dumps([s.source for s in checked[0]]))
        try:
            self._make_attributes(checked[0])
        except (tango.DevFailed, SpecError) as exc:  # put back what was there, then say why
            why = exc.args[0].desc if isinstance(exc, tango.DevFailed) else str(exc)
            try:
                self._make_attributes(self.hg.engine.specs)
                self._store_histograms(old)
            except (tango.DevFailed, SpecError) as again:
                self.error_stream(f"Configure could not restore the attributes: {again}")
            fail("ConfigureFailed", f"{why}; the previous histograms keep running", "Configure")
        self.hg.configure(histograms, checked)
        self._sync_state()

    def _store_histograms(self, config_json: str) -> None:
        """Write the list to the Histograms property, so a restarted server comes back with it."""
        try:
            db = tango.Util.instance().get_database()
        except tango.DevFailed:  # running without a database (DeviceTestContext)
            return
        if db is None:
            return
        try:
            db.put_device_property(self.get_name(), {"Histograms": [config_json]})
        except tango.DevFailed as exc:
            fail("DatabaseUnreachable", f"Configure could not save the histogram list in the Tango database "
                 f"({exc.args[-1].desc.strip()}); nothing was changed: retry when the database answers",
                 "Configure")  # fmt: skip


def main(args: list[str] | None = None) -> None:
    # the server name comes from argv[0]; under `python -m` that would be the module's name
    run((EventHistogrammer,), args=args or ["EventHistogrammer", *sys.argv[1:]])


if __name__ == "__main__":
    main()
