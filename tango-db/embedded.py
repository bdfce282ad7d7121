"""Find a Tango database at a host:port, or start pytango's sqlite one there."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from pathlib import Path

from livehist.errors import LivehistError
from livehist.site.process import Managed

DEFAULT_TANGO_HOST = "127.0.0.1:10000"
EMBEDDED_NAME = "tango-db"


def parse_tango_host(text: str) -> tuple[str, int]:
    """'host:port' (first of a comma-separated list) -> (host, port), with a clear error."""
    parsed = []
    for entry in text.split(","):  # every entry of a list: the servers read them all
        host, sep, port = entry.strip().rpartition(":")
        if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise LivehistError(
                f"Tango host {text!r} is not HOST:PORT; use for example --tango-host 127.0.0.1:10000"
            )
        if ":" in host or host.startswith("["):  # cppTango: 'TANGO_HOST env. variable syntax incorrect'
            raise LivehistError(
                f"Tango host {text!r} is an IPv6 address, which cppTango cannot use as TANGO_HOST; give the "
                f"host's name or an IPv4 address, e.g. --tango-host localhost:{port}"
            )
        parsed.append((host, int(port)))
    return parsed[0]


def resolve_tango_host(option: str | None) -> str:
    """The Tango host to use, without the blanks around its entries (`--tango-host "$(cat f)"`
    carries a newline): the servers' cppTango cannot parse them ('"35151 " cannot be entirely
    parsed into int') and died at start while the database ran."""
    if option is not None and not option.strip():
        raise LivehistError("--tango-host is empty; give HOST:PORT, e.g. --tango-host 127.0.0.1:10000")
    text = option or os.environ.get("TANGO_HOST", "").strip() or DEFAULT_TANGO_HOST
    return ",".join(entry.strip() for entry in text.split(","))


def is_local(host: str) -> bool:
    """True if host names this machine, where an embedded DB may be started."""
    if host in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        addr = socket.gethostbyname(host)
    except (OSError, UnicodeError):  # UnicodeError: a name idna cannot encode (`a..b`)
        return False
    if addr.startswith("127."):
        return True
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((addr, 0))  # only succeeds for an address of this machine
        return True
    except OSError:
        return False


def probe(host: str, port: int, timeout: float = 3.0) -> str:
    """'tango' (a Tango DB answers), 'closed' (nothing listens), 'other' (a non-Tango
    program listens), 'silent' (a listener that gives no answer in time: a frozen or hung
    database, say) or 'unreachable' (no answer from the host)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except ConnectionRefusedError:
        return "closed"
    except (OSError, UnicodeError):  # UnicodeError: a name idna cannot encode (`a..b`, a typo): a traceback
        return "unreachable"
    result: list[str] = []

    def ask() -> None:
        import tango

        try:
            db = tango.Database(host, port)
            db.get_server_name_list()  # not get_info(): it carries the sqlite path, which pytango
            result.append("tango")  # cannot encode when it holds non-ASCII characters
        except Exception:  # any failure of a listener to speak Tango
            result.append("other")

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(timeout + 1)
    return result[0] if result else "silent"


def _listening_sockets(port: int) -> set[str]:
    """The fd link targets (`socket:[INODE]`) of the TCP sockets of this machine listening on port."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    return inodes


def _holds(pid: int, sockets: set[str]) -> bool:
    """True if process pid has one of these sockets open (OSError if it cannot be looked at)."""
    with os.scandir(f"/proc/{pid}/fd") as fds:
        return any(os.readlink(fd.path) in sockets for fd in fds)


def listener(port: int) -> int | None:
    """The pid of a process of this machine listening on TCP `port` (that this user may see), or None."""
    sockets = _listening_sockets(port)
    if not sockets:
        return None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if _holds(int(entry.name), sockets):
                return int(entry.name)
        except OSError:  # gone, or another user's
            continue
    return None


def listens(pid: int, port: int) -> bool | None:
    """Whether process pid is the one listening on TCP port; None when this cannot be told."""
    sockets = _listening_sockets(port)
    if not sockets:
        return None  # another network namespace, or /proc/net unreadable
    try:
        return _holds(pid, sockets)
    except OSError:
        return None


def embedded(state_dir: Path) -> Managed:
    return Managed(state_dir, EMBEDDED_NAME)


def db_file(state_dir: Path) -> Path:
    return state_dir / "tango_database.sqlite"


def _db_file_verdict(path: Path) -> str:
    """'ok', 'incomplete' (no device in it: a creation that stopped half way) or why it is damaged."""
    import sqlite3

    if path.stat().st_size == 0:
        return "incomplete"
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=2)) as conn:
            (count,) = conn.execute("SELECT count(*) FROM device").fetchone()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):  # in use, not damaged: moving it away would lose a good database
            raise LivehistError(
                f"the embedded Tango database file {path} is locked by another program ({exc}): another "
                "Tango database or an sqlite tool has it open; stop that program, then `livehist up` again"
            ) from None
        return "incomplete" if "no such table" in str(exc) else str(exc)
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return "ok" if count else "incomplete"


def prepare_db_file(state_dir: Path) -> str | None:
    """Make sure the sqlite file is a whole Tango database before the server opens it.

    pytango creates a missing file table by table, so a first start that died half way (a full
    disk, a kill) left a file without its devices, and every later start failed with
    'device dserver/databaseds/2 not defined in the database'. A new file is made here whole
    (built aside, then renamed into place); an incomplete one, which holds nothing, is replaced
    (returns a note saying so); a damaged one is refused, naming the file and the fix."""
    path = db_file(state_dir)
    note = None
    if path.exists():
        verdict = _db_file_verdict(path)
        if verdict == "ok":
            return None
        if verdict != "incomplete":
            raise LivehistError(
                f"the embedded Tango database file {path} is damaged ({verdict}); move it away "
                f"(mv '{path}' '{path}.damaged') and run `livehist up` again: it makes a new one and "
                "loads the configuration into it"
            )
        note = f"replaced {path}: an incomplete database file (no devices in it) left by a start that failed"
    try:
        from tango.databaseds.db_access.sqlite3 import get_create_db_statements
    except ImportError:  # another pytango: let the server create it as it does
        path.unlink(missing_ok=True)
        return note
    import sqlite3

    new = path.with_name(path.name + ".new")
    try:
        new.unlink(missing_ok=True)
        with contextlib.closing(sqlite3.connect(new)) as conn:
            for statement in get_create_db_statements():
                conn.execute(statement)
            conn.commit()
        os.replace(new, path)
    except (OSError, sqlite3.Error) as exc:
        with contextlib.suppress(OSError):
            new.unlink(missing_ok=True)
        raise LivehistError(
            f"cannot create the embedded Tango database file {path}: {getattr(exc, 'strerror', None) or exc}; "
            "free some space there or give another folder with --state-dir"
        ) from None
    return note


def listen_address(host: str) -> str:
    """The address the embedded database listens on for a Tango host of this machine."""
    return "127.0.0.1" if host in ("127.0.0.1", "localhost") else "0.0.0.0"


def privilege_refused(host: str, port: int) -> str | None:
    """Why this process may not listen on a port below 1024 (a user without CAP_NET_BIND_SERVICE),
    which a failing start would report as 'in use'; None when it may, or for a port >= 1024."""
    if port >= 1024:
        return None
    with contextlib.closing(socket.socket()) as s:
        try:
            s.bind((listen_address(host), port))
        except PermissionError:
            return (
                f"port {port} on {host} is below 1024: listening there needs privileges (root, or "
                "CAP_NET_BIND_SERVICE) that this user lacks; choose a port >= 1024, e.g. "
                f"--tango-host {host}:10000 (Tango's usual port)"
            )
        except OSError:
            return None
    return None


def start_embedded(host: str, port: int, state_dir: Path, timeout: float = 30.0) -> Managed:
    """Start pytango's sqlite database server on port; return once it answers."""
    proc = embedded(state_dir)
    env = dict(os.environ, TANGO_HOST=f"{host}:{port}", PYTANGO_DATABASE_NAME=str(db_file(state_dir)))
    bind = listen_address(host)
    argv = [sys.executable, "-m", "tango.databaseds.database", "2", "--host", bind, "--port", str(port)]
    proc.start(argv, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.exit_code()
        if code is not None or proc.pid() is None:
            proc.pidfile.unlink(missing_ok=True)
            this_start = proc.log_tail(60).rsplit("\n--- ", 1)[-1]
            now = probe(host, port, timeout=1.0)
            # taken since the probe (another `up` on the same port at once: its database binds first and
            # ours dies of it, in words that vary), or bound but not listening
            if "Failed to bind" in this_start or now == "tango":
                raise LivehistError(
                    f"port {port} on {host} is in use by another program, so the embedded Tango database "
                    "could not listen there"
                    + (
                        " (a Tango database answers there now: run `livehist up` again to use it)"
                        if now == "tango"
                        else ""
                    )
                    + f"; choose another port, e.g. --tango-host {host}:{port + 1}"
                )
            raise LivehistError(
                f"the embedded Tango database exited (code {code}) while starting on port {port}; "
                f"read {proc.log}:\n{proc.log_tail()}"
            )
        # the database answering must be ours: another one that took the port first answers too,
        # while ours is still on its way to failing to bind
        pid = proc.pid()
        if pid is not None and probe(host, port, timeout=1.0) == "tango" and listens(pid, port) is not False:
            return proc
        time.sleep(0.2)
    proc.stop()
    raise LivehistError(
        f"the embedded Tango database did not answer on {host}:{port} within {timeout:.0f} s; read {proc.log}"
    )
