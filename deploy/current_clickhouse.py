"""A current ClickHouse server (26.9) for tests, from the `chdb-core` wheel: the dev box's Debian
package is 18.16, production runs current releases, and both must run our migrations and queries.

`chdb-core` ships the ClickHouse engine as one Python extension module, `chdb/_chdb.abi3.so`.
Its module-level `query()` runs the engine the way `clickhouse-local` does: it reads `config.xml`
from the working directory, and `SYSTEM START LISTEN TCP; SYSTEM START LISTEN HTTP` then opens
the native and HTTP ports for as long as the same call's next query runs. So the server is a
child process that loads the extension by its file path and runs one query that never ends.

The child never runs `import chdb`: the `chdb` package (4.x, the in-process engine some tests
use) and `chdb-core` install into the same `chdb/` directory and the later one's `__init__.py`
wins, so the package's import is not chdb-core's. A process of its own also keeps this engine
apart from any in-process chdb engine of the test process (one engine per process).

It has no users or grants (anyone who reaches the port is `default`), so it listens on loopback
only. It must never be used for anything but tests. It never touches a process it did not start.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from xml.sax.saxutils import escape

from clickhouse_driver import Client

from deploy.errors import StackError
from deploy.processes import last_error_line

#: What tests call "the current engine"; production pins nothing older. Bumped on purpose only.
CHDB_CORE_VERSION = "26.9.0"
LOOPBACK = "127.0.0.1"
#: The engine loads 550 MB of code and starts in ~2 s on an idle core; two busy cores are slower.
READY_SECONDS = 60.0
#: SIGTERM first; the engine has nothing to flush that a test needs afterwards.
STOP_GRACE_SECONDS = 10.0

# Run by `python -I` (no user site, no cwd on sys.path): load the extension by path, never the
# `chdb` package. The query after START LISTEN keeps the ports open: about 31 years of 1 s sleeps.
# The child exits when its stdin closes, so a killed test run never leaves a server behind.
_CHILD = """
import ctypes, importlib.util, os, sys, threading
extension = sys.argv[1]
# As chdb-core's own __init__ does: its pybind11 stubs bind to the engine's allocator.
ctypes.CDLL(extension, mode=sys.getdlopenflags() | os.RTLD_DEEPBIND)
spec = importlib.util.spec_from_file_location("_chdb", extension)
engine = importlib.util.module_from_spec(spec)
spec.loader.exec_module(engine)
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
result = engine.query(
    "SYSTEM START LISTEN TCP; SYSTEM START LISTEN HTTP; "
    "SELECT sleepEachRow(1) FROM numbers(1000000000) "
    "SETTINGS max_block_size = 1, function_sleep_max_microseconds_per_block = 0 FORMAT Null",
    "CSV",
)
print(result, file=sys.stderr)
sys.exit(1)
"""

_CONFIG = """<clickhouse>
    <!-- No users or grants: loopback only. -->
    <listen_host>{host}</listen_host>
    <tcp_port>{tcp_port}</tcp_port>
    <http_port>{http_port}</http_port>
    <path>{path}/</path>
    <tmp_path>{path}/tmp/</tmp_path>
    <user_files_path>{path}/user_files/</user_files_path>
    <logger>
        <level>warning</level>
        <log>{home}/server.log</log>
        <errorlog>{home}/server.err.log</errorlog>
    </logger>
</clickhouse>
"""


def chdb_core_extension() -> Path:
    """The pinned chdb-core's engine module, found from its installed files (nothing imported).

    Raises LookupError, saying why, when chdb-core is missing or not the pinned version."""
    try:
        distribution = metadata.distribution("chdb-core")
    except metadata.PackageNotFoundError:
        raise LookupError(
            f"chdb-core is not installed (pip install 'chdb-core=={CHDB_CORE_VERSION}',"
            " part of the test extra)"
        ) from None
    if distribution.version != CHDB_CORE_VERSION:
        raise LookupError(
            f"chdb-core {distribution.version} is installed; the tests pin {CHDB_CORE_VERSION}"
        )
    for file in distribution.files or ():
        if file.name == "_chdb.abi3.so" and file.parent.name == "chdb":
            return Path(str(distribution.locate_file(file))).resolve()
    raise LookupError("chdb-core is installed but has no chdb/_chdb.abi3.so")


class CurrentClickHouse:
    """One server under `home` (config.xml, data/, logs), on the given loopback ports."""

    def __init__(self, home: Path, tcp_port: int, http_port: int) -> None:
        self.home = home
        self.host = LOOPBACK
        self.tcp_port = tcp_port
        self.http_port = http_port
        self._process: subprocess.Popen[bytes] | None = None

    def url(self, database: str) -> str:
        """A CLICKHOUSE_URL for `database` on this server (schemas.config.ClickHouseTarget)."""
        return f"clickhouse://default@{self.host}:{self.tcp_port}/{database}"

    def start(self) -> None:
        extension = chdb_core_extension()
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.xml").write_text(_CONFIG.format(
            host=self.host, tcp_port=self.tcp_port, http_port=self.http_port,
            path=escape(str(self.home / "data")), home=escape(str(self.home)),
        ))
        with open(self.home / "stderr.log", "wb") as stderr:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-c", _CHILD, str(extension)],
                cwd=self.home, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr,
            )

    def wait_ready(self, timeout: float = READY_SECONDS) -> str:
        """The server's version, once it answers a query over the native protocol."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                # The port first: the driver logs a traceback for every refused connection.
                # Not by a bind attempt (deploy.processes.is_listening): that could take the
                # port in the instant the server binds it.
                with socket.create_connection((self.host, self.tcp_port), timeout=2):
                    pass
                return self.probe()
            except Exception:
                pass  # not listening, or not answering yet
            if self._process is None or self._process.poll() is not None:
                raise StackError(f"current ClickHouse exited: {self.last_error()}")
            if time.monotonic() > deadline:
                raise StackError(
                    f"current ClickHouse did not answer on {self.host}:{self.tcp_port}"
                    f" within {timeout:.0f} s: {self.last_error()}"
                )
            time.sleep(0.3)

    def probe(self) -> str:
        client = Client(self.host, port=self.tcp_port, connect_timeout=2, send_receive_timeout=5)
        try:
            version: str = client.execute("SELECT version()")[0][0]
            return version
        finally:
            client.disconnect()

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()  # the child's own way out
        try:
            process.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def last_error(self) -> str:
        return last_error_line(self.home / "stderr.log", self.home / "server.err.log") or "no output"


@contextmanager
def current_clickhouse(home: Path, tcp_port: int, http_port: int) -> Iterator[CurrentClickHouse]:
    """A started, answering server; stopped on leaving."""
    server = CurrentClickHouse(home, tcp_port, http_port)
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
