"""`livehist view [DEVICE]`: a Taurus panel on a running EventHistogrammer.

TOF and ROI spectra in taurus_pyqtgraph plots, the detector image with a colour scale,
counters, state and status, a metadata summary, Start/Stop/Reset buttons. Everything
follows the device's events (Taurus subscribes; nothing polls at a fixed rate): change events
for counters, state and spectra, and for the image its DATA_READY events, on which the panel
reads it (the device pushes no array of 2048 values or more, so that a frozen client cannot
block it; see devices/histogrammer.py).
The image is redrawn at most 10 times a second whatever the publish rate; for images over
512 pixels per side the panel subscribes to the device's `<image>_preview` (block sums made
in the device), and anything still larger is block-summed here, so the panel never freezes. When the
device goes away Taurus shows it (State UNKNOWN, values invalid) and reconnects by itself.

Plain Taurus works too, for example:
    taurus form 'tango://HOST:PORT/livehist/histogrammer/1/EventRate' '.../EventCount'
    taurus tpg plot 'tango://HOST:PORT/livehist/histogrammer/1/tof'
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import numpy as np

COUNTERS = (
    "EventRate",
    "EventCount",
    "ElapsedTime",
    "DroppedMessageCount",
    "BadMessageCount",
    "UpdateCounter",
)
MAX_DISPLAY = 512  # image pixels per side drawn (about what a panel shows); larger ones are block-summed


NICE = (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)


def nice_top(value: float) -> float:
    """The smallest of 1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k at or above `value` (at least 1).

    Plot ranges and colour levels move in these steps, not with every update: pyqtgraph then
    keeps its axis pictures (regenerating an axis's ticks and labels is a fifth of what a
    panel costs at 10 redraws/s), and the scale stays readable while counts grow."""
    value = max(float(value), 1.0)
    decade = 10.0 ** np.floor(np.log10(value))
    for step in NICE:
        if step * decade >= value * (1 - 1e-12):
            return step * decade
    return 10.0 * decade


def downsample(image: np.ndarray, limit: int = MAX_DISPLAY) -> np.ndarray:
    from livehist.engine.preview import block_sum

    return block_sum(image, limit)


def _full(device: str) -> str:
    if device.startswith("tango://"):
        return device
    import os

    host = os.environ.get("TANGO_HOST")
    return f"tango://{host}/{device}" if host else device


def view(device: str, metadata: str = "livehist/metadata/1", screenshot: Path | None = None,
         seconds: float = 0.0, trace: bool = False) -> int:  # fmt: skip
    from taurus.external.qt import Qt
    from taurus.qt.qtgui.application import TaurusApplication

    app = TaurusApplication.instance() or TaurusApplication(sys.argv[:1], cmd_line_parser=None)
    panel = _make_panel_class()(_full(device), _full(metadata), trace)
    panel.resize(1300, 850)
    panel.show()
    if seconds:

        def finish():
            if screenshot is not None:
                panel.grab().save(str(screenshot))
                print(f"panel picture: {screenshot}", flush=True)
            if trace:
                print(f"image redraws: {panel.redraws}", flush=True)
            app.quit()

        Qt.QTimer.singleShot(int(seconds * 1000), finish)
        # SIGUSR1 finishes early (tests end the run once they saw what they wait for); the
        # ticking timer lets Python run its signal handler while Qt's loop waits
        signal.signal(signal.SIGUSR1, lambda *_: Qt.QTimer.singleShot(0, finish))
        tick = Qt.QTimer()
        tick.timeout.connect(lambda: None)
        tick.start(200)
    app.exec_()
    return 0


def _make_panel_class():
    import pyqtgraph as pg
    import taurus
    from taurus.core.taurusbasetypes import TaurusEventType
    from taurus.external.qt import Qt
    from taurus.qt.qtgui.button import TaurusCommandButton
    from taurus.qt.qtgui.display import TaurusLabel
    from taurus.qt.qtgui.panel import TaurusForm
    from taurus_pyqtgraph import TaurusPlot

    class Panel(Qt.QWidget):
        imageArrived = Qt.pyqtSignal(object)
        stateArrived = Qt.pyqtSignal(str)

        def __init__(self, device: str, metadata: str, trace: bool = False) -> None:
            super().__init__()
            self.device, self.metadata, self.trace = device, metadata, trace
            self._last_state = None
            self._following: dict = {}  # plot -> the y range it was last given (None: not yet)
            self.setWindowTitle(f"livehist: {device}")
            self._pending = None
            self.redraws = 0
            layout = Qt.QGridLayout(self)

            top = Qt.QHBoxLayout()
            for attr in ("State", "Status"):
                label = TaurusLabel()
                label.setModel(f"{device}/{attr}")
                top.addWidget(label, 1 if attr == "State" else 4)
            for cmd in ("Start", "Stop", "Reset"):
                button = TaurusCommandButton(command=cmd, text=cmd)
                button.setModel(device)
                top.addWidget(button)
            layout.addLayout(top, 0, 0, 1, 2)

            self.tof_plot = TaurusPlot()
            layout.addWidget(self.tof_plot, 1, 0)
            self.log_y = Qt.QCheckBox("log y")
            self.log_y.toggled.connect(self._set_log_y)
            top.addWidget(self.log_y)
            self.image_view = pg.PlotWidget(title="detector image")
            self.image_item = pg.ImageItem(axisOrder="row-major")
            self.image_view.addItem(self.image_item)
            self.colour_bar = pg.ColorBarItem(values=(0, 1), colorMap=pg.colormap.get("viridis"))
            self._colour_top = 1.0
            self.colour_bar.setImageItem(self.image_item, insert_in=self.image_view.getPlotItem())
            layout.addWidget(self.image_view, 1, 1)
            self.roi_plot = TaurusPlot()
            layout.addWidget(self.roi_plot, 2, 0)

            side = Qt.QVBoxLayout()
            side.addWidget(self._counters(device))
            meta = TaurusForm()
            meta.setModel([f"{metadata}/{a}" for a in ("Proposal", "Title", "SampleName", "DatasetName")])
            side.addWidget(meta)
            box = Qt.QWidget()
            box.setLayout(side)
            layout.addWidget(box, 2, 1)
            self.configure()
            self.imageArrived.connect(self._draw_image)
            self.stateArrived.connect(self._state_changed)
            try:
                self.state_attr = taurus.Attribute(f"{device}/State")
                self.state_attr.addListener(self._on_state)
                self.state_attr.read(cache=False)
            except Exception:  # no such device, or its server is down: say so, Taurus retries
                self.stateArrived.emit("DOWN")
            self._timer = Qt.QTimer(self)  # coalesces image events: at most 10 redraws per second
            self._timer.timeout.connect(self._tick)
            self._timer.start(100)

        @staticmethod
        def _counters(device: str) -> Qt.QWidget:
            """One TaurusLabel per counter: they change with every publish (10/s), and a
            TaurusForm row is three Taurus widgets (name, value, unit) all handling each event."""
            box = Qt.QGroupBox("counters")
            grid = Qt.QGridLayout(box)
            for row, attr in enumerate(COUNTERS):
                grid.addWidget(Qt.QLabel(attr), row, 0)
                value = TaurusLabel()
                value.setAutoTooltip(False)  # a formatted tooltip per event costs more than the text
                value.setToolTip(f"{device}/{attr}")
                value.setModel(f"{device}/{attr}")
                grid.addWidget(value, row, 1)
            return box

        def configure(self) -> None:
            """Models from the device's histogram list (re-read when the list changes)."""
            try:
                specs = json.loads(
                    taurus.Attribute(f"{self.device}/HistogramConfig").read(cache=False).rvalue
                )
            except Exception:
                specs = []
            spectra = [s["name"] for s in specs if s.get("kind") == "tof"]
            rois = [s["name"] for s in specs if s.get("kind") == "roi"]
            images = [s["name"] for s in specs if s.get("kind") in ("image", "pixel_tof")]
            # x: the N+1 bin edges in the TOF unit (the PNGs' axis), y: the N counts, drawn as steps
            self.tof_plot.setModel([(f"{self.device}/{n}_edges", f"{self.device}/{n}") for n in spectra])
            self.roi_plot.setModel([(f"{self.device}/{n}_edges", f"{self.device}/{n}") for n in rois])
            for plot in (self.tof_plot, self.roi_plot):
                self._follow(plot)
            units = {s["name"]: (s.get("tof") or {}).get("unit", "ns") for s in specs}
            for plot, names in ((self.tof_plot, spectra), (self.roi_plot, rois)):
                for item in plot.getPlotItem().listDataItems():
                    item.opts["stepMode"] = "center"
                unit = ", ".join(sorted({units[n] for n in names}))  # in the text: no SI re-prefixing of "us"
                plot.setLabel("bottom", f"time of flight ({unit})" if unit else "time of flight")
                plot.setLabel("left", "counts")
            if images:
                import tango

                try:  # the device's display-sized block sums, when the image is large
                    names = {n.lower() for n in tango.DeviceProxy(self.device).get_attribute_list()}
                except tango.DevFailed:
                    names = set()
                preview = f"{images[0]}_preview"
                source = preview if preview.lower() in names else images[0]
                if self.trace:
                    print(f"image: {source}", flush=True)
                self._subscribe_image(source)
                self.image_view.setTitle(f"{images[0]} (counts)")

        def _set_log_y(self, on: bool) -> None:
            for plot in (self.tof_plot, self.roi_plot):
                plot.getPlotItem().setLogMode(y=on)
                self._follow(plot)

        def _follow(self, plot) -> None:
            """The panel sets this plot's range itself (see `_fit`); pyqtgraph's autorange
            would move it, and relabel the axes, with every update. A user's zoom or pan
            stops the following; the plot's "A" (auto-range) button starts it again."""
            vb = plot.getPlotItem().getViewBox()
            vb.disableAutoRange()
            self._following[plot] = None
            if not getattr(plot, "_livehist_hooked", False):
                vb.sigRangeChangedManually.connect(lambda *_: self._following.pop(plot, None))
                plot._livehist_hooked = True

        def _fit(self, plot) -> None:
            vb = plot.getPlotItem().getViewBox()
            if any(vb.autoRangeEnabled()):  # the "A" button: back to following
                self._follow(plot)
            if plot not in self._following:
                return
            xs, ys = [], []
            for item in plot.getPlotItem().listDataItems():
                x, y = item.xData, item.yData
                if x is not None and y is not None and len(x) and len(y):
                    xs.append((float(np.min(x)), float(np.max(x))))
                    ys.append(float(np.nanmax(y)) if np.size(y) else 0.0)
            if not xs:
                return
            x0, x1 = min(a for a, _ in xs), max(b for _, b in xs)
            top = nice_top(max(ys) * 1.05)
            log = plot.getPlotItem().ctrl.logYCheck.isChecked()
            y0, y1 = (-0.2, float(np.log10(top))) if log else (0.0, top)
            pad = 0.03 * (y1 - y0)  # the top tick label and the zero line stay inside the frame
            want = (x0, x1, y0 - (0.0 if log else pad), y1 + pad)
            if want != self._following[plot]:
                self._following[plot] = want
                vb.setRange(xRange=want[:2], yRange=want[2:], padding=0.0)

        def _on_state(self, src, evt_type, evt_value) -> None:
            """Follow the device's state; `--trace` prints each change (DOWN when it is gone)."""
            if evt_type == TaurusEventType.Error:
                state = "DOWN"
            elif evt_type in (TaurusEventType.Change, TaurusEventType.Periodic) and evt_value is not None:
                state = str(evt_value.rvalue.name if hasattr(evt_value.rvalue, "name") else evt_value.rvalue)
            else:
                return
            self.stateArrived.emit(state)  # to the GUI thread

        def _state_changed(self, state: str) -> None:
            if state != self._last_state:
                back = self._last_state == "DOWN"
                self._last_state = state
                if self.trace:
                    print(f"state: {state}", flush=True)
                if back or not self.tof_plot.getModel():
                    self.configure()  # the device came back: its histograms may have changed

        def _subscribe_image(self, name: str) -> None:
            """The image's DATA_READY events straight from PyTango, each followed by one read
            as numpy: large images skip Taurus's unit-aware wrapping, which costs more than the
            drawing at 10 updates/s."""
            import tango

            old = getattr(self, "_image_sub", None)
            if old is not None:
                try:
                    old[0].unsubscribe_event(old[1])
                except tango.DevFailed:
                    pass
            try:
                proxy = tango.DeviceProxy(self.device)
                self._image_name = name
                sub = proxy.subscribe_event(name, tango.EventType.DATA_READY_EVENT, self._on_image,
                                            stateless=True)  # fmt: skip
                self._image_sub = (proxy, sub)
                value = proxy.read_attribute(name, extract_as=tango.ExtractAs.Numpy).value
                if value is not None:  # shown now, as a CHANGE subscription's first event would
                    self.imageArrived.emit(value)
            except tango.DevFailed:
                self._image_sub = None  # the device is away; configure() runs again when it is back

        def _on_image(self, event) -> None:  # a PyTango event thread: announced, so read it now
            import tango

            if event.err:
                return
            try:
                value = event.device.read_attribute(self._image_name, extract_as=tango.ExtractAs.Numpy).value
            except tango.DevFailed:  # reconfigured or away: the next announcement or configure() follows
                return
            if value is not None:
                self.imageArrived.emit(value)

        def _draw_image(self, value) -> None:
            self._pending = value  # the latest wins; drawn by the timer

        def _tick(self) -> None:
            for plot in (self.tof_plot, self.roi_plot):
                self._fit(plot)
            self._flush_image()

        def _flush_image(self) -> None:
            if self._pending is None:
                return
            value, self._pending = self._pending, None
            image = downsample(np.asarray(getattr(value, "magnitude", value)))
            top = nice_top(float(image.max()) if image.size else 1.0)
            self.image_item.setImage(image, autoLevels=False, levels=(0, top))
            if top != self._colour_top:  # the colour bar's axis is redrawn only when its top moves
                self._colour_top = top
                self.colour_bar.setLevels((0, top))
            self.redraws += 1

    return Panel


def __getattr__(name: str):
    if name == "Panel":  # Qt classes are made on first use: importing this module needs no display
        return _make_panel_class()
    raise AttributeError(name)
