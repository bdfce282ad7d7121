"""Sardana controllers that make an EventHistogrammer's histograms channels of measurement groups.

- LivehistCounterTimerController drives the device through its presets: each acquisition
  is Reset, PresetTime (or PresetEvents for a monitor count), Start; the device leaves
  RUNNING by itself when the preset is reached. Axis 1 is the timer (ElapsedTime, s),
  axis 2 the events counted (EventCount), axis 3 the pulses (PulseCount), axis 4 the
  messages dropped (DroppedMessageCount).
- LivehistOneDController / LivehistTwoDController read one histogram each (axis attribute
  `Histogram`, default `tof` / `image`), acquired during the timer's integration. They do
  not start anything themselves: use them with the livehist timer in the same group.
"""

import numpy as np
import tango
from sardana import State
from sardana.pool.controller import (
    CounterTimerController,
    DefaultValue,
    Description,
    FGet,
    FSet,
    Memorize,
    Memorized,
    OneDController,
    TwoDController,
    Type,
)

HISTOGRAMMER = {
    "Histogrammer": {Type: str, DefaultValue: "livehist/histogrammer/1",
                     Description: "the EventHistogrammer device this controller reads"},
}  # fmt: skip
DEVICE_STATES = {tango.DevState.RUNNING: State.Moving, tango.DevState.ALARM: State.Moving,
                 tango.DevState.ON: State.On, tango.DevState.FAULT: State.Fault}  # fmt: skip


class _Device:
    """The histogrammer proxy, created lazily and re-created after the device was down."""

    def __init__(self, name):
        self.name = name
        self._proxy = None
        self.start_error = ""  # why the last StartAll could not start the device ('' = it did)

    def __call__(self):
        if self._proxy is None:
            p = tango.DeviceProxy(self.name)
            p.set_timeout_millis(3000)
            self._proxy = p
        return self._proxy

    def state(self):
        if self.start_error:  # reported once: it ends that acquisition, not the next ones
            error, self.start_error = self.start_error, ""
            return State.Fault, error
        try:
            p = self()
            s = p.state()
        except tango.DevFailed as exc:
            self._proxy = None
            return (
                State.Fault,
                f"{self.name} does not answer: {exc.args[0].desc.strip()}; is its server running?",
            )
        if s == tango.DevState.FAULT:
            return State.Fault, f"{self.name} is in FAULT: {p.status()}"
        if s == tango.DevState.ALARM and not self.acquiring(p):
            return State.On, p.status()  # a HistogramSum with a member down, idle
        return DEVICE_STATES.get(s, State.Unknown), p.status()

    def acquiring(self, p):
        """An EventHistogrammer is in ALARM only while acquiring; a HistogramSum says so itself."""
        try:
            return bool(p.read_attribute("Acquiring").value)
        except tango.DevFailed:
            return True  # an EventHistogrammer (no such attribute)


class LivehistCounterTimerController(CounterTimerController):
    """Timer and counters of an EventHistogrammer (presets end each acquisition)."""

    gender = "EventHistogrammer"
    model = "livehist"
    organization = "livehist"
    MaxDevice = 4
    ctrl_properties = HISTOGRAMMER
    AXES = {1: "ElapsedTime", 2: "EventCount", 3: "PulseCount", 4: "DroppedMessageCount"}

    def __init__(self, inst, props, *args, **kwargs):
        CounterTimerController.__init__(self, inst, props, *args, **kwargs)
        self.device = _Device(self.Histogrammer)
        self.integ_time = None
        self.monitor_count = None
        self._start = False

    def AddDevice(self, axis):
        if axis not in self.AXES:
            raise ValueError(
                f"axis {axis}: livehist counters are 1 timer, 2 events, 3 pulses, 4 dropped messages"
            )

    def DeleteDevice(self, axis):
        pass

    def LoadOne(self, axis, value, repetitions, latency_time):
        if repetitions != 1:
            raise ValueError("livehist counts one acquisition per start (software synchronisation)")
        # 0 (or NaN) is no preset at all: the device would count for ever and the scan never end.
        # Refused through StartAll's Fault state: a raise here leaves Sardana 3.7's measurement group
        # MOVING for ever (the Door stays RUNNING, the next scan hangs too)
        self.load_error = (
            f"integration time {value}: give seconds (> 0) or a monitor count of events (< 0), e.g. ascan ... 0.1"
            if not value or value != value
            else ""
        )
        if value > 0:
            self.integ_time, self.monitor_count = value, None
        else:
            self.integ_time, self.monitor_count = None, int(-value)

    def PreStartAll(self):
        self._start = False
        self.device.start_error = ""

    def PreStartOne(self, axis, value=None):
        return True

    def StartOne(self, axis, value=None):
        self._start = True

    def StartAll(self):
        if not self._start:
            return
        if getattr(self, "load_error", ""):
            self.device.start_error = self.load_error  # this acquisition ends in Fault at once
            return
        # A failure here is reported as the channels' Fault state, never raised: Sardana 3.7 leaves
        # a software-synchronised measurement group MOVING for ever after a StartAll that raised,
        # and the next scan then hangs (seen when the histogrammer died between two points).
        try:
            p = self.device()
            if p.state() in (tango.DevState.RUNNING, tango.DevState.ALARM):
                p.Stop()
            p.Reset()
            if self.integ_time is not None:
                p.write_attributes([("PresetEvents", 0), ("PresetTime", float(self.integ_time))])
            else:
                p.write_attributes([("PresetTime", 0.0), ("PresetEvents", int(self.monitor_count))])
            p.Start()
        except tango.DevFailed as exc:
            self.device._proxy = None
            self.device.start_error = (
                f"{self.device.name} could not start: {exc.args[0].desc.strip()}; is its server running?"
            )

    def StateOne(self, axis):
        return self.device.state()

    def ReadOne(self, axis):
        return self.device().read_attribute(self.AXES[axis]).value

    def AbortOne(self, axis):
        try:
            self.device().Stop()
        except tango.DevFailed:
            pass  # a device that is gone acquires nothing


class _Reader:
    """Common part of the 1D and 2D readers: one histogram per axis, by name."""

    axis_attributes = {
        "Histogram": {Type: str, FGet: "getHistogram", FSet: "setHistogram", Memorize: Memorized,
                      Description: "name of the histogram this channel reads"},
    }  # fmt: skip

    DEFAULT = "tof"  # the histogram axis 1 reads

    def __init__(self, inst, props, *args, **kwargs):
        super().__init__(inst, props, *args, **kwargs)  # OneDController or TwoDController (MRO)
        self.device = _Device(self.Histogrammer)
        self.names = {}
        self.default = self.DEFAULT

    def AddDevice(self, axis):
        self.names.setdefault(axis, self.default if axis == 1 else f"{self.default}{axis}")

    def DeleteDevice(self, axis):
        self.names.pop(axis, None)

    def getHistogram(self, axis):
        return self.names[axis]

    def setHistogram(self, axis, value):
        self.names[axis] = value

    def LoadOne(self, axis, value, repetitions, latency_time):
        pass

    def StartOne(self, axis, value=None):
        pass

    def StateOne(self, axis):
        return self.device.state()

    def ReadOne(self, axis):
        return np.asarray(self.device().read_attribute(self.names[axis]).value)

    def AbortOne(self, axis):
        pass  # the timer's controller stops the device

    def GetAxisPar(self, axis, par):
        if par == "shape":  # the value's dims: max dims are only a generous upper bound
            value = self.device().read_attribute(self.names[axis])
            return [value.dim_x] if value.dim_y == 0 else [value.dim_x, value.dim_y]
        return super().GetAxisPar(axis, par)


class LivehistOneDController(_Reader, OneDController):
    """A 1D histogram (tof, roi) of an EventHistogrammer as a OneD channel."""

    gender = "EventHistogrammer"
    model = "livehist"
    organization = "livehist"
    MaxDevice = 16
    ctrl_properties = HISTOGRAMMER
    DEFAULT = "tof"


class LivehistTwoDController(_Reader, TwoDController):
    """A 2D histogram (image, pixel_tof) of an EventHistogrammer as a TwoD channel."""

    gender = "EventHistogrammer"
    model = "livehist"
    organization = "livehist"
    MaxDevice = 16
    ctrl_properties = HISTOGRAMMER
    DEFAULT = "image"
