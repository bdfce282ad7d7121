"""Following Tango devices for the web view without ever holding them up.

One thread per device. It subscribes to the small `UpdateCounter` change event (a number and
the device's publish time); the event callback only notes the time and wakes the thread,
which then reads the histograms (`<image>_preview` for large images) at most `max_rate`
times a second, however often the device publishes. Everything it reads becomes a frame
handed to `emit`, which never blocks (the hub keeps the latest frame per key for each
browser). Once a second it also reads state, status, counters and the histogram list; a
device that does not answer is shown DOWN and followed again when it is back. Where the
event does not arrive (a subscription not yet renewed after a restart) the once-a-second
read sees `UpdateCounter` move and reads the histograms itself.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable

import numpy as np

from livehist.engine import preview
from livehist.views.web.frames import encode
from livehist.views.web.hub import KEY_CONFIG, KEY_METADATA, KEY_STATUS

log = logging.getLogger("livehist.web")

COUNTERS = ("EventRate", "EventCount", "ElapsedTime", "MessageCount", "DroppedMessageCount",
            "BadMessageCount", "UpdateCounter")  # fmt: skip
METADATA = ("Proposal", "Title", "SampleName", "DatasetName")
HEARTBEAT = 1.0  # seconds between reads of state, status and counters

Emit = Callable[[tuple[str, str], bytes], None]


def _number(value) -> float | int | None:
    """A counter for JSON (NaN and infinities, which JSON lacks, become null)."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _metadata_text(value: str) -> str:
    """The MetadataManager's text as written: its string attributes escape what Latin-1 lacks
    (α-Fe2O3 reads \\u03b1-Fe2O3), which the page showed as such."""
    from livehist.errors import LivehistError, from_tango_text

    try:
        return from_tango_text(value)
    except LivehistError:  # not the device's escapes (an older device?): show it as it came
        return value


def _error_text(exc: Exception) -> str:
    import tango

    if isinstance(exc, tango.DevFailed) and exc.args:
        return exc.args[0].desc.strip().splitlines()[0][:300]
    return str(exc)[:300]


class Follower(threading.Thread):
    """Follows one device (`url`: tango://HOST:PORT/dev/name) until `stop()`."""

    def __init__(self, device: str, url: str, dev_class: str, emit: Emit, max_rate: float = 10.0,
                 watched: Callable[[], bool] = lambda: True) -> None:  # fmt: skip
        super().__init__(name=f"livehist-web {device}", daemon=True)
        self.device, self.url, self.dev_class, self.emit = device, url, dev_class, emit
        self.watched = watched  # histograms are read only while a browser looks
        self.min_interval = 1.0 / max_rate
        self._wake = threading.Condition()
        self._stopped = False
        self._kicked = False
        self._t_pub: float | None = None  # device time of the last publish event not yet read
        self._proxy = None
        self._sub = None
        self._config: str | None = None
        self._sources: dict[str, tuple[str, str]] = {}  # histogram -> (attribute to read, "spectrum"/"image")
        self._last_counter: int | None = None
        self._read_counter: int | None = None
        self._last_event = 0.0
        self._state = None
        self.reads = 0  # histogram reads done (tests and the bench look)

    # --- the Tango event thread: note and wake, nothing else -------------------------
    def _on_update(self, event) -> None:
        if event.err or event.attr_value is None:
            return
        with self._wake:
            self._t_pub = event.attr_value.time.totime()
            self._last_event = time.monotonic()
            self._kicked = True
            self._wake.notify()

    def kick(self) -> None:
        """Read the histograms now (a browser arrived and wants current data)."""
        with self._wake:
            self._kicked = True
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()

    # --- the follower thread ----------------------------------------------------------
    def run(self) -> None:
        import tango

        with tango.EnsureOmniThread():
            next_heartbeat = 0.0
            next_read = 0.0
            while True:
                with self._wake:
                    now = time.monotonic()
                    timeout = next_heartbeat - now
                    if self._kicked:
                        timeout = min(timeout, next_read - now)
                    if timeout > 0 and not self._stopped:
                        self._wake.wait(timeout)
                    if self._stopped:
                        break
                    now = time.monotonic()
                    due_read = self._kicked and now >= next_read
                    t_pub = self._t_pub if self._t_pub is not None else time.time()
                    if due_read:
                        self._kicked = False
                try:
                    if now >= next_heartbeat:
                        next_heartbeat = now + HEARTBEAT
                        moved = self._heartbeat()
                        if moved and not due_read and now - self._last_event > 2 * HEARTBEAT:
                            due_read, t_pub = True, time.time()  # no event came: read on our own
                    if due_read and self._proxy is not None and self._sources and self.watched():
                        next_read = time.monotonic() + self.min_interval  # at most max_rate reads/s
                        self._read_histograms(t_pub)
                except Exception as exc:  # the device went away mid-read, or anything else: DOWN
                    self._down(exc)
            self._unsubscribe()

    def _connect(self) -> None:
        import tango

        proxy = tango.DeviceProxy(self.url)
        proxy.set_timeout_millis(3000)
        proxy.ping()
        self._proxy = proxy
        if self.dev_class != "MetadataManager":
            try:  # stateless: Tango renews it by itself after a server restart
                self._sub = proxy.subscribe_event("UpdateCounter", tango.EventType.CHANGE_EVENT,
                                                  self._on_update, stateless=True)  # fmt: skip
            except tango.DevFailed as exc:
                log.warning(
                    "%s: no UpdateCounter events (%s); reading once a second", self.device, _error_text(exc)
                )

    def _unsubscribe(self) -> None:
        if self._sub is not None and self._proxy is not None:
            try:
                self._proxy.unsubscribe_event(self._sub)
            except Exception:  # the device is gone: nothing to undo
                pass
        self._sub = None

    def _down(self, exc: Exception) -> None:
        if self._state != "DOWN":
            log.info("%s: DOWN (%s)", self.device, _error_text(exc))
        self._state = "DOWN"
        if self.dev_class == "MetadataManager":  # its panel follows metadata frames, not status ones
            self.emit((self.device, KEY_METADATA), encode({"kind": "metadata", "device": self.device, "state": "DOWN",
                                                         "status": _error_text(exc), "metadata": {}}))  # fmt: skip
        else:
            self.emit((self.device, KEY_STATUS), encode({"kind": "status", "device": self.device,
                                                       "state": "DOWN", "status": _error_text(exc),
                                                       "counters": {}, "t_pub": None}))  # fmt: skip
        self._config = None  # read again when it is back (its histograms may have changed)

    def _heartbeat(self) -> bool:
        """State, status, counters (and the histogram list); True if UpdateCounter moved."""
        if self._proxy is None:
            self._connect()
        if self.dev_class == "MetadataManager":
            values = self._proxy.read_attributes(["State", "Status", *METADATA])
            state, status = str(values[0].value), values[1].value
            meta = {a: (_metadata_text(v.value) if not v.has_failed else None)
                    for a, v in zip(METADATA, values[2:], strict=True)}  # fmt: skip
            self._state = state
            self.emit((self.device, KEY_METADATA), encode({"kind": "metadata", "device": self.device,
                                                         "state": state, "status": status, "metadata": meta}))  # fmt: skip
            return False
        import tango

        state, status = str(self._proxy.state()), self._proxy.status()  # answer even in FAULT
        try:
            config = self._proxy.read_attribute("HistogramConfig").value
            if config != self._config:
                self._configure(config)
            values = self._proxy.read_attributes(COUNTERS)
        except tango.DevFailed as exc:  # up but unusable (FAULT: a bad property): say why, show no data
            if state not in ("FAULT", "UNKNOWN"):
                raise
            self._state = state
            self.emit((self.device, KEY_STATUS), encode({"kind": "status", "device": self.device, "state": state,
                                                       "status": status or _error_text(exc), "counters": {}}))  # fmt: skip
            return False
        counters = {a: (_number(v.value) if not v.has_failed else None)
                    for a, v in zip(COUNTERS, values, strict=True)}  # fmt: skip
        counter = counters.get("UpdateCounter")
        moved = self._last_counter is not None and counter != self._last_counter
        if self._read_counter is None:
            moved = True  # first sight (or back after DOWN): show what it has
        self._last_counter = counter
        self._state = state
        self.emit((self.device, KEY_STATUS), encode({"kind": "status", "device": self.device, "state": state,
                                                   "status": status, "counters": counters}))  # fmt: skip
        return moved

    def _configure(self, config: str) -> None:
        """The device's histogram list changed (or first sight): what to read, and tell the page."""
        specs = json.loads(config)
        names = {n.lower() for n in self._proxy.get_attribute_list()}
        sources, histograms = {}, []
        for spec in specs:
            name, kind = spec["name"], spec.get("kind")
            if kind in ("image", "pixel_tof"):
                source = f"{name}_preview" if f"{name}_preview".lower() in names else name
                sources[name] = (source, "image")
            else:
                sources[name] = (name, "spectrum")
            edges, unit = None, None
            if kind != "image" and f"{name}_edges".lower() in names:
                edges = self._proxy.read_attribute(f"{name}_edges").value
                unit = (spec.get("tof") or {}).get("unit", "ns")
            entry = {"name": name, "kind": kind, "spec": spec, "unit": unit,
                     "edges": None if edges is None else [float(e) for e in edges]}  # fmt: skip
            if kind == "image":  # the page maps a rectangle drawn on the preview back to pixels
                shape = tuple(spec["pixels"]["shape"])
                entry.update(shape=list(shape), factor=preview.factor(shape))
            histograms.append(entry)
        self._sources = sources
        self._config = config
        self._read_counter = None
        self.emit((self.device, KEY_CONFIG), encode({"kind": "config", "device": self.device,
                                                   "histograms": histograms}))  # fmt: skip

    def _read_histograms(self, t_pub: float) -> None:
        order = list(self._sources)
        values = self._proxy.read_attributes([self._sources[n][0] for n in order])
        self.reads += 1
        for name, value in zip(order, values, strict=True):
            if value.has_failed or value.value is None:
                continue  # removed by a Configure between the list and the read: the next heartbeat sees it
            data = np.asarray(value.value)
            kind = self._sources[name][1]
            header = {"kind": kind, "device": self.device, "name": name, "t_pub": t_pub,
                      "total": int(data.sum())}  # fmt: skip
            if kind == "image":
                if data.ndim != 2:
                    data = data.reshape(1, -1)
                full = data.shape
                data = preview.block_sum(data)  # the device had no preview: never send more than 512/side
                header["binned"] = data.shape != full
            self.emit((self.device, name), encode(header, data))
        self._read_counter = self._last_counter
