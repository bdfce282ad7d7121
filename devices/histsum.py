"""HistogramSum: several EventHistogrammers (for example Kafka consumer-group workers) as one.

A thin shell over `livehist.components.histsum.HistogramSum`. It serves the attributes of an
EventHistogrammer under the same names (histograms, `<name>_edges`, counters, presets,
UpdateCounter, HistogramConfig), each the sum over the members, so that Sardana
controllers, the Taurus panel and scripts work against it unchanged; plus `MemberStates`.
The attribute, read and event code is the EventHistogrammer's own (borrowed below), so the
two cannot drift apart.

Members are followed through their UpdateCounter change events (a scalar: a frozen member
cannot block our event thread) and read with a client timeout in the component's threads.

    python -m livehist.devices.histsum INSTANCE
"""

from __future__ import annotations

import json
import logging
import sys
import types
from collections.abc import Callable
from typing import Any

import tango
from livehist.devices import events
from livehist.devices.histogrammer import COUNTERS, STATES, EventHistogrammer, _counter, number_property
from tango import AttrWriteType, DevState
from tango.server import Device, attribute, command, device_property, run

from livehist.components.histogrammer import Update
from livehist.components.histsum import OPTIONAL, MemberError
from livehist.components.histsum import HistogramSum as SumComponent
from livehist.engine.spec import SpecError
from livehist.errors import LivehistError

EH = EventHistogrammer
log = logging.getLogger("livehist.devices.histsum")
# why a member does not answer, in words an operator can act on
REASONS = {
    "DB_DeviceNotDefined": "not defined in the Tango database",
    "API_DeviceNotExported": "its server is not running",
    "API_CantConnectToDevice": "its server is not running",
    "API_DeviceTimedOut": "does not answer in time",
    "API_AttrNotFound": "not an EventHistogrammer (attribute missing)",
    "API_WrongDeviceNameSyntax": "not a device name",
}


def _why(exc: tango.DevFailed) -> str:
    text = " ".join(f"{e.reason} {e.desc}" for e in exc.args)
    if "connection request was delayed" in text:
        return ""  # Tango holds back reconnections for 1 s after a failure: nothing new learnt
    if "API_DeviceTimedOut" in text or "TRANSIENT_CallTimedout" in text or "timeout" in text.lower():
        return "does not answer in time"  # alive but frozen or overloaded: checked before the rest
    for err in exc.args:
        if err.reason in REASONS:
            return REASONS[err.reason]
    return exc.args[0].desc.strip().splitlines()[0][:200]


def fail(reason: str, desc: str, origin: str) -> None:
    tango.Except.throw_exception(f"livehist_{reason}", desc, f"HistogramSum.{origin}")


class TangoMember:
    """A member device behind a proxy with a client timeout; errors become MemberError."""

    def __init__(self, name: str, on_event: Callable[[], None], timeout_s: float) -> None:
        self.name = name
        try:
            self.proxy = tango.DeviceProxy(name)
            self.proxy.set_timeout_millis(int(timeout_s * 1000))
        except tango.DevFailed as exc:
            raise MemberError(_why(exc)) from None
        try:
            self.attributes = {a.lower() for a in self.proxy.get_attribute_list()}
        except tango.DevFailed as exc:
            raise MemberError(_why(exc)) from None
        # stateless: Tango re-subscribes by itself while the member is down or restarting
        self._sub = self.proxy.subscribe_event(
            "UpdateCounter", tango.EventType.CHANGE_EVENT, lambda ev: on_event(), stateless=True
        )

    def read(self, names: list[str]) -> dict[str, Any]:
        names = [n for n in names if n not in OPTIONAL or n.lower() in self.attributes]
        try:
            das = self.proxy.read_attributes(names)
        except tango.DevFailed as exc:
            log.warning("%s: %s", self.name, " / ".join(f"{e.reason}: {e.desc.strip()}" for e in exc.args))
            raise MemberError(_why(exc)) from None
        out = {}
        for da in das:
            if da.has_failed:
                raise MemberError(f"{da.name}: {_why(tango.DevFailed(*da.get_err_stack()))}")
            out[da.name] = da.value
        if "State" in out:
            out["State"] = str(out["State"])
        return out

    def command(self, name: str, arg: Any = None) -> None:
        try:
            self.proxy.command_inout(name, arg) if arg is not None else self.proxy.command_inout(name)
        except tango.DevFailed as exc:
            raise MemberError(exc.args[0].desc.strip()) from None

    def write(self, values: dict[str, Any]) -> None:
        try:
            self.proxy.write_attributes(list(values.items()))
        except tango.DevFailed as exc:
            raise MemberError(exc.args[-1].desc.strip()) from None

    def close(self) -> None:
        try:
            self.proxy.unsubscribe_event(self._sub)
        except tango.DevFailed:
            pass


class HistogramSum(Device):
    """The sum of several EventHistogrammers, presented as one EventHistogrammer."""

    Members = device_property(dtype=(str,), default_value=[], doc="the EventHistogrammer devices to add up")
    # numbers as text, parsed in init_device: a typo ("abc") made Tango's conversion kill the whole
    # server, every HistogramSum in it, instead of leaving this one in FAULT naming the property
    PublishPeriod = device_property(dtype=str, default_value="0.5",
                                    doc="seconds between checks of the members (updates follow their events)")  # fmt: skip
    MemberTimeout = device_property(dtype=str, default_value="1.0",
                                    doc="seconds a member may take to answer before it is marked down")  # fmt: skip

    # the EventHistogrammer's attribute and event code, on our `hg` (same fields: last, state, ...)
    _signatures = staticmethod(EH._signatures)
    _make_attributes = EH._make_attributes
    _attribute = EH._attribute
    _last = EH._last
    _read_dynamic = EH._read_dynamic
    _read_histogram = EH._read_histogram
    _read_edges = EH._read_edges
    _preview = EH._preview
    _read_preview = EH._read_preview
    _read_total = EH._read_total
    _push = EH._push
    _listened = EH._listened
    _status_text = EH._status_text
    _check_conflicts = EH._check_conflicts
    _siblings = EH._siblings
    _class_index = EH._class_index
    _set_events = EH._set_events
    _set_properties = EH._set_properties
    _reader = EH._reader
    _role = EH._role
    _describe = EH._describe
    _announce = EH._announce

    # --- life cycle ------------------------------------------------------------------
    def init_device(self) -> None:
        super().init_device()
        self.hg: SumComponent | None = None
        self.restream = None
        self._dynamic: dict[str, tuple] = getattr(self, "_dynamic", {})
        self._readers: dict[str, object] = getattr(self, "_readers", {})
        self._large: set[str] = getattr(self, "_large", set())  # announced by data-ready events only
        self._preview_cache = None
        self._attrs_stale = False
        self._push_failures = events.PushFailures()
        for name in ("State", "Status", *COUNTERS, "UpdateCounter", "MemberStates", "Provenance"):
            self.set_change_event(name, True, False)
        for name in (*COUNTERS, "UpdateCounter"):
            self.set_archive_event(name, True, False)
        try:
            timeout = number_property("MemberTimeout", self.MemberTimeout, 0, "1.0")
            self.hg = SumComponent(
                list(self.Members),
                lambda name, on_event: TangoMember(name, on_event, timeout),
                publish_period=number_property("PublishPeriod", self.PublishPeriod, 0, "0.5"),
                timeout=timeout,
                on_update=EH._publisher(self),
                thread_context=tango.EnsureOmniThread,
                own_name=self.get_name(),
            )
        except LivehistError as exc:
            self.set_state(DevState.FAULT)
            self.set_status(f"{exc}")
            return
        if getattr(self, "_served", False):  # the Init command (EH's server-wide attribute lock inside)
            self._make_attributes(self.hg.specs)
        self._sync_state()

    def initialize_dynamic_attributes(self) -> None:
        self._served = True
        events.open_event_socket(self.get_name())
        if self.hg is not None:
            self._make_attributes(self.hg.specs)

    def delete_device(self) -> None:
        self._publishing = None  # see EventHistogrammer._publisher
        if self.hg is not None:
            self.hg.close()

    def _sync_state(self) -> None:
        if self.hg is not None:
            self.set_state(STATES[self.hg.state])
            self.set_status(self._status_text(self.hg.status))

    def dev_state(self) -> DevState:
        self._sync_state()
        return self.get_state()

    def dev_status(self) -> str:
        self._sync_state()
        return self.get_status()

    # --- publishing (component threads) ------------------------------------------------
    def _publish(self, update: Update) -> None:
        if (update.configured or self._attrs_stale) and getattr(self, "_served", False):
            # we run under our monitor (EH._publisher); _make_attributes takes the server-wide
            # lock: Tango's attribute definitions are shared by every device of the class
            try:
                self._make_attributes(list(update.snapshot.specs.values()))
                self._attrs_stale = False
            except tango.DevFailed as exc:
                self._attrs_stale = True  # tried again at the next update
                log.warning("attributes not matched to the members' histograms yet: %s", exc.args[0].desc)
        EH._publish(self, update)
        self._push("MemberStates", self.hg.member_states() if self.hg else [])
        if self._listened("Provenance"):
            self._push("Provenance", json.dumps(self.hg.provenance) if self.hg else "{}")

    # --- attributes -------------------------------------------------------------------
    EventCount = _counter("EventCount")
    MessageCount = _counter("MessageCount")
    BadMessageCount = _counter("BadMessageCount")
    DroppedMessageCount = _counter("DroppedMessageCount")
    PulseCount = _counter("PulseCount")
    EventRate = _counter("EventRate")
    ElapsedTime = _counter("ElapsedTime")

    @attribute(dtype=tango.DevLong64, doc="+1 per update of the sum (change events carry it too)")
    def UpdateCounter(self) -> int:
        return self.hg.update_counter if self.hg else 0

    @attribute(dtype=tango.DevLong64, doc="events that could not be pushed since Init (Status says which)")
    def PushFailedCount(self) -> int:
        return self._push_failures.count

    @attribute(
        dtype=bool,
        doc="True while any member acquires, as of the last update of the sum (ALARM can also mean idle "
        "with a member down); False: the sum holds every member's final data",
    )
    def Acquiring(self) -> bool:
        return self.hg.running if self.hg else False

    @attribute(
        dtype=(str,), max_dim_x=4096, doc="'member: STATE' per member (DOWN, MISMATCH with the reason)"
    )
    def MemberStates(self) -> list[str]:
        return self.hg.member_states() if self.hg else []

    @attribute(
        dtype=str, doc="JSON: per member, the Kafka offsets (first, last) per partition its counts cover"
    )
    def Provenance(self) -> str:
        return json.dumps(self.hg.provenance) if self.hg else "{}"

    @attribute(dtype=str, doc="the histogram list the members share, as JSON that Configure accepts")
    def HistogramConfig(self) -> str:
        return self.hg.config_json if self.hg else "[]"

    @attribute(dtype=str, doc="what this device adds up")
    def EventSourceURI(self) -> str:
        return "sum://" + ",".join(m.name for m in self.hg.members) if self.hg else ""

    def _set_preset(self, **preset) -> None:
        try:
            self.hg.set_presets(**preset)
        except LivehistError as exc:
            fail("BadPreset", str(exc), "write preset")

    @attribute(dtype=tango.DevDouble, access=AttrWriteType.READ_WRITE, unit="s",
               doc="every member stops after this accumulating time (0 = no preset)")  # fmt: skip
    def PresetTime(self) -> float:
        return float(self.hg.presets["PresetTime"])

    @PresetTime.write
    def PresetTime(self, value: float) -> None:
        self._set_preset(PresetTime=value)

    @attribute(dtype=tango.DevLong64, access=AttrWriteType.READ_WRITE, unit="events",
               doc="stop every member when the total reaches this many events (0 = no preset)")  # fmt: skip
    def PresetEvents(self) -> int:
        return int(self.hg.presets["PresetEvents"])

    @PresetEvents.write
    def PresetEvents(self, value: int) -> None:
        self._set_preset(PresetEvents=value)

    @attribute(dtype=tango.DevLong64, access=AttrWriteType.READ_WRITE, unit="pulses",
               doc="stop every member when the total reaches this many pulses (0 = no preset)")  # fmt: skip
    def PresetPulses(self) -> int:
        return int(self.hg.presets["PresetPulses"])

    @PresetPulses.write
    def PresetPulses(self, value: int) -> None:
        self._set_preset(PresetPulses=value)

    def read_attr_hardware(self, attr_list) -> None:
        if self.hg is None:
            fail("NotInitialised", self.get_status(), "read")

    # --- commands ---------------------------------------------------------------------
    def _run(self, name: str, action: Callable[[], Any]) -> Any:
        if self.hg is None:
            fail("NotInitialised", self.get_status(), name)
        try:
            return action()
        except SpecError as exc:
            fail("BadSpec", f"{exc}; the previous histograms keep running", name)
        except LivehistError as exc:
            fail(f"{name}Failed", str(exc), name)
        finally:
            self._sync_state()

    @command(doc_in="Start every member (with the presets of the sum)")
    def Start(self) -> None:
        self._run("Start", self.hg.start if self.hg else None)

    @command(doc_in="Stop every member; the sum is final when this returns (harmless when idle)")
    def Stop(self) -> None:
        self._run("Stop", self.hg.stop if self.hg else None)

    @command(doc_in="Reset every member")
    def Reset(self) -> None:
        self._run("Reset", self.hg.reset if self.hg else None)

    @command(dtype_in=str, doc_in="JSON list of histogram specs for every member (all or none)")
    def Configure(self, histograms: str) -> None:
        self._run("Configure", lambda: self.hg.configure(histograms))


# any other private helper the EventHistogrammer's borrowed code calls (it grows with it)
for _name, _fn in vars(EventHistogrammer).items():
    if _name.startswith("_") and not _name.startswith("__") and isinstance(_fn, types.FunctionType):
        if not hasattr(HistogramSum, _name):
            setattr(HistogramSum, _name, _fn)


def main(args: list[str] | None = None) -> None:
    run((HistogramSum,), args=args or ["HistogramSum", *sys.argv[1:]])


if __name__ == "__main__":
    main()
