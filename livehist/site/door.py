"""Run Sardana macros through a Door from a script, streaming their output."""

from __future__ import annotations

import json
import pickle
import re
import threading
import time
from collections.abc import Callable

from livehist.errors import LivehistError

START_S = 30.0  # s a macro may take to show it started; after that the Door's state alone decides


class Door:
    """A Door to run macros on; output lines go to `say` as they arrive (change events)."""

    def __init__(self, url: str, say: Callable[[str], None] | None = print) -> None:
        import tango

        self.url = url
        self.proxy = tango.DeviceProxy(url)
        self.say = say
        self._subs: list[int] = []
        self._live = False  # subscribing delivers the current (old) value first: skip it
        # RunMacro only queues the macro: the Door turns RUNNING when it starts, a moment later (on
        # a loaded machine, later than any fixed wait; the end of the previous macro was then taken
        # for this one's). The Door's MacroStatus events name each macro by its id when it starts.
        self._started: set[str] = set()  # ids of macros reported started since `run` armed
        self._news = threading.Condition()
        self._state_seen = None  # the last State event's value
        self._armed = False  # State events count for the macro being run (see `run`)
        self._running_seen = False
        try:
            for attr, callback in (("MacroStatus", self._on_status), ("State", self._on_state)):
                self._subs.append(self.proxy.subscribe_event(attr, tango.EventType.CHANGE_EVENT, callback))
            self._events = True
        except tango.DevFailed:  # no events from this Door (a firewall on its event ports): a short
            self._events = False  # wait for RUNNING, as before; the end of a slow start can be misjudged
        if say is not None:
            for attr in ("Output", "Warning", "Error"):
                self._subs.append(
                    self.proxy.subscribe_event(attr, tango.EventType.CHANGE_EVENT, self._on_output)
                )
        self._live = True

    def _on_status(self, event) -> None:
        """Note the ids of macros the Door reports started (or further); never raises."""
        try:
            if event.err or event.attr_value is None or not event.attr_value.value:
                return
            data = event.attr_value.value[1]
            statuses = json.loads(bytes(data).decode() if not isinstance(data, str) else data)
            ids = [st["id"] for st in statuses if isinstance(st, dict) and st.get("id")]
        except (ValueError, TypeError, IndexError, KeyError, UnicodeDecodeError):
            return
        with self._news:
            self._started.update(str(mid) for mid in ids)
            self._news.notify_all()

    def _on_state(self, event) -> None:
        import tango

        if event.err or event.attr_value is None:
            return
        with self._news:
            self._state_seen = event.attr_value.value
            if self._armed and self._state_seen == tango.DevState.RUNNING:
                self._running_seen = True
            self._news.notify_all()

    def _on_output(self, event) -> None:
        if not self._live or event.err or event.attr_value is None or event.attr_value.value is None:
            return
        prefix = "" if event.attr_value.name.lower() == "output" else f"{event.attr_value.name}: "
        for line in event.attr_value.value:
            self.say(prefix + line)

    def run(self, argv: list[str], timeout: float = 300.0) -> None:
        """Run one macro to its end; raise LivehistError with the Door's error text if it fails."""
        import tango

        # the previous macro's State events are all in (up to 2 s): a late RUNNING of it must
        # not count for this one
        now = self._state(argv)
        with self._news:
            self._news.wait_for(lambda: self._state_seen == now, 2.0 if self._events else 0.0)
            self._running_seen, self._armed = False, True
            self._started.clear()  # ids restart at a MacroServer restart: only this run's count
        try:
            reply = self.proxy.RunMacro([str(a) for a in argv])
        except tango.DevFailed as exc:
            self._armed = False
            raise LivehistError(f"macro {argv[0]} refused: {exc.args[0].desc.strip()}") from None
        found = re.search(r'\bid="([^"]+)"', reply[0] if reply else "")
        mid = found.group(1) if found else None
        start_wait = START_S if self._events else 0.5
        started, deadline = time.monotonic(), time.monotonic() + timeout
        # this macro has started (its id in a MacroStatus event, a RUNNING State event since
        # RunMacro, or RUNNING read): the Door's state is now about it
        seen = False
        try:
            while True:
                state = self._state(argv)
                if state == tango.DevState.RUNNING:  # RunMacro is refused while RUNNING: this is ours
                    seen = True
                elif seen or time.monotonic() - started > start_wait:
                    break
                if time.monotonic() > deadline:
                    self.proxy.AbortMacro()
                    raise LivehistError(f"macro {' '.join(argv)} did not end within {timeout:.0f} s; aborted")
                if seen:
                    time.sleep(0.05)
                else:
                    with self._news:
                        seen = self._news.wait_for(lambda: self._running_seen or mid in self._started, 0.05)
        except KeyboardInterrupt:  # Ctrl-C: the macro stops too, as in spock (it kept the Door RUNNING)
            self._abort()
            raise
        finally:
            self._armed = False
        if state == tango.DevState.ALARM:
            errors = self.proxy.read_attribute("Error").value or ("(no error text)",)
            raise LivehistError(f"macro {' '.join(argv)} failed: {' '.join(errors).strip()}")

    def _state(self, argv: list[str], patience: float = 60.0):
        """The Door's state, asked again while it does not answer for up to `patience` seconds: a
        Door busy with its macro (a hook waiting on a hung device, a loaded machine) can miss a
        client's 3 s timeout, and giving up then left the macro running under the next one."""
        import tango

        since = time.monotonic()
        while True:
            try:
                return self.proxy.state()
            except tango.DevFailed as exc:
                if time.monotonic() - since > patience:
                    raise LivehistError(
                        f"the Door {self.proxy.dev_name()} has not answered for {patience:.0f} s while running "
                        f"{' '.join(argv)}: {exc.args[-1].desc.strip()}; the macro may still be running "
                        "(see spock, or its AbortMacro command)"
                    ) from None
                time.sleep(0.5)

    def _abort(self, wait: float = 15.0) -> None:
        """Abort the running macro and wait until the Door has stopped it. An abort that comes
        while the macro is still being prepared (its hooks) is not always kept: sent again every
        3 s. A second Ctrl-C stops the waiting (the macro may then run on)."""
        import tango

        say = self.say or (lambda line: None)
        say("aborting the macro (Ctrl-C again to stop waiting)")
        deadline, sent = time.monotonic() + wait, 0.0
        try:
            while time.monotonic() < deadline:
                if time.monotonic() - sent >= 3.0:
                    self.proxy.AbortMacro()
                    sent = time.monotonic()
                time.sleep(0.1)
                if self.proxy.state() != tango.DevState.RUNNING:
                    return
        except (tango.DevFailed, KeyboardInterrupt):
            pass
        say(f"the Door {self.proxy.dev_name()} is still RUNNING: abort it from spock (Ctrl-C) or with its "
            "AbortMacro command before running another macro")  # fmt: skip

    def close(self) -> None:
        for sub in self._subs:
            try:
                self.proxy.unsubscribe_event(sub)
            except Exception:  # the Door may already be gone
                pass
        self._subs.clear()


def set_environment(macroserver_url: str, values: dict) -> None:
    """Set MacroServer environment variables (lists included) through its Environment attribute."""
    import tango

    ms = tango.DeviceProxy(macroserver_url)
    ms.write_attribute("Environment", ("pickle", pickle.dumps({"new": values}, protocol=0)))
