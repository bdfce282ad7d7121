"""The one process launcher: background processes with a log and a pid file each.

A pid file records the argv it was started with, so `stop` never signals an unrelated
process that happens to reuse the pid after a reboot or a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def expand_home(path: str | Path) -> Path:
    """`~/x` as the home folder's x: a ~ the shell left alone (`--state-dir=~/x`, a quoted
    LIVEHIST_STATE_DIR) made a folder named `~` in the current folder."""
    from livehist.errors import LivehistError

    try:
        return Path(path).expanduser()
    except RuntimeError:  # no HOME (nor passwd entry) to expand it to
        raise LivehistError(
            f"{str(path)!r} starts with ~ and there is no home folder to expand it to (HOME is unset); give the full path"
        ) from None


def free_port() -> int:
    """A free TCP port on loopback (never 10000, the default TANGO_HOST port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 10000:
            return port


_CHILDREN: dict[int, subprocess.Popen] = {}  # the processes this process started, by pid
# in the environment of every process `Managed.start` starts: its record's path, by which it is
# found again when the record is gone (the state dir deleted or emptied while it ran)
MARKER = "LIVEHIST_MANAGED"


@dataclass(frozen=True)
class Managed:
    """A background process known by name inside a state directory."""

    state_dir: Path
    name: str

    @property
    def pidfile(self) -> Path:
        return self.state_dir / "run" / f"{self.name}.json"

    @property
    def log(self) -> Path:
        return self.state_dir / "logs" / f"{self.name}.log"

    def record(self) -> dict | None:
        """The record `start` wrote, or None (missing, unreadable, or not one of ours: hand-edited)."""
        try:
            rec = json.loads(self.pidfile.read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(rec, dict) and type(rec.get("pid")) is int and rec["pid"] > 0
        return rec if ok and isinstance(rec.get("argv"), list) else None

    def pid(self) -> int | None:
        """The pid if the recorded process is alive and is still the one we started."""
        return self.check()[0]

    def check(self) -> tuple[int | None, str]:
        """(pid, "") as `pid`, or (None, why the recorded process is not taken as ours)."""
        rec = self.record()
        if not rec:
            return None, f"no readable record {self.pidfile}"
        pid = int(rec["pid"])
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError as exc:
            return None, f"process {pid} is gone ({exc.strerror})"
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":  # zombie: exited, not yet reaped
            return None, f"process {pid} has exited"
        # the same command line is not enough: after a reboot (or a wrap of the pid space) the pid
        # can belong to another site's server of the same name, which `down` then stopped
        if rec.get("boot_id") not in (None, _boot_id()):
            return (
                None,
                f"the record {self.pidfile} is from before the last reboot; pid {pid} is another process",
            )
        if rec.get("starttime") not in (None, fields[19]):
            return None, f"pid {pid} was reused: the process that has it now started later than ours"
        # an empty cmdline is a process caught mid-exec: still ours
        if cmdline and [c.decode(errors="replace") for c in cmdline] != rec["argv"]:
            return (
                None,
                f"process {pid} runs another command line: {b' '.join(cmdline).decode(errors='replace')}",
            )
        return pid, ""

    def stopped(self) -> int | None:
        """The pid if the recorded process is ours and stopped (SIGSTOP, Ctrl-Z, a debugger): it
        cannot answer until it is continued."""
        pid = self.pid()
        if pid is None:
            return None
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return None
        return pid if state in ("T", "t") else None

    def poll_child(self) -> str | int | None:
        """For a process started by this one: "running", or its exit code once it has exited
        (reaped here); None if the recorded process is not a child of this process."""
        rec = self.record()
        if not rec:
            return None
        child = _CHILDREN.get(int(rec["pid"]))
        if child is None:
            return None
        code = child.poll()
        return "running" if code is None else code

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> int:
        """Start argv in its own session (so it outlives the CLI), output to the log.

        A state dir that cannot take the log or the pid record (a full disk) raises LivehistError:
        before the start for the log; for the record, after stopping the process again (a process
        without a record is one `down` cannot find)."""
        from livehist.errors import LivehistError

        def cannot(path: Path, exc: OSError, after: str = "") -> LivehistError:
            return LivehistError(
                f"cannot write {path}: {exc.strerror or exc}{after}; free some space there or give another "
                "folder with --state-dir"
            )

        log = None
        try:
            self.pidfile.parent.mkdir(parents=True, exist_ok=True)
            self.log.parent.mkdir(parents=True, exist_ok=True)
            log = open(self.log, "ab")  # noqa: SIM115 - closed below
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} start {argv}\n".encode())
            log.flush()
        except OSError as exc:
            if log is not None:
                with contextlib.suppress(OSError):
                    log.close()
            raise cannot(self.log if self.log.parent.is_dir() else self.log.parent, exc) from None
        with log:
            # a crash in native code (cppTango, numba) leaves every thread's Python stack in the log
            env = {
                **(os.environ if env is None else env),
                "PYTHONFAULTHANDLER": "1",
                MARKER: f"{self.pidfile}|{_argv_id(argv)}",
            }
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise LivehistError(_cannot_run(argv[0], exc)) from None
        record = {"pid": proc.pid, "argv": argv, "started": time.time(), "boot_id": _boot_id()}
        try:  # the process's start in clock ticks since boot: with boot_id, its identity
            record["starttime"] = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            pass
        try:
            self.pidfile.write_text(json.dumps(record))
        except OSError as exc:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            with contextlib.suppress(OSError):
                self.pidfile.unlink(missing_ok=True)
            raise cannot(self.pidfile, exc, f"; {self.name} was started and stopped again") from None
        # kept: else subprocess reaps it when a later Popen starts, and its exit code is lost
        _CHILDREN[proc.pid] = proc
        return proc.pid

    def exit_code(self) -> int | None:
        """Exit status of a child we started in this process, if it already exited."""
        code = self.poll_child()
        return None if code == "running" else code

    def stop(self, timeout: float = 10.0) -> bool:
        """SIGTERM the process group, SIGKILL after `timeout`. True if something was stopped."""
        pid = self.pid()
        stopped = False
        if pid is not None:
            _stop(pid, lambda: self.pid() is not None, timeout)
            stopped = True
        # a state dir that cannot be written (read-only disk): the record stays, stale (its process is
        # gone, `pid` no longer takes it for ours); the caller names it
        with contextlib.suppress(OSError):
            self.pidfile.unlink(missing_ok=True)
        return stopped

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])


def _stop(pid: int, alive, timeout: float) -> None:
    """SIGTERM pid's process group, SIGKILL after `timeout`, until `alive()` is False."""
    _signal_group(pid, signal.SIGTERM)
    # a frozen (SIGSTOPped) server handles SIGTERM only once it runs: it waited for the SIGKILL
    _signal_group(pid, signal.SIGCONT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        _reap(pid)
        time.sleep(0.05)
    if alive():
        _signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and alive():
            _reap(pid)
            time.sleep(0.05)
    _reap(pid)


def _argv_id(argv: list[str]) -> str:
    """A short digest of a command line as /proc/PID/cmdline holds it."""
    import hashlib

    return hashlib.sha1(b"\0".join(os.fsencode(a) for a in argv)).hexdigest()[:16]


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (state first), or None if the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


@dataclass(frozen=True)
class Orphan:
    """A process `Managed.start` started in a state dir whose record there is gone."""

    name: str
    pid: int
    starttime: str

    def alive(self) -> bool:
        fields = _stat_fields(self.pid)
        return bool(fields) and fields[0] != "Z" and fields[19] == self.starttime

    def stop(self, timeout: float = 10.0) -> bool:
        if not self.alive():
            return False
        _stop(self.pid, self.alive, timeout)
        return True


def orphans(state_dir: Path) -> list[Orphan]:
    """Processes started for state_dir (their MARKER names a record in its run/) that their record
    does not name: the folder was deleted or emptied while they ran. Only session leaders running
    the command line they were started with count: a server's children inherit the MARKER too."""
    run = Path(state_dir) / "run"
    found = []
    try:
        pids = [int(e.name) for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return []
    prefix = MARKER.encode() + b"="
    for pid in pids:
        fields = _stat_fields(pid)
        if not fields or fields[0] == "Z" or fields[3] != str(pid):
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # gone, or another user's
            continue
        for item in environ.split(b"\0"):
            if item.startswith(prefix):
                where, _, argv_id = os.fsdecode(item[len(prefix) :]).rpartition("|")
                record = Path(where)
                ours = argv_id == _argv_id([os.fsdecode(a) for a in cmdline.split(b"\0")[:-1]])
                if ours and record.parent == run and Managed(Path(state_dir), record.stem).pid() != pid:
                    found.append(Orphan(record.stem, pid, fields[19]))
                break
    return sorted(found, key=lambda o: o.pid)


def _cannot_run(program: str, exc: OSError) -> str:
    """Why `program` could not be run. A script whose interpreter is missing fails with 'No such
    file or directory' naming the script, which is there: name its first line instead."""
    why = f"cannot run {program}: {exc.strerror or exc}"
    if isinstance(exc, FileNotFoundError) and os.path.isfile(program):
        try:
            with open(program, "rb") as f:
                first = f.readline(200).decode(errors="replace").strip()
        except OSError:
            first = ""
        if first.startswith("#!"):
            return (
                f"{why}: its interpreter ({first}) is not there; fix that first line or reinstall the server"
            )
    return why + "; check that it is installed and executable"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _reap(pid: int) -> None:
    child = _CHILDREN.get(pid)
    if child is not None:  # through its Popen, which keeps the exit code
        if child.poll() is not None:
            del _CHILDREN[pid]
        return
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def managed_processes(state_dir: Path) -> list[Managed]:
    run = state_dir / "run"
    if not run.is_dir():
        return []
    return [Managed(state_dir, p.stem) for p in sorted(run.glob("*.json"))]
