"""`livehist view [DEVICE]`: a Taurus panel on a running EventHistogrammer.

TOF and ROI spectra (x in the TOF unit from `<name>_edges`, log y on demand), the detector
image with a colour scale, counters, state and status, a metadata summary
(a TaurusForm), Start/Stop/Reset (Taurus buttons). Only State and Status are polled (twice a
second, in a thread of their own, so that a frozen server shows DOWN): the panel
follows the device's `UpdateCounter` change event (one per publish) and then reads counters,
spectra and image in one `read_attributes` call (the device pushes no array of 2048 values
or more, so that a frozen client cannot block it; see devices/histogrammer.py). A timer draws
the latest update at most 10 times a second whatever the publish rate, and plot ranges and
colour levels move in steps (`nice_top`), so the axes are not redrawn with every update.
For images over 512 pixels per side the panel reads the device's `<image>_preview` (block
sums made in the device), and anything still larger is block-summed here, so the panel never
freezes. When the device goes away or stops answering the panel shows DOWN (counters "-",
plots titled "not answering since ...: last data shown") and picks the device up again by
itself when it is back.

Plain Taurus works too, for example:
    taurus form 'tango://HOST:PORT/livehist/histogrammer/1/EventRate' '.../EventCount'
    taurus tpg plot 'tango://HOST:PORT/livehist/histogrammer/1/tof'
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from livehist.errors import LivehistError

COUNTERS = (
    "EventRate",
    "EventCount",
    "ElapsedTime",
    "DroppedMessageCount",
    "BadMessageCount",
    "UpdateCounter",
)
RATE = 5.0  # redraws (and reads) per second at most: spectra, counters and image
IMAGE_RATE = 5.0  # the image's own limit (the costliest part to read and draw), at most RATE
READ_AT = "\0read_at"  # in a read's values: when it was read (no attribute has this name)
QUIT_S = 30.0  # s after the panel is told to finish (--seconds, SIGUSR1): it has ended by then
WATCH_S = 2.0  # State and Status are read every WATCH_S / 2; no answer within WATCH_S: DOWN


def check_rate(rate: float, option: str = "--rate", default: float = RATE) -> float:
    """A refresh rate of the panel (redraws per second), or a LivehistError naming the fix."""
    if not (isinstance(rate, int | float) and 0.1 <= rate <= 10):
        raise LivehistError(
            f"{option} must be 0.1 to 10 refreshes per second, got {rate!r}; the default is {default:g}"
        )
    return float(rate)


def check_image_rate(rate: float) -> float:
    """The panel's image refresh rate, or a LivehistError naming the fix."""
    return check_rate(rate, "--image-rate", IMAGE_RATE)


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


def check_display(env: dict[str, str] | None = None) -> None:
    """A LivehistError naming the fix when Qt would find no X display: Qt itself aborts the
    process (exit 134, "could not load the Qt platform plugin xcb") after a page of hints."""
    import os
    import re
    import socket

    env = os.environ if env is None else env
    if env.get("QT_QPA_PLATFORM", "xcb").split(":")[0] not in ("", "xcb"):
        return  # offscreen, wayland, vnc, ...: the user chose a platform; Qt checks it
    fix = ("run it in a desktop session, over `ssh -X`, or under `xvfb-run livehist view ...` "
           "(QT_QPA_PLATFORM=offscreen with --seconds and --screenshot takes a picture without a display)")  # fmt: skip
    display = env.get("DISPLAY", "")
    if not display:
        raise LivehistError(f"no display to open the panel on (DISPLAY is not set); {fix}")
    m = re.match(r"^(?:unix)?(?P<host>[^:]*):(?P<n>\d+)(?:\.\d+)?$", display)
    if not m:
        return  # a form we do not know: let Qt try
    host, n = m.group("host"), int(m.group("n"))
    try:
        if host in ("", "unix"):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(3)
                s.connect(f"/tmp/.X11-unix/X{n}")
        else:
            socket.create_connection((host, 6000 + n), timeout=3).close()
    except OSError as exc:
        raise LivehistError(
            f"no X server answers on DISPLAY={display} ({exc.strerror or exc}); {fix}"
        ) from None


def check_tango_host(device: str, wait: float = 5.0) -> None:
    """A LivehistError when the Tango host of `device` is a listener that does not speak Tango
    (or a host that does not answer): the panel then hung for minutes opening its widgets, each
    Taurus model waiting out its own timeouts. A host where nothing listens is let through: the
    panel opens showing DOWN and picks the device up when the database comes back."""
    import os
    import re

    import tango

    m = re.match(r"^tango://([^/]+)/", device)
    where = (m.group(1) if m else os.environ.get("TANGO_HOST", "")).split(",")[0].strip()
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        return  # no TANGO_HOST: Tango's own error follows, shown as DOWN
    answer: list[str] = []

    def ask() -> None:
        try:
            tango.Database(host, int(port)).get_server_name_list()
            answer.append("tango")
        except tango.DevFailed as exc:
            text = " ".join(f"{e.reason} {e.desc}" for e in exc.args)
            answer.append("timeout" if "Timeout" in text or "TimedOut" in text else "down")
        except Exception:
            answer.append("other")

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(wait)
    if not answer or answer[0] in ("timeout", "other"):
        raise LivehistError(
            f"{host}:{port} does not answer as a Tango database within {wait:g} s (a program that is not "
            "a Tango database listens there, or the host does not answer); check TANGO_HOST or the "
            "tango://HOST:PORT/ of the device"
        )


def _full(device: str) -> str:
    if device.startswith("tango://"):
        return device
    import os

    host = os.environ.get("TANGO_HOST")
    return f"tango://{host}/{device}" if host else device


def view(device: str, metadata: str = "livehist/metadata/1", screenshot: Path | None = None,
         seconds: float = 0.0, trace: bool = False, image_rate: float = IMAGE_RATE,
         rate: float = RATE) -> int:  # fmt: skip
    check_rate(rate)
    check_image_rate(image_rate)
    check_display()
    check_tango_host(_full(device))
    from taurus.external.qt import Qt
    from taurus.qt.qtgui.application import TaurusApplication

    app = TaurusApplication.instance() or TaurusApplication(sys.argv[:1], cmd_line_parser=None)
    panel = _make_panel_class()(_full(device), _full(metadata), trace, image_rate, rate)
    panel.resize(1300, 850)
    panel.show()
    if seconds:

        def finish():
            if screenshot is not None:
                panel.grab().save(str(screenshot))
                print(f"panel picture: {screenshot}", flush=True)
            if trace:
                print(f"image redraws: {panel.redraws}", flush=True)
                print(f"redraws: {panel.draws}", flush=True)
                print(f"reads: {panel.reads}", flush=True)
                print(f"read to redraw: {panel.oldest_drawn:.2f} s at most", flush=True)
            # a safety net: should the event loop not end, every thread's stack goes to stderr
            # and the process exits (1) in QUIT_S rather than never
            try:  # to the real stderr: Taurus puts an object without a file number in sys.stderr
                faulthandler.dump_traceback_later(QUIT_S, exit=True, file=sys.__stderr__)
            finally:
                app.quit()

        Qt.QTimer.singleShot(int(seconds * 1000), finish)
        # SIGUSR1 finishes early (tests end the run once they saw what they wait for); the
        # ticking timer lets Python run its signal handler while Qt's loop waits
        signal.signal(signal.SIGUSR1, lambda *_: Qt.QTimer.singleShot(0, finish))
        tick = Qt.QTimer()
        tick.timeout.connect(lambda: None)
        tick.start(200)
    app.exec_()
    # Leave without Python's teardown: destroying Tango proxies and event subscriptions at exit
    # can deadlock with an event callback that arrives meanwhile (the cppTango/PyTango class of
    # hangs around event callbacks and proxy destruction). Seen once in about 25 runs under
    # load: the panel printed its last lines and never exited. Nothing is left to save here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _text(name: str, value) -> str:
    if name == "EventRate":
        return f"{float(value):,.0f} events/s"
    if name == "ElapsedTime":
        return f"{float(value):.1f} s"
    return f"{int(value):,}"


def _make_panel_class():
    import pyqtgraph as pg
    import taurus
    from taurus.core.taurusbasetypes import TaurusEventType
    from taurus.external.qt import Qt
    from taurus.qt.qtgui.button import TaurusCommandButton
    from taurus.qt.qtgui.panel import TaurusForm

    class Panel(Qt.QWidget):
        dataArrived = Qt.pyqtSignal(object)
        stateArrived = Qt.pyqtSignal(str)
        statusArrived = Qt.pyqtSignal(str, str)

        def __init__(
            self,
            device: str,
            metadata: str,
            trace: bool = False,
            image_rate: float = IMAGE_RATE,
            rate: float = RATE,
        ) -> None:
            super().__init__()
            # a display for people: 5 redraws a second follow a live histogram as well as 10, at
            # half the CPU (drawing two 1000-bin spectra was half of the panel's 0.06 of a core at
            # a 10 Hz publish, and on a shared host that CPU comes out of ingestion)
            self._draw_period = 1.0 / check_rate(rate)
            self._drawn_at = -1e9  # monotonic time of the last redraw
            self._read_took = 0.0  # s the last read took (the next one starts that much early)
            self._image_period = max(1.0 / check_image_rate(image_rate), self._draw_period)
            self._image_read_at = -1e9  # monotonic time of the last read that fetched the image
            self.device, self.metadata, self.trace = device, metadata, trace
            self._last_state = None
            self._stale = False  # the plots show the last data of a device that does not answer
            self._image_title = "detector image"
            self._following: dict = {}  # plot -> the range it was last given (absent: the user's own)
            self.setWindowTitle(f"livehist: {device}")
            self._pending = None  # the latest update read from the device, drawn by the timer
            # reads never outpace draws: an update event only marks the device "changed"; one reader
            # thread reads when it has changed and what it read last has been drawn (a read per
            # publish at 10 Hz, of which the timer drew 7, was a third of reads for nothing)
            self._cv = threading.Condition()
            self._changed = None  # the proxy of the last update event not yet read
            self._undrawn = False  # a read is on its way to the screen
            self.reads = 0
            self._sub = None  # (proxy, subscription id) of the UpdateCounter change events
            self._names: list[str] = []  # what one read per update fetches
            self._curves: dict = {}  # spectrum name -> (curve, its TOF edges)
            self._image_name = None
            self._config = None  # the HistogramConfig the curves were made for
            self.redraws = 0  # of the image
            self.draws = 0  # of anything
            self.oldest_drawn = 0.0  # s from a read to its redraw, at most
            self._ticks = 0  # before configure(): its first read may be drawn at once
            layout = Qt.QGridLayout(self)

            top = Qt.QHBoxLayout()
            # plain labels filled by `_watch`: a TaurusLabel reads its device in the GUI thread
            # when an error event comes, which froze the panel 3 s per label on a frozen server
            self.state_label, self.status_label = Qt.QLabel("-"), Qt.QLabel("")
            self.status_label.setWordWrap(True)
            self.status_label.setTextInteractionFlags(Qt.Qt.TextSelectableByMouse)
            top.addWidget(self.state_label, 1)
            top.addWidget(self.status_label, 4)
            for cmd in ("Start", "Stop", "Reset"):
                button = TaurusCommandButton(command=cmd, text=cmd)
                button.setModel(device)
                top.addWidget(button)
            layout.addLayout(top, 0, 0, 1, 2)

            self.tof_plot = pg.PlotWidget()
            self.tof_plot.addLegend()
            layout.addWidget(self.tof_plot, 1, 0)
            self.log_y = Qt.QCheckBox("log y")
            self.log_y.toggled.connect(self._set_log_y)
            top.addWidget(self.log_y)
            self.image_view = pg.PlotWidget(title="detector image")
            self.image_item = pg.ImageItem(axisOrder="row-major")
            self.image_view.addItem(self.image_item)
            self.colour_bar = pg.ColorBarItem(values=(0, 1), colorMap=pg.colormap.get("viridis"))
            self.colour_bar.setImageItem(self.image_item, insert_in=self.image_view.getPlotItem())
            self._colour_top = 1.0
            layout.addWidget(self.image_view, 1, 1)
            self.roi_plot = pg.PlotWidget()
            self.roi_plot.addLegend()
            layout.addWidget(self.roi_plot, 2, 0)

            side = Qt.QVBoxLayout()
            side.addWidget(self._counters())
            meta = TaurusForm()
            meta.setModel([f"{metadata}/{a}" for a in ("Proposal", "Title", "SampleName", "DatasetName")])
            side.addWidget(meta)
            box = Qt.QWidget()
            box.setLayout(side)
            layout.addWidget(box, 2, 1)
            # axes, titles and legends are kept as pictures and only redrawn when they change: each
            # curve update repaints the plot area beside them, and their text was drawn anew each time
            for plot in (self.tof_plot, self.roi_plot, self.image_view):
                item = plot.getPlotItem()
                for part in [*(item.getAxis(a) for a in ("left", "bottom", "top", "right")), item.titleLabel,
                             item.legend]:  # fmt: skip
                    if part is not None:
                        part.setCacheMode(Qt.QGraphicsItem.DeviceCoordinateCache)
            self.dataArrived.connect(self._data)
            self.stateArrived.connect(self._state_changed)
            self.statusArrived.connect(self._status_changed)
            self._watch_now = threading.Event()
            self.configure()
            try:
                self.state_attr = taurus.Attribute(f"{device}/State")
                self.state_attr.addListener(self._on_state)
                self.state_attr.read(cache=False)
            except Exception:  # no such device, or its server is down: say so, Taurus retries
                self.stateArrived.emit("DOWN")
            self._timer = Qt.QTimer(self)  # draws the latest update, at most `rate` times a second
            self._timer.timeout.connect(self._tick)
            self._timer.start(100)
            threading.Thread(target=self._reader, name="livehist-view-reader", daemon=True).start()
            threading.Thread(target=self._watch, name="livehist-view-watch", daemon=True).start()

        def _counters(self) -> Qt.QWidget:
            """Counters as plain labels, filled from the one read per update (six Taurus labels,
            each handling its own change event ten times a second, cost a quarter of the panel)."""
            box = Qt.QGroupBox("counters")
            grid = Qt.QGridLayout(box)
            self._counter_labels = {}
            for row, attr in enumerate(COUNTERS):
                grid.addWidget(Qt.QLabel(attr), row, 0)
                value = Qt.QLabel("-")
                value.setAlignment(Qt.Qt.AlignRight | Qt.Qt.AlignVCenter)
                value.setToolTip(f"{self.device}/{attr}")
                value.setTextInteractionFlags(Qt.Qt.TextSelectableByMouse)
                grid.addWidget(value, row, 1)
                self._counter_labels[attr] = value
            return box

        def configure(self) -> None:
            """Curves, image source and the one subscription, from the device's histogram
            list (again when the device comes back or its histograms change)."""
            import tango

            if self._sub is not None:
                try:
                    self._sub[0].unsubscribe_event(self._sub[1])
                except tango.DevFailed:
                    pass
                self._sub = None
            for plot in (self.tof_plot, self.roi_plot):
                for item in plot.getPlotItem().listDataItems():
                    plot.removeItem(item)
            self._curves, self._names, self._image_name = {}, [], None
            try:
                proxy = tango.DeviceProxy(self.device)
                self._config = proxy.read_attribute("HistogramConfig").value
                specs = json.loads(self._config)
                names = {n.lower() for n in proxy.get_attribute_list()}
            except (tango.DevFailed, ValueError, TypeError):
                return  # the device is away: configure() runs again when it is back
            self._mark_stale(False)
            spectra = [s["name"] for s in specs if s.get("kind") == "tof"]
            rois = [s["name"] for s in specs if s.get("kind") == "roi"]
            images = [s["name"] for s in specs if s.get("kind") in ("image", "pixel_tof")]
            units = {s["name"]: (s.get("tof") or {}).get("unit", "ns") for s in specs}
            colours = ("#ff5050", "#50c0ff", "#ffd040", "#60ff60", "#ff80ff", "#ffffff")
            for plot, group in ((self.tof_plot, spectra), (self.roi_plot, rois)):
                for i, name in enumerate(group):
                    try:  # x: the N+1 bin edges in the TOF unit (the PNGs' axis), y: N counts as steps
                        edges = proxy.read_attribute(f"{name}_edges", extract_as=tango.ExtractAs.Numpy).value
                    except tango.DevFailed:
                        continue
                    curve = plot.plot(edges, np.zeros(max(edges.size - 1, 0)), stepMode="center", name=name,
                                      pen=colours[i % len(colours)])  # fmt: skip
                    self._curves[name] = (curve, edges)
                    if self.trace:
                        print(f"curve {name}: {edges.size - 1} bins", flush=True)
                unit = ", ".join(sorted({units[n] for n in group}))  # in the text: no SI re-prefixing of "us"
                plot.setLabel("bottom", f"time of flight ({unit})" if unit else "time of flight")
                plot.setLabel("left", "counts")
                self._follow(plot)
            if not images:  # none (any more): nothing stale passes for live
                self.image_item.clear()
                self._image_title = "no image histogram"
                self.image_view.setTitle(self._image_title)
                if self.trace:
                    print("image: none", flush=True)
            else:
                preview = f"{images[0]}_preview"  # the device's display-sized block sums of a large image
                self._image_name = preview if preview.lower() in names else images[0]
                if self.trace:
                    print(f"image: {self._image_name}", flush=True)
                self._image_title = f"{images[0]} (counts)"
                self.image_view.setTitle(self._image_title)
            self._names = [*COUNTERS, "HistogramConfig", *self._curves]  # the image: see _read
            try:
                sub = proxy.subscribe_event("UpdateCounter", tango.EventType.CHANGE_EVENT, self._on_update,
                                            stateless=True)  # fmt: skip
                self._sub = (proxy, sub)
            except tango.DevFailed:
                return
            self._read(proxy)  # shown now, not at the next publish

        def _on_update(self, event) -> None:  # a PyTango event thread: never blocks it
            if not event.err:
                with self._cv:
                    self._changed = event.device
                    self._cv.notify()

        def _reader(self) -> None:
            while True:
                with self._cv:
                    self._cv.wait_for(lambda: self._changed is not None and not self._undrawn)
                # read when the next redraw is due, not one redraw period before it (at --rate 0.1
                # every redraw showed data 10 s old, and the image only from the third one on)
                # (as long before it as the last read took: a redraw then comes every period, not
                # every period plus a read, which made --rate 5 draw 3.2 times a second)
                due = self._drawn_at + self._draw_period * 0.95 - self._read_took - time.monotonic()
                if due > 0:
                    time.sleep(due)
                with self._cv:
                    proxy, self._changed = self._changed, None
                    self._undrawn = True
                began = time.monotonic()
                if not self._read(proxy):
                    with self._cv:
                        self._undrawn = False
                self._read_took = min(time.monotonic() - began, self._draw_period / 2)

        def _watch(self) -> None:
            """State and Status, read in this thread (never the GUI's) every WATCH_S / 2, with
            WATCH_S as the timeout: a frozen server (SIGSTOP, a hung host) sends no error event,
            and Taurus kept showing it RUNNING, with its last data, for as long as it was frozen."""
            import tango

            proxy = None
            while True:
                try:
                    if proxy is None:
                        proxy = tango.DeviceProxy(self.device)
                        proxy.set_timeout_millis(int(WATCH_S * 1000))
                    state, status = (a.value for a in proxy.read_attributes(["State", "Status"]))
                    state = str(state)
                except tango.DevFailed as exc:
                    why = (exc.args[0].desc.strip().splitlines() or [""])[0][:200]
                    state, status = "DOWN", f"{self.device} does not answer: {why}"
                self.statusArrived.emit(state, status)
                self._watch_now.wait(WATCH_S / 2)
                self._watch_now.clear()

        def _status_changed(self, state: str, status: str) -> None:
            self.status_label.setText(status)
            self._state_changed(state)

        def _mark_stale(self, stale: bool) -> None:
            """The plots keep the last data of a device that stopped answering, marked so."""
            if stale == self._stale:
                return
            self._stale = stale
            note = f"not answering since {time.strftime('%H:%M:%S')}: last data shown" if stale else None
            for plot in (self.tof_plot, self.roi_plot):
                plot.setTitle(note)
            self.image_view.setTitle(f"{self._image_title}: {note}" if stale else self._image_title)
            if self.trace:
                print(f"plots: {'stale (' + note + ')' if stale else 'live'}", flush=True)

        def _read(self, proxy) -> bool:
            import tango

            names, now = list(self._names), time.monotonic()
            image = self._image_name is not None and now - self._image_read_at >= self._image_period * 0.95
            if image:  # the costliest part to read and draw: at most image_rate times a second
                names.append(self._image_name)
            try:
                values = proxy.read_attributes(names, extract_as=tango.ExtractAs.Numpy)
            except tango.DevFailed:  # reconfigured or away: the next update or configure() follows
                return False
            if image:
                self._image_read_at = now
            got = {v.name.lower(): v.value for v in values if not v.has_failed and v.value is not None}
            got[READ_AT] = now
            self.reads += 1
            with self._cv:  # configure()'s own read too: the reader's next one must not replace it undrawn
                self._undrawn = True
            self.dataArrived.emit(got)
            return True

        def _data(self, got: dict) -> None:
            self._pending = got  # the latest wins; drawn now if a redraw is due, else by the timer
            if self._redraw_due(time.monotonic()):
                self._tick()

        def _redraw_due(self, now: float) -> bool:
            return now - self._drawn_at >= self._draw_period * 0.95

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
            if evt_type == TaurusEventType.Error:  # gone, or a glitch of the event channel: ask it
                self._watch_now.set()
                return
            if evt_type in (TaurusEventType.Change, TaurusEventType.Periodic) and evt_value is not None:
                state = str(evt_value.rvalue.name if hasattr(evt_value.rvalue, "name") else evt_value.rvalue)
            else:
                return
            self.stateArrived.emit(state)  # to the GUI thread

        def _state_changed(self, state: str) -> None:
            if state != self._last_state:
                back = self._last_state == "DOWN"
                self._last_state = state
                self.state_label.setText(state)
                if self.trace:
                    print(f"state: {state}", flush=True)
                if state == "DOWN":
                    for label in self._counter_labels.values():
                        label.setText("-")  # nothing stale passes for live
                    self._mark_stale(True)
                if back or self._sub is None:
                    self.configure()  # the device came back: its histograms may have changed

        def _tick(self) -> None:
            got, now = self._pending, time.monotonic()
            drawn = got is not None and self._redraw_due(now)
            if drawn:
                self._pending, self._drawn_at = None, now
                self.draws += 1
                self.oldest_drawn = max(self.oldest_drawn, now - got[READ_AT])
                try:
                    if not self._stale:  # a read from before the device stopped answering
                        self._draw(got)
                finally:  # drawn (or failed to): the reader may fetch the next update
                    with self._cv:
                        self._undrawn = self._pending is not None  # configure() in _draw read anew
                        self._cv.notify()
            self._ticks += 1
            if drawn or self._ticks % 5 == 0:  # after a draw; else for the "A" button, within 0.5 s
                for plot in (self.tof_plot, self.roi_plot):
                    self._fit(plot)

        def _draw(self, got: dict) -> None:
            if got.get("histogramconfig", self._config) != self._config:  # Configure: new curves, image
                self.configure()
                return
            for attr, label in self._counter_labels.items():
                if attr.lower() in got:
                    label.setText(_text(attr, got[attr.lower()]))
            for name, (curve, edges) in self._curves.items():
                counts = got.get(name.lower())
                if counts is None:
                    continue
                if counts.size + 1 != edges.size:  # read between a Configure and its HistogramConfig
                    continue
                curve.setData(edges, counts, stepMode="center")
            image = got.get((self._image_name or "").lower())
            if image is None or image.ndim != 2:
                return
            image = downsample(np.asarray(image))
            top = nice_top(float(image.max()) if image.size else 1.0)
            # as float32: pyqtgraph then colours it through an 8-bit colour table; integer images
            # take its general ARGB path, a fifth more of the panel's time per image
            self.image_item.setImage(image.astype(np.float32), autoLevels=False, levels=(0, top))
            if top != self._colour_top:  # the colour bar's axis is redrawn only when its top moves
                self._colour_top = top
                self.colour_bar.setLevels((0, top))
            self.redraws += 1

    return Panel


def __getattr__(name: str):
    if name == "Panel":  # Qt classes are made on first use: importing this module needs no display
        return _make_panel_class()
    raise AttributeError(name)
