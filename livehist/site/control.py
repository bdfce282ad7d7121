"""`livehist up / down / status`: bring the configured servers up on a Tango DB and back down."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from livehist.errors import LivehistError
from livehist.site import servers as server_catalogue
from livehist.site.process import Managed, Orphan, expand_home, managed_processes, orphans
from livehist.tangodb import DEFAULT_CONFIG, embedded
from livehist.tangodb import config as dsconfig

Say = Callable[[str], None]


def default_state_dir() -> Path:
    env = os.environ.get("LIVEHIST_STATE_DIR")
    return expand_home(env) if env else Path.home() / ".local" / "state" / "livehist"


def _state_dir(option: Path | str | None) -> Path:
    """The state dir as an absolute path: it is written into the servers' environment, the
    database ($LIVEHIST_STATE_DIR) and state.json, which are read from other working folders."""
    path = (expand_home(option) if option else default_state_dir()).absolute()
    try:
        path.exists()  # a name the file system cannot take raised OSError from every later look at it
    except OSError as exc:
        raise LivehistError(
            f"state dir {path}: {exc.strerror}; give another folder with --state-dir (or LIVEHIST_STATE_DIR)"
        ) from None
    return path


@dataclass
class Site:
    """Where livehist runs: a Tango host, the config applied there, the state dir."""

    tango_host: str
    config_path: Path
    state_dir: Path
    embedded_db: bool = False
    config: dict = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)  # devices `up` left answering in FAULT

    @property
    def host_port(self) -> tuple[str, int]:
        return embedded.parse_tango_host(self.tango_host)

    def url(self, device: str) -> str:
        host, port = self.host_port
        return f"tango://{host}:{port}/{device}"

    def save(self) -> None:
        """Write state.json whole or not at all (a full disk or a crash half way left it torn, and
        the next `up` lost where this state dir's database runs)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(
            {"tango_host": self.tango_host, "config": str(self.config_path), "embedded_db": self.embedded_db},
            indent=1,
        )
        new = self.state_dir / "state.json.new"
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if (self.state_dir / "state.json").read_text() == text:
                return  # unchanged: nothing to write (a full disk need not stop a second `up`)
        try:
            new.write_text(text)
            os.replace(new, self.state_dir / "state.json")
        except OSError as exc:
            new.unlink(missing_ok=True)
            raise LivehistError(
                f"cannot write {self.state_dir / 'state.json'}: {exc.strerror}; free some space there or "
                "give another folder with --state-dir"
            ) from None

    @classmethod
    def from_state(
        cls, state_dir: Path | None, tango_host: str | None = None, config: Path | None = None
    ) -> Site:
        """The site as `up` left it in the state dir, overridden by explicit options."""
        state_dir = _state_dir(state_dir)
        saved = _read_state(state_dir)
        host = tango_host or _saved_host(state_dir, saved) or embedded.resolve_tango_host(None)
        return cls(
            tango_host=host,
            config_path=Path(config or saved.get("config") or DEFAULT_CONFIG),
            state_dir=state_dir,
            embedded_db=bool(saved.get("embedded_db")) or embedded.embedded(state_dir).pid() is not None,
        )

    def server_env(self) -> dict[str, str]:
        return dict(os.environ, TANGO_HOST=self.tango_host, LIVEHIST_STATE_DIR=str(self.state_dir))


def ping(url: str, timeout_ms: int = 1500) -> str | None:
    """The device's state name if it answers, else None."""
    import tango

    try:
        proxy = tango.DeviceProxy(url)
        proxy.set_timeout_millis(timeout_ms)
        return str(proxy.state())
    except tango.DevFailed:
        return None


def server_devices(config: dict) -> dict[str, list[tuple[str, str]]]:
    """server -> [(class, device)], in config order."""
    out: dict[str, list[tuple[str, str]]] = {}
    for server, cls, dev in dsconfig.devices(config):
        out.setdefault(server, []).append((cls, dev))
    return out


def start_levels(servers: dict[str, list[tuple[str, str]]]) -> list[dict[str, list[tuple[str, str]]]]:
    """Servers in the order `up` starts them, as Tango's Starter does with startup levels: those
    without a HistogramSum first, answering before the sums start. A sum subscribes to its members'
    events; a subscription that reaches a server still creating its devices leaves that server's
    event socket half made by cppTango 10.3 (endpoint "tcp://*:", see devices/events.py), and no
    client receives its events until it restarts."""
    first = {s: d for s, d in servers.items() if not any(cls == "HistogramSum" for cls, _ in d)}
    then = {s: d for s, d in servers.items() if s not in first}
    return [level for level in (first, then) if level]


def own_database_trouble(site: Site) -> str | None:
    """Why the embedded database of this state dir, alive at the site's port, does not answer
    (stopped, or hung), or None when no such process runs."""
    host, port = site.host_port
    db = embedded.embedded(site.state_dir)
    pid = db.pid()
    argv = (db.record() or {}).get("argv") or []
    if pid is None or "--port" not in argv or argv[argv.index("--port") + 1 :][:1] != [str(port)]:
        return None  # none of ours runs, or it serves another port
    where = f"the embedded Tango database of {site.state_dir} (pid {pid}, at {host}:{port})"
    if db.stopped():
        return (
            f"{where} is stopped (SIGSTOP, or Ctrl-Z in the terminal that runs it), so nothing can use it; "
            f"`kill -CONT {pid}` resumes it, `livehist down` stops it and the servers"
        )
    return (
        f"{where} runs but does not answer (hung or overloaded); read {db.log}; "
        "`livehist down`, then `livehist up`, restarts it"
    )


def _unreachable_why(host: str) -> str:
    """Why a host gave no answer: a name that does not resolve is a typo, not the network."""
    import socket

    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError) as exc:
        return f"the name {host!r} does not resolve: {getattr(exc, 'strerror', None) or exc}"
    return "no route or timeout"


def _silent_why(host: str, port: int) -> str | None:
    """Why the listener at host:port gives no answer when it is a process of this machine that is
    stopped or a Tango database (named with its pid), else None: a program that does not speak Tango."""
    pid = embedded.listener(port) if embedded.is_local(host) else None
    if pid is None:
        return None
    try:
        command = (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        )
    except OSError:
        return None
    what = f"process {pid} ({command[:120]})"
    if _process_state(pid) in ("T", "t"):
        return (
            f"{what} listens there and is stopped (SIGSTOP, or Ctrl-Z in its terminal), so it cannot answer; "
            f"`kill -CONT {pid}` resumes it"
        )
    if "databaseds" in command.lower():
        return f"the Tango database {what} listens there but gives no answer (hung or overloaded); restart it"
    return None


def ensure_database(site: Site, say: Say) -> None:
    """Use the DB at the Tango host, or start the embedded one there if nothing listens."""
    host, port = site.host_port
    db_proc = embedded.embedded(site.state_dir)
    state = embedded.probe(host, port)
    if state == "tango":
        site.embedded_db = db_proc.pid() is not None
        where = "embedded, started earlier" if site.embedded_db else "site database"
        say(f"Tango database at {host}:{port} ({where})")
        return
    trouble = own_database_trouble(site)
    if trouble:  # not "a program that is not a Tango database", nor a second database on its file
        raise LivehistError(trouble)
    silent = _silent_why(host, port) if state == "silent" else None
    if silent:
        raise LivehistError(
            f"port {port} on {host}: {silent}; or choose another port, e.g. --tango-host {host}:{port + 1}"
        )
    if state == "silent":
        state = "other"
    if state == "other":
        raise LivehistError(
            f"port {port} on {host} is taken by a program that is not a Tango database; "
            f"stop it or choose another port, e.g. --tango-host {host}:{port + 1}"
        )
    if state == "unreachable":
        raise LivehistError(
            f"Tango host {host}:{port} does not answer ({_unreachable_why(host)}); "
            "check TANGO_HOST / --tango-host and the network"
        )
    if not embedded.is_local(host):
        raise LivehistError(
            f"no Tango database answers at {host}:{port} and that host is not this machine, "
            "so no embedded one can be started there; start the site's DatabaseDS or use "
            "--tango-host 127.0.0.1:PORT for the embedded database"
        )
    refused = embedded.privilege_refused(host, port)  # before anything is made for it
    if refused:
        raise LivehistError(refused)
    db_file = embedded.db_file(site.state_dir)
    existed = db_file.exists()
    note = embedded.prepare_db_file(site.state_dir)
    if note:
        say(note)
    say(f"starting the embedded Tango database on {host}:{port} ({db_file})")
    try:
        embedded.start_embedded(host, port, site.state_dir)
    except LivehistError:
        if not existed or note:  # made (or remade from nothing) for a database that never ran
            with contextlib.suppress(OSError):
                db_file.unlink()
        raise
    site.embedded_db = True


class NoLocks(LivehistError):
    """The state dir's file system has no file locks."""


@contextlib.contextmanager
def site_lock(state_dir: Path, say: Say, read_only_ok: bool = False):
    """One `up` or `down` at a time per state dir (two at once started two databases on one
    port and each took the other's record); the second waits for the first.

    `read_only_ok` (for `down`): a lock file that can no longer be written (a disk remounted
    read-only) is locked through a read-only descriptor, else not at all: refusing would leave
    the site running with no way to stop it."""

    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o664)
    except OSError as exc:
        if read_only_ok and state_dir.is_dir():
            try:
                fd = os.open(state_dir / "lock", os.O_RDONLY)
            except OSError:
                say(f"cannot lock {state_dir / 'lock'} ({exc.strerror}): going on without it")
                yield
                return
            with _locked(fd, state_dir, say, lockless_ok=True):
                yield
            return
        what = "is a file, not a folder" if state_dir.exists() and not state_dir.is_dir() else exc.strerror
        raise LivehistError(
            f"state dir {state_dir}: {what}; give a writable folder with --state-dir (or LIVEHIST_STATE_DIR)"
        ) from None
    with _locked(fd, state_dir, say, lockless_ok=read_only_ok):
        yield


@contextlib.contextmanager
def _locked(fd: int, state_dir: Path, say: Say, lockless_ok: bool = False):
    """Hold an exclusive flock on fd (then closed), waiting for another holder unless it is stopped.
    `lockless_ok` (for `down`): on a file system without locks, go on without one, saying so."""
    import fcntl

    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            say(f"another `livehist up` or `down`{f' (pid {holder})' if holder else ''} is working on {state_dir}; "
                "waiting for it")  # fmt: skip
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                holder = _lock_holder(fd)
                if holder and _process_state(holder) in ("T", "t"):
                    # a Ctrl-Z'd `up` in another terminal: every `up` and `down` waited for ever
                    raise LivehistError(
                        f"the `livehist up` or `down` working on {state_dir} (pid {holder}) is stopped (Ctrl-Z in "
                        f"its terminal, or SIGSTOP), so this one would wait for ever; `fg` in that terminal or "
                        f"`kill -CONT {holder}` lets it finish"
                    ) from None
                time.sleep(0.2)
        except OSError as exc:  # ENOLCK (an NFS mount without its lock daemon), EOPNOTSUPP: no locks there
            if not lockless_ok:
                raise NoLocks(
                    f"state dir {state_dir} is on a file system without file locks (flock: {exc.strerror}; "
                    "an NFS mount without its lock daemon, say); give a state dir on a local disk with "
                    "--state-dir (or LIVEHIST_STATE_DIR)"
                ) from None
            say(f"cannot lock {state_dir / 'lock'} ({exc.strerror}): going on without it")
            yield
            return
        with contextlib.suppress(OSError):  # who holds it, for the next one that waits
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def _lock_holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def _process_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _read_state(state_dir: Path) -> dict:
    """state.json as `up` wrote it; {} if missing, torn or not ours (its values checked by type)."""
    try:
        saved = json.loads((state_dir / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict):
        return {}
    return {k: v for k, v in saved.items() if isinstance(v, str if k in ("tango_host", "config") else bool)}


def _saved_host(state_dir: Path, saved: dict) -> str | None:
    """The Tango host this state dir uses. While its embedded database runs, its port is the
    truth: a state.json lost or torn must not send `up` to start a second database on the same
    sqlite file at TANGO_HOST (the first one orphaned, out of reach of `down`)."""
    host = saved.get("tango_host")
    db = embedded.embedded(state_dir)
    argv = (db.record() or {}).get("argv") or []
    if db.pid() is None or "--port" not in argv:
        return host
    port = "".join(argv[argv.index("--port") + 1 :][:1])
    try:
        name, saved_port = embedded.parse_tango_host(host) if host else (None, None)
    except LivehistError:
        name, saved_port = None, None
    if str(saved_port) == port:
        return host
    if name is None:
        bind = "".join(argv[argv.index("--host") + 1 :][:1]) if "--host" in argv else ""
        name = "127.0.0.1" if bind == "127.0.0.1" else socket.gethostname()
    return f"{name}:{port}"


def _host_for(state_dir: Path, option: str | None) -> str:
    """The Tango host of `up`: the option, else TANGO_HOST, else the one this state dir used
    (its embedded database and servers are there). A running embedded database of this state
    dir at another host is refused: two databases on one sqlite file, the first orphaned."""
    saved = _saved_host(state_dir, _read_state(state_dir))
    if option is None and not os.environ.get("TANGO_HOST") and saved:
        return saved
    host = embedded.resolve_tango_host(option)
    if saved and embedded.embedded(state_dir).pid() is not None:
        if embedded.parse_tango_host(host) != embedded.parse_tango_host(saved):
            raise LivehistError(
                f"the embedded Tango database of {state_dir} runs at {saved}, and this asks for {host}; "
                f"use --tango-host {saved}, or `livehist down` first to move the site"
            )
    # servers of this state dir running against another database (a site's): they answer only there,
    # so `up` wrote the config here, then waited out --timeout on them and blamed a device
    elsewhere: dict[str, list[str]] = {}
    for proc in managed_processes(state_dir):
        theirs = _process_tango_host(proc)
        if theirs and not _same_tango_host(theirs, host):
            elsewhere.setdefault(theirs, []).append(proc.name)
    if elsewhere:
        theirs, names = next(iter(elsewhere.items()))
        raise LivehistError(
            f"the servers of {state_dir} ({', '.join(names)}) run against the Tango database at {theirs}, and "
            f"this asks for {host}; use --tango-host {theirs}, or `livehist down` first to move the site"
        )
    return host


def _process_tango_host(proc: Managed) -> str | None:
    """The TANGO_HOST a running process of the state dir was started with, or None."""
    pid = proc.pid()
    if pid is None:
        return None
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"TANGO_HOST="):
            return item[len(b"TANGO_HOST=") :].decode(errors="replace") or None
    return None


def _same_tango_host(a: str, b: str) -> bool:
    """Whether two Tango hosts name one database (localhost:P and 127.0.0.1:P do)."""
    try:
        (ha, pa), (hb, pb) = embedded.parse_tango_host(a), embedded.parse_tango_host(b)
    except LivehistError:
        return a == b
    if pa != pb:
        return False
    if ha.lower() == hb.lower():
        return True
    try:
        return socket.gethostbyname(ha) == socket.gethostbyname(hb)
    except (OSError, UnicodeError):
        return False


def remembered_config(state_dir: Path | str | None) -> Path | None:
    """The configuration a state dir was last brought up with, if not livehist's default: `up`
    without --config takes it (it applied the default, adding livehist's servers to a site's
    database and starting them beside the site's own). LivehistError if that file is gone."""
    state_dir = _state_dir(state_dir)
    saved = _read_state(state_dir).get("config")
    if not saved or Path(saved).absolute() == DEFAULT_CONFIG.absolute():
        return None
    path = Path(saved)
    if not path.is_file():
        raise LivehistError(
            f"{state_dir} was brought up with the configuration {path}, which is gone; give --config: its "
            f"new place, or {DEFAULT_CONFIG} for livehist's default"
        )
    return path


def up(
    tango_host: str | None = None,
    config: Path | None = None,
    state_dir: Path | None = None,
    timeout: float = 90.0,
    say: Say = print,
) -> Site:
    import math

    if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
        # checked before anything starts: -1 started every server and then gave up on them at
        # once; nan waited for ever on a server that never answers
        raise LivehistError(f"--timeout must be a number of seconds > 0, got {timeout}; the default is 90")
    state_dir = _state_dir(state_dir)
    # a bad host or config is refused before the state dir (its lock) is made: nothing changed
    if tango_host is not None or os.environ.get("TANGO_HOST"):
        embedded.parse_tango_host(embedded.resolve_tango_host(tango_host))
    config_path = Path(config).absolute() if config else DEFAULT_CONFIG
    text = dsconfig.read(config_path)  # once: a pipe (`--config /dev/stdin`) gives its text only once
    loaded = dsconfig.load(config_path, state_dir, text)
    _check_own_files(state_dir)
    made = _first_missing(state_dir)  # the folder this `up` makes: removed again if it fails at once
    try:
        with site_lock(state_dir, say):
            began = time.time()
            with _ctrl_c_noted():
                try:
                    site = _up(tango_host, config_path, loaded, text, state_dir, timeout, say)
                    _check_ctrl_c()  # a Ctrl-C whose KeyboardInterrupt something on the way swallowed
                    return site
                except KeyboardInterrupt:
                    _undo_up(state_dir, began, say)
                    raise
                except LivehistError as exc:
                    left = [p.name for p in managed_processes(state_dir)
                            if (p.record() or {}).get("started", 0) >= began and p.pid() is not None]  # fmt: skip
                    if not left:
                        if made is not None:
                            _remove_untouched(state_dir, made)
                        raise
                    raise LivehistError(
                        f"{exc}\nthis `livehist up` left running: {', '.join(left)}; `livehist down --state-dir "
                        f"{state_dir}` stops them, or fix the cause and `livehist up` again"
                    ) from None
    except NoLocks:  # refused before anything: the folder it made goes again
        if made is not None:
            _remove_untouched(state_dir, made)
        raise


OWN_FILES = {
    "lock": "its lock (one `up` or `down` at a time)",
    "state.json": "the site's record (host, config)",
}


def _check_own_files(state_dir: Path, names=tuple(OWN_FILES)) -> None:
    """A folder where `up` keeps a file of its own is named before anything starts: `lock` gave
    'state dir: Is a directory', `state.json` failed once the database ran ('free some space')."""
    for name in names:
        what = OWN_FILES[name]
        path = state_dir / name
        try:
            folder = path.is_dir()
        except OSError:  # an unreadable state dir: site_lock names it
            continue
        if folder:
            raise LivehistError(
                f"{path} is a folder, not a file: livehist keeps {what} there; remove that folder "
                "(if nothing in it is yours) or give another --state-dir"
            )


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of path that does not exist yet (path itself, or a parent), or None."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            return missing
        missing = folder
    return missing


def _remove_untouched(state_dir: Path, made: Path) -> None:
    """Remove a state dir this failed `up` made, if it holds only what `up` puts there first (the
    lock, empty run/ and logs/), then its new empty parents up to `made`."""
    try:
        entries = {e.name for e in os.scandir(state_dir)}
        if not entries <= {"lock", "run", "logs"}:
            return
        for name in ("run", "logs"):
            if name in entries:
                (state_dir / name).rmdir()  # only if empty: OSError otherwise
        (state_dir / "lock").unlink(missing_ok=True)
        for folder in (state_dir, *state_dir.parents):
            folder.rmdir()
            if folder == made:
                break
    except OSError:
        pass  # something else is there: kept


_CTRL_C = threading.Event()  # set by `up`'s SIGINT handler


@contextlib.contextmanager
def _ctrl_c_noted():
    """SIGINT during `up` is noted before it raises KeyboardInterrupt, and the waits check the
    note: a KeyboardInterrupt that something on the way swallows (inside a Tango call) still
    ends `up`. (Once, in a CI run, `up` did not end within 60 s of a Ctrl-C while it waited for a
    frozen server; not reproduced in 17 trials, so this guards the one cause we could think of.)"""
    import signal

    import tango  # noqa: F401 - imported before the handler is set, should it set any of its own

    _CTRL_C.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def noted(signum, frame):
        _CTRL_C.set()
        raise KeyboardInterrupt

    # SIGTERM (`timeout 60 livehist up`, a service manager giving up) is a Ctrl-C too: it killed
    # `up` on the spot, the servers started so far left running unannounced
    previous = {sig: signal.signal(sig, noted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _CTRL_C.clear()  # a later wait of this process (tests call `up` in-process) is not this up's


def _check_ctrl_c() -> None:
    if _CTRL_C.is_set():
        raise KeyboardInterrupt


def _undo_up(state_dir: Path, began: float, say: Say) -> None:
    """Ctrl-C (or SIGTERM) in `up`: stop what this `up` started (servers, then the embedded database), so that
    no half-started site is left running unannounced; what ran before it keeps running."""
    import signal

    main = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGINT, signal.SIGTERM)  # a second Ctrl-C or SIGTERM: the same undo goes on
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals} if main else {}
    try:
        ours = [p for p in managed_processes(state_dir) if (p.record() or {}).get("started", 0) >= began]
        ours.sort(key=lambda p: p.name == embedded.EMBEDDED_NAME)  # the database last
        stopped = [p.name for p in ours if p.stop()]
        if stopped:
            say(f"interrupted: stopped what this `livehist up` had started: {', '.join(stopped)}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _up(
    tango_host: str | None,
    config_path: Path,
    loaded: dict,
    text: str,
    state_dir: Path,
    timeout: float,
    say: Say,
) -> Site:
    site = Site(
        tango_host=_host_for(state_dir, tango_host),
        # absolute: `status` and the next `up` read it from state.json in other working folders
        config_path=config_path,
        state_dir=state_dir,
        config=loaded,
    )
    site.host_port  # noqa: B018 - validates the host before anything starts
    # their database would be taken for a site's, their servers for running ones: out of reach for good
    left = orphans(state_dir)
    if left:
        raise LivehistError(_orphans_message(state_dir, left))
    if not config_path.is_file():  # a pipe: `status` and the next `up` read the copy kept here
        kept = state_dir / "config-applied.json"
        try:
            kept.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise LivehistError(
                f"cannot write {kept}: {exc.strerror}; free some space there or give another folder with --state-dir"
            ) from None
        say(f"configuration {config_path} is not a file: kept as {kept}")
        site.config_path = kept
    ensure_database(site, say)
    site.save()
    host, port = site.host_port
    calls = dsconfig.apply(site.config, host, port, site.config_path, say=say)
    say(f"configuration {site.config_path}: {calls} database changes" if calls else
        f"configuration {site.config_path}: database already up to date")  # fmt: skip
    adopted: set[str] = set()  # alive but not answering: starting, or dying (just killed)
    for level in start_levels(server_devices(site.config)):
        started: dict[str, Managed] = {}
        for server, devs in level.items():
            frozen = Managed(site.state_dir, server.replace("/", "-")).stopped()
            if frozen is not None:  # cannot answer: do not spend the pings' timeouts and --timeout on it
                raise LivehistError(_frozen_message(server, frozen))
            missing = [dev for _, dev in devs if not ping(site.url(dev))]
            if not missing:
                say(f"{server}: already running")
                continue
            if len(missing) < len(devs) or ping(site.url(f"dserver/{server}")):
                # a running server exports the devices it had at start: new ones need a restart
                deadline = time.monotonic() + 5  # unless it is still exporting them
                while missing and time.monotonic() < deadline:
                    time.sleep(0.5)
                    missing = [dev for dev in missing if not ping(site.url(dev), 500)]
                if not missing:
                    say(f"{server}: already running")
                    continue
                raise LivehistError(
                    f"server {server} is running without {', '.join(missing)} (added by {site.config_path}); "
                    f"a running server does not pick up new devices: restart it (`livehist down`, then `livehist up`, "
                    f"or the command RestartServer of dserver/{server})"
                )
            proc = Managed(site.state_dir, server.replace("/", "-"))
            if proc.pid() is None:
                proc.start(server_catalogue.argv(server), env=site.server_env())
                say(f"{server}: started (log {proc.log})")
            else:
                adopted.add(server)
                say(
                    f"{server}: its process is alive but does not answer yet; waiting for it (log {proc.log})"
                )
            started[server] = proc
        wait_ready(site, started, timeout, say, adopted)
    from livehist.site import sardana_setup

    sardana_setup.ensure(site, say)
    _settle(site)
    _, site.faults = print_table(site, say)
    return site


FAULT_GRACE_S = 5.0  # s that a device in FAULT just after `up` is given to leave it before it is reported


def _settle(site: Site, grace: float = FAULT_GRACE_S) -> None:
    """A device can be in FAULT or ALARM for a moment after its start without being broken (a
    HistogramSum that started before its members, and sees them at its next look): `up` waits
    up to `grace` seconds for those to clear before its table reports them (and FAULT exits 4)."""
    devices = [dev for _, _, dev in dsconfig.devices(site.config)]
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _check_ctrl_c()
        if not any(ping(site.url(dev)) in ("FAULT", "ALARM") for dev in devices):
            return
        time.sleep(0.5)


def wait_ready(site: Site, started: dict[str, Managed], timeout: float, say: Say, adopted: set[str]) -> None:
    """Wait until every device of the started servers answers; fail naming device and log.

    A server in `adopted` was alive but not answering when `up` looked: if it exits (it was
    dying, e.g. killed a moment before), it is started once, as a server found down would be."""
    deadline = time.monotonic() + timeout
    pending = {server: [dev for _, dev in devs] for server, devs in server_devices(site.config).items()
               if server in started}  # fmt: skip
    puzzled: set[str] = set()  # our running child that `Managed.pid` did not recognise (said once)
    frozen_since: dict[str, float] = {}
    db = embedded.embedded(site.state_dir)
    while pending:
        _check_ctrl_c()
        if site.embedded_db and db.pid() is None:  # no server can answer now: waiting out --timeout hid why
            host, port = site.host_port
            raise LivehistError(
                f"the embedded Tango database at {host}:{port} stopped while `up` waited for the servers; read "
                f"{db.log}; `livehist up` starts it again"
            )
        for server in list(pending):
            proc = started[server]
            frozen = proc.stopped()
            if frozen is None:
                frozen_since.pop(server, None)
            elif time.monotonic() - frozen_since.setdefault(server, time.monotonic()) > 3:
                # it cannot answer while stopped: waiting out the timeout only hid why
                raise LivehistError(_frozen_message(server, frozen))
            # one look per round: with two, a process found alive by the first and gone by the second
            # (CI: the killed stand-in of a test, its own child) was taken for a start that failed
            pid, why = proc.check()
            if pid is None and server in adopted:
                adopted.discard(server)
                proc.start(server_catalogue.argv(server), env=site.server_env())
                say(f"{server}: started (log {proc.log}); the process found running had exited")
                continue
            if pid is None:
                code = proc.poll_child()
                if code == "running":  # our own child, not exited, so its pid is not reused: keep waiting
                    if server not in puzzled:
                        puzzled.add(server)
                        say(f"{server}: still starting ({why}); waiting for it")
                else:
                    raise LivehistError(
                        f"server {server} exited (code {code}) while starting; read {proc.log}; "
                        f"last lines:\n{proc.log_tail()}"
                    )
            pending[server] = [d for d in pending[server] if not ping(site.url(d), 1000)]
            if not pending[server]:
                del pending[server]
        if not pending:
            return
        if time.monotonic() > deadline:
            server, devs = next(iter(pending.items()))
            raise LivehistError(
                f"device {devs[0]} of server {server} did not answer within {timeout:g} s; "
                f"read {started[server].log} (the server keeps running; `livehist down` stops it)"
            )
        time.sleep(0.3)


def _frozen_message(server: str, pid: int) -> str:
    return (
        f"server {server} (pid {pid}) is stopped (SIGSTOP, or Ctrl-Z in the terminal that runs it), so its "
        f"devices cannot answer; `kill -CONT {pid}` resumes it, `livehist down` stops it"
    )


def _orphans_message(state_dir: Path, left: list[Orphan]) -> str:
    return (
        f"processes that `livehist up` started for {state_dir} still run, but their records there are gone (the "
        f"folder was deleted or emptied while they ran): {', '.join(f'{o.name} (pid {o.pid})' for o in left)}; "
        f"`livehist down --state-dir {state_dir}` stops them, then `livehist up` starts afresh"
    )


def down(state_dir: Path | None = None, say: Say = print) -> list[str]:
    """Stop what `up` started: servers first, then the embedded database."""
    state_dir = _state_dir(state_dir)
    _check_readable(state_dir, "down")
    # a folder `up` never used (`--state-dir ~` by mistake) is left as it was: no lock file made in it
    if not state_dir.is_dir() or not ((state_dir / "run").is_dir() or (state_dir / "lock").exists()):
        left = orphans(state_dir)  # the folder deleted under a running site: no lock to take, nothing to race
        if left:
            return _stop_all([], left, state_dir, say)
        say(f"nothing to stop in {state_dir}")
        return []
    with site_lock(state_dir, say, read_only_ok=True):
        return _down(state_dir, say)


def _check_readable(state_dir: Path, command: str) -> None:
    """Refuse, naming the folder and its owner, a state dir (or its run/) this user cannot read: another
    user's site. It ended in a PermissionError traceback, or in 'nothing to stop' while that site ran."""
    import pwd

    for folder in (state_dir, state_dir / "run"):
        try:
            if folder.is_dir():
                os.listdir(folder)
        except PermissionError as exc:

            def user(uid: int) -> str:
                try:
                    return pwd.getpwuid(uid).pw_name
                except KeyError:
                    return f"uid {uid}"

            owner, me = user(folder.stat().st_uid), user(os.geteuid())
            raise LivehistError(
                f"{folder} belongs to user {owner} and this user ({me}) cannot read it ({exc.strerror}); run "
                f"`livehist {command} --state-dir {state_dir}` as {owner} (e.g. sudo -u {owner}), or give a "
                "state dir of your own with --state-dir"
            ) from None


def _down(state_dir: Path, say: Say) -> list[str]:
    return _stop_all(managed_processes(state_dir), orphans(state_dir), state_dir, say)


def _stop_all(procs: list[Managed], left: list[Orphan], state_dir: Path, say: Say) -> list[str]:
    import signal
    from concurrent.futures import ThreadPoolExecutor

    everything = [*procs, *left]
    db = [p for p in everything if p.name == embedded.EMBEDDED_NAME]
    servers = [p for p in everything if p.name != embedded.EMBEDDED_NAME]
    for proc in db:  # a frozen database held each server's exit (unexport) until its SIGKILL, 10 s each
        frozen = proc.pid if isinstance(proc, Orphan) else proc.stopped()
        if frozen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGCONT)
    stopped = []
    with ThreadPoolExecutor(max(1, min(8, len(servers)))) as pool:  # at once: one slow exit, not the sum
        results = list(pool.map(lambda p: p.stop(), servers))
    for proc, done in [*zip(servers, results, strict=True), *((p, p.stop()) for p in db)]:
        if done:
            stopped.append(proc.name)
            if isinstance(proc, Orphan):
                say(f"stopped {proc.name} (pid {proc.pid}; its record in {state_dir / 'run'} was gone)")
            else:
                say(f"stopped {proc.name}")
    if not stopped:
        say(f"nothing to stop in {state_dir}")
    kept = [p.pidfile for p in procs if p.pidfile.exists()]
    if kept:  # stale once their processes are gone: nothing takes them for running ones
        say(f"could not remove {', '.join(map(str, kept))} (the state dir cannot be written); the processes "
            "are stopped and these records no longer count, remove them once the folder is writable")  # fmt: skip
    return stopped


def status(
    state_dir: Path | None = None,
    tango_host: str | None = None,
    config: Path | None = None,
    say: Say = print,
) -> int:
    """Print devices and states. 0: all up, 1: no database, 3: some device down, 4: all answer
    but some are in FAULT (each with the first line of its Status)."""
    _check_readable(_state_dir(state_dir), "status")  # another user's site: said, not "run up"
    _check_own_files(_state_dir(state_dir), ("state.json",))  # else read as no record: default devices DOWN
    site = Site.from_state(state_dir, tango_host, config)
    host, port = site.host_port
    left = orphans(site.state_dir)
    if left:
        say(_orphans_message(site.state_dir, left))
    found = embedded.probe(host, port)
    trouble = own_database_trouble(site) if found != "tango" else None
    if trouble:
        say(trouble)
        return 1
    silent = _silent_why(host, port) if found == "silent" else None
    if silent:
        say(f"Tango host {host}:{port}: {silent}")
        return 1
    if found == "silent":
        found = "other"
    if found == "other":  # `livehist up` would refuse this port: do not send the user there
        say(f"{host}:{port} is taken by a program that is not a Tango database; check TANGO_HOST / "
            "--tango-host (`livehist up` with another port starts one)")  # fmt: skip
        return 1
    if found == "unreachable":  # `livehist up` cannot help there either
        say(
            f"Tango host {host}:{port} does not answer ({_unreachable_why(host)}); check TANGO_HOST / --tango-host"
        )
        return 1
    if found != "tango":
        unused = not (site.state_dir / "state.json").exists() and not tango_host
        looked = "TANGO_HOST" if os.environ.get("TANGO_HOST") else "the default Tango host"
        say(f"no Tango database answers at {host}:{port}; run `livehist up`" + (
            f" (no `livehist up` has used {site.state_dir}, so this looked at {looked}; "
            "give --state-dir or --tango-host of a site that runs)" if unused else ""))  # fmt: skip
        return 1
    site.config = dsconfig.load(site.config_path, site.state_dir)
    say(f"Tango database {host}:{port} ({'embedded' if site.embedded_db else 'site'})")
    all_up, faults = print_table(site, say)
    last_files(site, say)
    if not all_up:
        return 3
    return 4 if faults else 0


def last_files(site: Site, say: Say) -> None:
    """The last scan Sardana recorded and its files (from the MacroServer's ScanHistory)."""
    import tango

    from livehist.site import sardana_setup

    for _, cls, dev in dsconfig.devices(site.config):
        if cls != "MacroServer" or not ping(site.url(dev)):
            continue
        try:
            history = sardana_setup.environment(tango.DeviceProxy(site.url(dev))).get("ScanHistory") or []
        except (tango.DevFailed, LivehistError):
            return
        if history:
            h = history[-1]
            files = h.get("ScanFile") or []
            files = [files] if isinstance(files, str) else files
            say(f"last scan: #{h.get('serialno')} {h.get('title')} ({h.get('endstatus')}) -> "
                + (", ".join(os.path.join(h.get("ScanDir") or "", f) for f in files) or "no files"))  # fmt: skip


def _histogrammer_info(proxy) -> str:
    rate, count, dropped = (a.value for a in proxy.read_attributes(
        ["EventRate", "EventCount", "DroppedMessageCount"]))  # fmt: skip
    return f"{rate:.3g} events/s, {count:,} events, {dropped:,} dropped"


# device class -> extra info column
STATUS_EXTRAS: dict[str, Callable[[object], str]] = {
    "EventHistogrammer": _histogrammer_info,
    "HistogramSum": _histogrammer_info,
}


def print_table(site: Site, say: Say) -> tuple[bool, list[str]]:
    """Print the device table; (every device answers, the devices in FAULT)."""
    from concurrent.futures import ThreadPoolExecutor

    def row(entry: tuple[str, str, str]) -> tuple[str, str, str, str, str]:
        server, cls, dev = entry
        state = ping(site.url(dev))
        info = ""
        if state is not None and cls in STATUS_EXTRAS:
            import tango

            try:
                info = STATUS_EXTRAS[cls](tango.DeviceProxy(site.url(dev)))
            except tango.DevFailed as exc:
                info = f"({exc.args[0].desc.strip()[:60]})"
        if state == "FAULT":  # why, in its own words
            import tango

            try:
                why = tango.DeviceProxy(site.url(dev)).status().strip().splitlines()
            except tango.DevFailed as exc:
                why = [exc.args[0].desc.strip()]
            info = (why[0][:200] if why else "") or info
        if state is None:  # down, or alive and not answering: say which
            proc = Managed(site.state_dir, server.replace("/", "-"))
            pid = proc.pid()
            if proc.stopped():
                info = f"server process {pid} is stopped (SIGSTOP or Ctrl-Z): `kill -CONT {pid}` resumes it"
            elif pid is not None:
                info = f"server process {pid} runs but does not answer (starting, or busy); log {proc.log}"
        return dev, cls, server, state or "DOWN", info

    # all devices at once: a frozen server costs its own timeouts (about 9 s), not 9 s per device
    devices = dsconfig.devices(site.config)
    with ThreadPoolExecutor(max(1, min(16, len(devices)))) as pool:
        found = list(pool.map(row, devices))
    all_up = all(r[3] != "DOWN" for r in found)
    rows = [("DEVICE", "CLASS", "SERVER", "STATE", "INFO"), *found]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        say("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    return all_up, [r[0] for r in found if r[3] == "FAULT"]
