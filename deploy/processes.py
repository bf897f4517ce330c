"""Processes the local stack owns: started detached, found again by their command line, stopped.

Linux only (reads /proc), like the stack itself. It must never signal a process it cannot prove is
ours: a pid from a pid file is trusted only while `/proc/<pid>/cmdline` still holds the exact
arguments we started it with, because pids are reused after a crash or a reboot.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")
#: Seconds between two looks at a process we are waiting on; short, as shutdown is often sub-second.
_POLL_SECONDS = 0.1
#: Long enough for an exec to finish (it takes milliseconds), short enough to go unnoticed.
_EXEC_SETTLE_SECONDS = 0.2
#: Enough of a foreign command line to recognise it in an error message.
_DESCRIBE_CHARS = 160
#: How much of a log's end to search for the cause of a failed start.
_LOG_TAIL_BYTES = 64 * 1024
_ERROR_LINE = re.compile(r"\b(ERROR|FATAL)\b|<(Error|Fatal)>|Exception\b|Error:")

#: Popen handles of the processes this Python process started. Keeping them lets us reap our own
#: children (a dead child stays a zombie, visible in /proc, until reaped) and stops `Popen.__del__`
#: from warning that a deliberately detached server "is still running".
_STARTED: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class ManagedProcess:
    """One long-running server of the stack, identified by arguments no other process has."""

    name: str
    pid_file: Path
    log_path: Path
    #: argv elements that together identify our process, e.g. its main class and config path.
    signature: tuple[str, ...]

    def pid(self) -> int | None:
        """The pid of our running process, or None. Repairs a stale or missing pid file."""
        recorded = _read_pid(self.pid_file)
        if recorded is not None and self.is_alive(recorded):
            return recorded
        found = next((pid for pid in _all_pids() if self._matches(pid)), None)
        if found is None:
            self.pid_file.unlink(missing_ok=True)
        else:
            self.pid_file.write_text(f"{found}\n")
        return found

    def start(self, argv: Sequence[str], cwd: Path) -> int:
        """Start detached (own session, survives its parent), output appended to the log."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(
                f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} starting {self.name}\n".encode()
            )
            log.flush()
            process = subprocess.Popen(
                list(argv),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_more_open_files,
            )
        _STARTED[process.pid] = process
        self.pid_file.write_text(f"{process.pid}\n")
        return process.pid

    def stop(self, grace_seconds: float) -> int | None:
        """SIGTERM, then SIGKILL after `grace_seconds`. Returns the pid stopped (None: none ran)."""
        pid = self.pid()
        if pid is not None:
            _signal(pid, signal.SIGTERM)
            if not self._wait_gone(pid, grace_seconds):
                _signal(pid, signal.SIGKILL)
                self._wait_gone(pid, grace_seconds)
        self.pid_file.unlink(missing_ok=True)
        return pid

    def kill(self) -> int | None:
        """SIGKILL with no grace, as a crash would. Returns the pid killed, None if none ran."""
        pid = self.pid()
        if pid is not None:
            _signal(pid, signal.SIGKILL)
            self._wait_gone(pid, 10.0)
        self.pid_file.unlink(missing_ok=True)
        return pid

    def is_alive(self, pid: int) -> bool:
        """`pid` is our process and has not exited."""
        child = _STARTED.get(pid)
        if child is not None:  # started by this very process: the handle knows, no guessing
            return _alive(pid)
        if _argv(pid) is None and _alive(pid):
            # A process in the middle of exec shows an empty command line for a moment.
            time.sleep(_EXEC_SETTLE_SECONDS)
        return self._matches(pid)

    def _matches(self, pid: int) -> bool:
        argv = _argv(pid)
        return argv is not None and all(arg in argv for arg in self.signature) and _alive(pid)

    @staticmethod
    def _wait_gone(pid: int, timeout: float) -> bool:
        # Only after `pid` was proven ours and signalled: from here its command line is no help
        # (an exiting process shows none), and only its last thread leaving frees its ports.
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_SECONDS)
        return True


#: Kafka keeps a few files open per partition and ClickHouse some per part; 1,024 or even 20,000 is
#: soon reached by a development broker that many test runs have used.
OPEN_FILES = 262_144


def _more_open_files() -> None:
    """In the child before exec: raise its open-files limit as far as allowed (root may raise the
    hard limit too), never lower it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for wanted in ((OPEN_FILES, max(hard, OPEN_FILES)), (max(soft, min(hard, OPEN_FILES)), hard)):
        if wanted[0] <= soft:
            return
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, wanted)
            return
        except (ValueError, OSError):
            continue


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, chosen by the kernel (for servers of tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """A server could listen on host:port now (binding with SO_REUSEADDR, as Kafka and ClickHouse
    do, so connections lingering in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def is_listening(host: str, port: int) -> bool:
    """Something listens on host:port. Checked before a client library connects, because a failed
    connect makes the clients log tracebacks and a bare connect-and-close makes servers log
    warnings; a bind attempt disturbs neither."""
    return not port_is_free(host, port)


def describe_port_holder(port: int) -> str | None:
    """`pid N (command line)` of whoever listens on `port`, if /proc lets us see it."""
    inodes = set(_listening_socket_inodes(port))
    if not inodes:
        return None
    for pid in _all_pids():
        try:
            links = [os.readlink(fd) for fd in (_PROC / str(pid) / "fd").iterdir()]
        except OSError:  # gone, or not ours to inspect
            continue
        if any(link.startswith("socket:[") and link[8:-1] in inodes for link in links):
            command = " ".join(_argv(pid) or ["?"])
            if len(command) > _DESCRIBE_CHARS:
                command = command[: _DESCRIBE_CHARS - 1] + "…"
            return f"pid {pid} ({command})"
    return None


def last_error_line(*logs: Path) -> str | None:
    """The most recent line that looks like an error in the tail of the given logs, shortened."""
    for log in logs:
        try:
            with log.open("rb") as handle:
                handle.seek(max(0, log.stat().st_size - _LOG_TAIL_BYTES))
                lines = handle.read().decode(errors="replace").splitlines()
        except OSError:
            continue
        for line in reversed(lines):
            if _ERROR_LINE.search(line):
                line = line.strip()
                return line if len(line) <= _DESCRIBE_CHARS else line[: _DESCRIBE_CHARS - 1] + "…"
    return None


def _listening_socket_inodes(port: int) -> Iterator[str]:
    listen_state = "0A"
    for table in ("tcp", "tcp6"):
        try:
            rows = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if (
                len(fields) > 9
                and fields[3] == listen_state
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                yield fields[9]


def _all_pids() -> Iterator[int]:
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def _argv(pid: int) -> list[str] | None:
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg] or None


def _alive(pid: int) -> bool:
    child = _STARTED.get(pid)
    if child is not None and child.poll() is not None:  # reaps our own exited child
        del _STARTED[pid]
        return False
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    # Field 3, after the parenthesised command name (which may itself contain spaces or ')').
    if stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
        return True
    # A killed JVM's main thread turns zombie while its other threads are still exiting and its
    # sockets still open; it is gone only once it is the last task left.
    try:
        return len(os.listdir(_PROC / str(pid) / "task")) > 1
    except OSError:
        return False


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _signal(pid: int, signum: signal.Signals) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
