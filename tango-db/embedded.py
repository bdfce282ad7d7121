"""Find a Tango database at a host:port, or start pytango's sqlite one there."""

from __future__ import annotations

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
        parsed.append((host, int(port)))
    return parsed[0]


def resolve_tango_host(option: str | None) -> str:
    if option is not None and not option.strip():
        raise LivehistError("--tango-host is empty; give HOST:PORT, e.g. --tango-host 127.0.0.1:10000")
    return option or os.environ.get("TANGO_HOST") or DEFAULT_TANGO_HOST


def is_local(host: str) -> bool:
    """True if host names this machine, where an embedded DB may be started."""
    if host in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        addr = socket.gethostbyname(host)
    except OSError:
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
    program listens) or 'unreachable' (no answer from the host)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except ConnectionRefusedError:
        return "closed"
    except OSError:
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
    return result[0] if result else "other"


def embedded(state_dir: Path) -> Managed:
    return Managed(state_dir, EMBEDDED_NAME)


def db_file(state_dir: Path) -> Path:
    return state_dir / "tango_database.sqlite"


def start_embedded(host: str, port: int, state_dir: Path, timeout: float = 30.0) -> Managed:
    """Start pytango's sqlite database server on port; return once it answers."""
    proc = embedded(state_dir)
    env = dict(os.environ, TANGO_HOST=f"{host}:{port}", PYTANGO_DATABASE_NAME=str(db_file(state_dir)))
    bind = "127.0.0.1" if host in ("127.0.0.1", "localhost") else "0.0.0.0"
    argv = [sys.executable, "-m", "tango.databaseds.database", "2", "--host", bind, "--port", str(port)]
    proc.start(argv, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.exit_code()
        if code is not None or proc.pid() is None:
            proc.pidfile.unlink(missing_ok=True)
            raise LivehistError(
                f"the embedded Tango database exited (code {code}) while starting on port {port}; "
                f"read {proc.log}:\n{proc.log_tail()}"
            )
        if probe(host, port, timeout=1.0) == "tango":
            return proc
        time.sleep(0.2)
    proc.stop()
    raise LivehistError(
        f"the embedded Tango database did not answer on {host}:{port} within {timeout:.0f} s; read {proc.log}"
    )
