"""The local stack: one Kafka broker and one ClickHouse server on loopback, for development, tests
and load tests on a machine without Docker.

`Stack(root).up()` fetches, installs, formats and starts whatever is missing and waits until both
services answer; calling it again changes nothing. `up(secure=True)` starts the broker with its
SASL_SSL listener too, and makes sure its users and ACLs exist (deploy/kafka_security.py); whether
a broker is secured is decided when it starts. `down()` stops both and keeps their data;
`down(purge=True)` deletes it. All state lives under the stack root (`default_stack_root()`),
which the project git-ignores.

This is the bottom floor of the project: it must never import `streams`, `sinks` or `attribution`
(the CLI drives it, not the other way round), never signal a process it did not start, and never
delete anything outside the stack root.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from deploy.clickhouse_server import ClickHouseServer, ensure_clickhouse_installed
from deploy.errors import StackError
from deploy.kafka_broker import KafkaBroker
from deploy.kafka_security import SCRAM_MECHANISM, SECURE_LISTENER
from deploy.processes import ManagedProcess, describe_port_holder, free_port, port_is_free

__all__ = [
    "ServiceStatus",
    "Stack",
    "StackError",
    "StackStatus",
    "default_stack_root",
    "ensure_clickhouse_installed",
]

Progress = Callable[[str], None]

#: The repository checkout this package sits in; the default stack lives in its `.stack/`.
REPO_ROOT = Path(__file__).resolve().parent.parent
STACK_DIR_ENV = "ATTRIBUTION_STACK_DIR"

LOOPBACK = "127.0.0.1"
KAFKA_PORT = 9092
#: The SASL_SSL listener of `up --secure` (contract §1).
KAFKA_SECURE_PORT = 9093
#: The KRaft controller listener (on 9093 until the secured listener took that port; storage
#: formatted then starts fine on this one: the voter set is static, given at every start).
KAFKA_CONTROLLER_PORT = 9094
CLICKHOUSE_PORT = 9000
CLICKHOUSE_HTTP_PORT = 8123

#: A cold JVM, the KRaft election and unfencing take ~10 s on two cores; 60 s leaves room for
#: log recovery after a `kill -9` with many partitions.
KAFKA_READY_SECONDS = 60.0
#: Once the plaintext listener answers, the secured one needs only the SCRAM users to arrive
#: through the metadata log: a second or two.
KAFKA_SECURE_READY_SECONDS = 30.0
#: 18.16 answers within a second or two; loading many parts after a crash can take longer.
CLICKHOUSE_READY_SECONDS = 30.0
#: Kafka's controlled shutdown and ClickHouse's flush usually finish in a few seconds; after 20 s
#: something is stuck and SIGKILL is the lesser evil (both recover their logs on the next start).
STOP_GRACE_SECONDS = 20.0
#: Between two readiness probes: frequent enough to notice readiness promptly, cheap for the CPU.
_PROBE_INTERVAL_SECONDS = 0.5


def default_stack_root() -> Path:
    """$ATTRIBUTION_STACK_DIR, else `<repo>/.stack`."""
    configured = os.environ.get(STACK_DIR_ENV)
    return Path(configured).expanduser().resolve() if configured else REPO_ROOT / ".stack"


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    pid: int | None
    address: str
    version: str | None
    data_dir: Path
    log_path: Path
    #: The SASL_SSL listener of a broker started secured.
    secure_address: str | None = None


@dataclass(frozen=True)
class StackStatus:
    root: Path
    kafka: ServiceStatus
    clickhouse: ServiceStatus

    @property
    def running(self) -> bool:
        return self.kafka.running and self.clickhouse.running

    def render(self) -> str:
        lines = [f"stack root  {self.root}"]
        for service in (self.kafka, self.clickhouse):
            state = f"running  pid {service.pid}" if service.running else "stopped"
            version = service.version or "-"
            lines.append(f"{service.name:<11} {state:<20} {service.address:<16} version {version}")
            if service.secure_address:
                lines.append(f"{'':<11} {'SASL_SSL':<20} {service.secure_address}")
            lines += [
                f"{'':<11} data {service.data_dir}",
                f"{'':<11} log  {service.log_path}",
            ]
        return "\n".join(lines)


class Stack:
    def __init__(
        self,
        root: Path | None = None,
        *,
        host: str = LOOPBACK,
        kafka_port: int = KAFKA_PORT,
        kafka_controller_port: int = KAFKA_CONTROLLER_PORT,
        clickhouse_port: int = CLICKHOUSE_PORT,
        clickhouse_http_port: int = CLICKHOUSE_HTTP_PORT,
        kafka_secure_port: int = KAFKA_SECURE_PORT,
    ) -> None:
        self.root = (root or default_stack_root()).resolve()
        self.host = host
        self.kafka = KafkaBroker(
            self.root / "kafka", host, kafka_port, kafka_controller_port, kafka_secure_port
        )
        self.clickhouse = ClickHouseServer(
            self.root / "clickhouse", host, clickhouse_port, clickhouse_http_port
        )

    @property
    def kafka_bootstrap(self) -> str:
        return self.kafka.bootstrap

    @property
    def clickhouse_address(self) -> str:
        return self.clickhouse.address

    def up(
        self, progress: Progress = print, *, secure: bool = False, topic_prefix: str = ""
    ) -> StackStatus:
        """Start whatever is not running and wait until both services answer. Idempotent.

        `secure`: the broker also listens with SASL_SSL, and its SCRAM users and the ACLs for
        `topic_prefix`'s topics exist (made if missing, also on a broker already running
        secured). A broker running without that listener is not restarted: StackError."""
        with self._exclusive():
            progress(f"stack root: {self.root}")
            # Both start before either is awaited: their start-ups overlap.
            kafka_pid = self._launch_kafka(progress, secure)
            clickhouse_pid = self._launch_clickhouse(progress)
            self._await_kafka(kafka_pid, progress)
            if secure:
                self._secure_kafka(topic_prefix, progress)
            self._await_clickhouse(clickhouse_pid, progress)
        return self.status()

    def client_env(self, principal: str | None = None) -> dict[str, str]:
        """The settings (contract §1) that point a client at this stack: over the plaintext
        listener, or as `principal` over the secured one. Names files, never a password."""
        clickhouse_url = f"clickhouse://default@{self.clickhouse_address}/attribution"
        if principal is None:
            return {"KAFKA_BOOTSTRAP": self.kafka_bootstrap, "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
                    "CLICKHOUSE_URL": clickhouse_url}
        security = self.kafka.security
        password_file = security.password_file(principal)
        if not password_file.exists() or not security.ca_file.exists():
            raise StackError("the stack has no secured listener yet: run "
                             "`attribution stack up --secure` first")
        return {
            "KAFKA_BOOTSTRAP": self.kafka.secure_bootstrap,
            "KAFKA_SECURITY_PROTOCOL": SECURE_LISTENER,
            "KAFKA_SASL_MECHANISM": SCRAM_MECHANISM,
            "KAFKA_SASL_USERNAME": principal,
            "KAFKA_SASL_PASSWORD_FILE": str(password_file),
            "KAFKA_SSL_CAFILE": str(security.ca_file),
            "CLICKHOUSE_URL": clickhouse_url,
        }

    def down(self, progress: Progress = print, *, purge: bool = False) -> StackStatus:
        """Stop both services (data kept unless `purge`). Idempotent."""
        with self._exclusive():
            self._stop(self.kafka.process, progress)
            self._stop(self.clickhouse.process, progress)
            if purge:
                self.kafka.purge()
                self.clickhouse.purge()
                progress(f"deleted {self.kafka.data_dir} and {self.clickhouse.data_dir}")
        return self.status()

    def status(self) -> StackStatus:
        kafka_pid = self.kafka.process.pid()
        clickhouse_pid = self.clickhouse.process.pid()
        return StackStatus(
            root=self.root,
            kafka=ServiceStatus(
                name="kafka",
                running=kafka_pid is not None,
                pid=kafka_pid,
                address=self.kafka.bootstrap,
                version=self.kafka.version(),
                data_dir=self.kafka.data_dir,
                log_path=self.kafka.log_path,
                secure_address=(self.kafka.secure_bootstrap
                                if kafka_pid is not None and self.kafka.secured else None),
            ),
            clickhouse=ServiceStatus(
                name="clickhouse",
                running=clickhouse_pid is not None,
                pid=clickhouse_pid,
                address=self.clickhouse.address,
                version=self.clickhouse.version() if clickhouse_pid is not None else None,
                data_dir=self.clickhouse.data_dir,
                log_path=self.clickhouse.log_path,
            ),
        )

    # Outage helpers for tests: each leaves the other service alone.

    def start_kafka(
        self, progress: Progress = print, *, secure: bool | None = None, topic_prefix: str = ""
    ) -> None:
        """Start the broker alone: as it last ran (secured or not), or as `secure` says (then
        as `up` does, for the ACLs of `topic_prefix`)."""
        with self._exclusive():
            secured = self.kafka.secured if secure is None else secure
            self._await_kafka(self._launch_kafka(progress, secured), progress)
            if secure:
                self._secure_kafka(topic_prefix, progress)

    def kill_kafka(self) -> int | None:
        """SIGKILL the broker, as a crash would. Returns the pid killed, None if none ran."""
        with self._exclusive():
            return self.kafka.process.kill()

    def start_clickhouse(self, progress: Progress = print) -> None:
        with self._exclusive():
            self._await_clickhouse(self._launch_clickhouse(progress), progress)

    def stop_clickhouse(self, progress: Progress = print) -> None:
        with self._exclusive():
            self._stop(self.clickhouse.process, progress)

    def _launch_kafka(self, progress: Progress, secure: bool) -> int:
        running = self.kafka.process.pid()
        if running is not None:
            if secure and not self.kafka.secured:
                raise StackError(
                    f"kafka is running (pid {running}) without its {SECURE_LISTENER} listener; "
                    "`attribution stack down`, then `attribution stack up --secure`"
                )
            progress(f"kafka: already running (pid {running})")
            return running
        ports = self.kafka.ports + ((self.kafka.secure_port,) if secure else ())
        self._claim_ports("kafka", ports)
        self.kafka.prepare(progress, secure)
        pid = self.kafka.start()
        listening = f"{self.kafka.bootstrap}" + (
            f" and {SECURE_LISTENER} {self.kafka.secure_bootstrap}" if secure else "")
        progress(f"kafka: starting broker on {listening} (pid {pid})")
        return pid

    def _launch_clickhouse(self, progress: Progress) -> int:
        running = self.clickhouse.process.pid()
        if running is not None:
            progress(f"clickhouse: already running (pid {running})")
            return running
        self._claim_ports("clickhouse", self.clickhouse.ports)
        binary = self.clickhouse.prepare(progress)
        pid = self.clickhouse.start(binary)
        progress(f"clickhouse: starting server on {self.clickhouse.address} (pid {pid})")
        return pid

    def _await_kafka(self, pid: int, progress: Progress) -> None:
        seconds = _await_answer(
            what=f"kafka on {self.kafka.bootstrap}",
            probe=self.kafka.probe,
            alive=lambda: self.kafka.process.is_alive(pid),
            timeout=KAFKA_READY_SECONDS,
            last_error=self.kafka.last_error,
            log_path=self.kafka.log_path,
        )
        progress(f"kafka: ready ({self.kafka.version()}) after {seconds:.1f} s")

    def _secure_kafka(self, topic_prefix: str, progress: Progress) -> None:
        """The SCRAM users and the ACLs for `topic_prefix`, then `admin` logs in over SASL_SSL."""
        admin = self.kafka.plaintext_admin()
        try:
            added = self.kafka.security.ensure_users(admin)
            if added:
                progress(f"kafka: added the SCRAM users {', '.join(added)} (admin API)")
            granted = self.kafka.security.ensure_acls(admin, topic_prefix)
        finally:
            admin.close()
        prefix = f"TOPIC_PREFIX {topic_prefix!r}" if topic_prefix else "no TOPIC_PREFIX"
        progress(f"kafka: ACLs for {prefix}: {granted} added" if granted
                 else f"kafka: ACLs for {prefix} in place")
        seconds = _await_answer(
            what=f"kafka {SECURE_LISTENER} on {self.kafka.secure_bootstrap}",
            probe=self.kafka.probe_secure,
            alive=lambda: self.kafka.process.pid() is not None,
            timeout=KAFKA_SECURE_READY_SECONDS,
            last_error=self.kafka.last_error,
            log_path=self.kafka.log_path,
        )
        progress(f"kafka: {SECURE_LISTENER} on {self.kafka.secure_bootstrap} ready after "
                 f"{seconds:.1f} s (CA {self.kafka.security.ca_file})")

    def _await_clickhouse(self, pid: int, progress: Progress) -> None:
        seconds = _await_answer(
            what=f"clickhouse on {self.clickhouse.address}",
            probe=self.clickhouse.probe,
            alive=lambda: self.clickhouse.process.is_alive(pid),
            timeout=CLICKHOUSE_READY_SECONDS,
            last_error=self.clickhouse.last_error,
            log_path=self.clickhouse.log_dir,
        )
        progress(f"clickhouse: ready ({self.clickhouse.version()}) after {seconds:.1f} s")

    def _claim_ports(self, service: str, ports: tuple[int, ...]) -> None:
        for port in ports:
            if not port_is_free(self.host, port):
                holder = describe_port_holder(port) or "another process"
                raise StackError(
                    f"cannot start {service}: port {port} is in use by {holder}; "
                    "stop it, or give Stack() other ports"
                )

    @staticmethod
    def _stop(process: ManagedProcess, progress: Progress) -> None:
        pid = process.stop(STOP_GRACE_SECONDS)
        progress(f"{process.name}: stopped (pid {pid})" if pid else f"{process.name}: not running")

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One `up`/`down` at a time per stack root, across processes (two test sessions, say)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


def _await_answer(
    what: str,
    probe: Callable[[], None],
    alive: Callable[[], bool],
    timeout: float,
    last_error: Callable[[], str | None],
    log_path: Path,
) -> float:
    """Probe until it passes; returns the seconds waited. Fails fast if the process died."""
    started = time.monotonic()
    cause = "no answer yet"
    while True:
        try:
            probe()
            return time.monotonic() - started
        except Exception as error:  # any failure to answer means "not yet"; the clock decides
            cause = " ".join(str(error).split()) or type(error).__name__
        if not alive():
            raise StackError(
                f"{what} exited during start-up: {last_error() or cause}; see {log_path}"
            )
        if time.monotonic() - started > timeout:
            raise StackError(
                f"{what} did not answer within {timeout:.0f} s ({cause}); see {log_path}"
            )
        time.sleep(_PROBE_INTERVAL_SECONDS)


# --- Brokers of their own, for fault tests and benchmarks -----------------------------------------


def link_kafka_jars(shared: Stack, root: Path) -> None:
    """Give a stack under `root` the jars `shared` fetched (links, and the marker that says they
    are complete): a fresh root would fetch them again (~30 s)."""
    libs = root / "kafka" / "libs"
    libs.mkdir(parents=True)
    for jar in shared.kafka.libs_dir.iterdir():
        if jar.name.startswith("."):
            shutil.copyfile(jar, libs / jar.name)  # the fetch marker
        else:
            (libs / jar.name).symlink_to(jar)


@contextmanager
def private_broker(shared: Stack, root: Path) -> Iterator[Stack]:
    """A Kafka broker of its own under `root`, on free ports, stopped afterwards: killing it
    touches nobody else's. Only its Kafka half is ever started; it is given free ClickHouse ports
    too, so that it could never touch the shared server."""
    link_kafka_jars(shared, root)
    broker = Stack(root, kafka_port=free_port(), kafka_controller_port=free_port(),
                   clickhouse_port=free_port(), clickhouse_http_port=free_port())
    broker.start_kafka(progress=lambda line: None)
    try:
        yield broker
    finally:
        broker.kafka.process.stop(20.0)
