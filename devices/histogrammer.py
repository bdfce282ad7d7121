"""EventHistogrammer: live histograms of an event stream as Tango attributes.

A thin shell over `livehist.components.histogrammer.Histogrammer`: properties and commands map onto
it, one attribute per histogram is created from its spec, and every publish of the
component becomes change events (histograms, counters, State/Status), data-ready events
(histograms) and archive events (counters). Events are pushed from the publisher thread,
never from inside a read.

    python -m livehist.devices.histogrammer INSTANCE
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tango
from tango import AttrWriteType, DevState
from tango.server import Device, attribute, command, device_property, run

from livehist.components.histogrammer import Histogrammer, Update
from livehist.components.restream import Restreamer
from livehist.engine import preview
from livehist.engine.spec import DEFAULT_MAX_BYTES, HistogramSpec, SpecError, join_property
from livehist.errors import LivehistError, tango_error_text

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


class EventHistogrammer(Device):
    """Histograms of a neutron/X-ray event stream (ev44 over ZeroMQ/Kafka, NeXus replay, simulator)."""

    EventSource = device_property(dtype=str, default_value="sim://",
                                  doc="sim://, zmq://HOST:PORT, zmq+sub://HOST:PORT, nexus:///PATH, kafka://B/T")  # fmt: skip
    Histograms = device_property(dtype=(str,), default_value=[DEFAULT_HISTOGRAMS],
                                 doc="JSON list of histogram specs, or one spec object per line")  # fmt: skip
    PublishPeriod = device_property(dtype=float, default_value=0.5, doc="seconds between publishes")
    MaxHistogramBytes = device_property(dtype=float, default_value=float(DEFAULT_MAX_BYTES),
                                        doc="cap on the memory of all histogram counts, bytes")  # fmt: skip
    RestreamEndpoint = device_property(dtype=str, default_value="",
                                       doc="ZeroMQ PUB address for hs01 histograms, e.g. tcp://*:5560 ('' = off)")  # fmt: skip
    RestreamKafka = device_property(dtype=str, default_value="",
                                    doc="BROKER[,BROKER]/TOPIC for hs01 histograms ('' = off)")  # fmt: skip
    RestreamFormat = device_property(dtype=str, default_value="hs01",
                                     doc="hs01 or da00 (ESS DataArray) for RestreamEndpoint/RestreamKafka")  # fmt: skip
    AccumulatingThreads = device_property(dtype=int, default_value=1,
                                          doc="threads histogramming each large message, each with its own "
                                              "partial counts (memory: this many times the counts)")  # fmt: skip
    MaxQueueBytes = device_property(dtype=float, default_value=256 * 2**20,
                                    doc="cap on raw messages waiting to be histogrammed, bytes")  # fmt: skip

    # --- life cycle ------------------------------------------------------------------
    def init_device(self) -> None:
        super().init_device()
        self.hg: Histogrammer | None = None
        self.restream: Restreamer | None = None
        # attribute name -> signature (format, dims); dynamic attributes outlive an Init
        self._dynamic: dict[str, tuple] = getattr(self, "_dynamic", {})
        self._readers: dict[str, object] = getattr(self, "_readers", {})
        self._preview_cache = None
        for name in ("State", "Status", *COUNTERS, "UpdateCounter"):
            self.set_change_event(name, True, False)
        for name in (*COUNTERS, "UpdateCounter"):
            self.set_archive_event(name, True, False)
        try:
            self.hg = Histogrammer(
                self.EventSource,
                join_property(self.Histograms),
                publish_period=self.PublishPeriod,
                max_histogram_bytes=int(self.MaxHistogramBytes),
                max_queue_bytes=int(self.MaxQueueBytes),
                threads=int(self.AccumulatingThreads),
                on_update=self._publish,
                thread_context=tango.EnsureOmniThread,
                name=self.get_name(),
            )
            self.restream = Restreamer(self.get_name(), self.RestreamEndpoint, self.RestreamKafka,
                                       fmt=self.RestreamFormat)  # fmt: skip
        except (LivehistError, ValueError) as exc:  # a bad PublishPeriod or re-stream target
            if self.hg is not None:
                self.hg.close()
                self.hg = None
            self.set_state(DevState.FAULT)
            self.set_status(f"{exc}; fix the property and run Init")
            return
        if getattr(self, "_served", False):  # the Init command: match attributes to the properties
            self._make_attributes(self.hg.engine.specs)
        self._sync_state()

    def initialize_dynamic_attributes(self) -> None:
        self._served = True
        if self.hg is not None:
            self._make_attributes(self.hg.engine.specs)

    def delete_device(self) -> None:
        if self.hg is not None:
            self.hg.close()  # never waits on the publisher: it may be waiting for our monitor
        if getattr(self, "restream", None) is not None:
            self.restream.close()

    def _sync_state(self) -> None:
        if self.hg is not None:
            self.set_state(STATES[self.hg.state])
            self.set_status(self._with_restream(self.hg.status))

    def _with_restream(self, status: str) -> str:
        """The status, plus what re-streaming fails with (a Kafka broker that does not take it)."""
        problem = self.restream.problem if getattr(self, "restream", None) is not None else None
        return f"{status}; {problem}" if problem else status

    def dev_state(self) -> DevState:
        self._sync_state()
        return self.get_state()

    def dev_status(self) -> str:
        self._sync_state()
        return self.get_status()

    # --- dynamic attributes, one per histogram ------------------------------------------
    @staticmethod
    def _signatures(spec: HistogramSpec) -> dict[str, tuple]:
        shape = spec.data_shape
        out = {spec.name: ("image", shape[1], shape[0]) if len(shape) == 2 else ("spectrum", shape[0], 0)}
        if spec.tof is not None:
            out[f"{spec.name}_edges"] = ("spectrum", spec.tof.bins + 1, 0)
        if spec.kind == "roi":
            out[f"{spec.name}_total"] = ("scalar", 0, 0)
        if len(shape) == 2 and preview.factor(shape) > 1:
            py, px = preview.preview_shape(shape)
            out[f"{spec.name}_preview"] = ("image", px, py)
        return out

    def _make_attributes(self, specs: list[HistogramSpec]) -> None:
        """Add, keep or replace attributes so that they match `specs` (same name + dims: kept)."""
        wanted: dict[str, tuple] = {}
        owner: dict[str, HistogramSpec] = {}
        for spec in specs:
            for name, sig in self._signatures(spec).items():
                wanted[name], owner[name] = sig, spec
        for name, sig in list(self._dynamic.items()):
            if wanted.get(name) != sig:
                self.remove_attribute(name)
                del self._dynamic[name]
        class_attrs = self.get_device_class().get_class_attr()
        for name, sig in wanted.items():
            if name not in self._dynamic:
                # Tango keeps one class-wide definition per name, and a new attribute takes its
                # max dims from it: drop it so that this device's shape wins (the siblings'
                # attributes keep their own copies of their dims)
                if any(a.get_name().lower() == name.lower() for a in class_attrs.get_attr_list()):
                    class_attrs.remove_attr(name, "Attr")
                self.add_attribute(self._attribute(name, sig, owner[name]), self._read_dynamic)
                self._dynamic[name] = sig
                self.set_change_event(name, True, False)
                if not name.endswith(("_edges", "_total", "_preview")):
                    self.set_data_ready_event(name, True)

    def _attribute(self, name: str, sig: tuple, spec: HistogramSpec) -> tango.Attr:
        fmt, dim_x, dim_y = sig
        tof_unit = spec.tof.unit if spec.tof else ""
        read, dtype, unit = self._read_histogram, tango.DevLong64, "counts"
        if name.endswith("_edges") and name != spec.name:
            read, dtype, unit = self._read_edges, tango.DevDouble, tof_unit
            label, doc = (
                f"{spec.name} TOF bin edges",
                f"TOF bin edges of {spec.name} in {tof_unit}, half-open bins",
            )
        elif name.endswith("_total") and name != spec.name:
            read = self._read_total
            label, doc = f"{spec.name} total", f"events inside ROI {spec.name} and its TOF range"
        elif name.endswith("_preview") and name != spec.name:
            read = self._read_preview
            f = preview.factor(spec.data_shape)
            label = f"{spec.name} preview"
            doc = (
                f"{spec.name} as sums of {f}x{f} blocks ({dim_y}x{dim_x}), for displays; {spec.name} is exact"
            )
        else:
            label = name
            doc = {"tof": f"TOF spectrum ({spec.tof.bins if spec.tof else 0} bins, {tof_unit})",
                   "image": f"detector image {dim_y}x{dim_x} (row, col = divmod(pixel - {spec.first_pixel}, nx))",
                   "pixel_tof": f"pixel x TOF map ({dim_y} pixels from {spec.first_pixel} x {dim_x} bins)",
                   "roi": f"TOF spectrum of ROI {spec.name} "
                          f"({spec.roi_pixels.size if spec.roi_pixels is not None else 0} pixels)",
                   }[spec.kind]  # fmt: skip
            doc += f", last {spec.window:g} s" if spec.window else ", cumulative since Reset"
        if fmt == "image":
            attr = tango.ImageAttr(name, dtype, AttrWriteType.READ, dim_x, dim_y)
        elif fmt == "spectrum":
            attr = tango.SpectrumAttr(name, dtype, AttrWriteType.READ, dim_x)
        else:
            attr = tango.Attr(name, dtype, AttrWriteType.READ)
        props = tango.UserDefaultAttrProp()
        props.set_unit(unit)
        props.set_label(label)
        props.set_description(doc)
        attr.set_default_properties(props)
        self._readers[name] = read
        return attr

    def _last(self, name: str, table: str):
        snap = self.hg.last
        try:
            return getattr(snap, table)[name]
        except KeyError:
            fail("Reconfigured", f"histogram {name!r} is not in the current configuration", "read")

    def _read_dynamic(self, attr: tango.Attribute) -> None:
        attr.set_value(self._readers[attr.get_name()](attr))

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
    def _push(self, name: str, value, archive: bool = False) -> None:
        try:
            self.push_change_event(name, value)
            if archive and self._listened(name, tango.EventType.ARCHIVE_EVENT):
                self.push_archive_event(name, value)
        except tango.DevFailed:  # removed by a concurrent Configure, or the monitor timed out
            pass

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
        status = self._with_restream(update.status)
        if state != self.get_state() or status != self.get_status():
            self.set_state(state)
            self.set_status(status)
            self._push("State", state)
            self._push("Status", status)
        for name, counts in snap.counts.items():
            if name not in self._dynamic:
                continue
            if self._listened(name):  # a histogram nobody follows is not converted for nobody
                self._push(name, counts)
            try:
                self.push_data_ready_event(name, update.counter)
            except tango.DevFailed:
                pass
            if snap.specs[name].kind == "roi":
                self._push(f"{name}_total", int(counts.sum()))
            if f"{name}_preview" in self._dynamic and self._listened(f"{name}_preview"):
                self._push(f"{name}_preview", preview.block_sum(counts))
            if update.configured and name in snap.edges:
                self._push(f"{name}_edges", snap.edges[name])
        for name, (_, field, _, _) in COUNTERS.items():
            self._push(name, getattr(snap, field), archive=True)
        self._push("UpdateCounter", update.counter, archive=True)
        if self.restream is not None:
            self.restream.publish(snap, update.state, update.counter)

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
        doc="JSON: Kafka offsets (first, last) counted per partition since Reset, group, checkpoint",
    )
    def KafkaOffsets(self) -> str:
        return json.dumps(self.hg.provenance()) if self.hg else "{}"

    @attribute(dtype=str, doc="the EventSource in use (set the property and run Init to change it)")
    def EventSourceURI(self) -> str:
        return self.hg.source_uri if self.hg else self.EventSource

    def _set_preset(self, **preset) -> None:
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
        if self.hg is None:
            fail("NotInitialised", self.get_status(), "Configure")
        try:
            specs = self.hg.configure(histograms)
        except SpecError as exc:
            fail("BadSpec", f"{exc}; the previous histograms keep running", "Configure")
        self._make_attributes(specs)
        self._store_histograms()
        self._sync_state()

    def _store_histograms(self) -> None:
        """Write the new list to the Histograms property, so a restarted server comes back with it."""
        try:
            db = tango.Util.instance().get_database()
        except tango.DevFailed:  # running without a database (DeviceTestContext)
            return
        if db is not None:
            db.put_device_property(self.get_name(), {"Histograms": [self.hg.config_json()]})


def main(args: list[str] | None = None) -> None:
    # the server name comes from argv[0]; under `python -m` that would be the module's name
    run((EventHistogrammer,), args=args or ["EventHistogrammer", *sys.argv[1:]])


if __name__ == "__main__":
    main()
