"""The local Kafka broker: Kafka 4 in KRaft combined mode (broker and controller in one JVM), run
straight from the jars Maven Central serves, because the dev machines have no Docker and reach no
download site but the package registries.

Everything lives under one home directory (`<stack root>/kafka`): `libs/` (jars, fetched once),
`data/` (formatted once), `cluster.id`, `server.properties` (rewritten before every start),
`kafka.log`, `kafka.pid` and, once started secured, `security/` (deploy/kafka_security.py). It
never touches a broker it did not start, and deletes data only when asked to purge.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from kafka import KafkaAdminClient

from deploy.errors import StackError
from deploy.kafka_security import (
    PRINCIPALS,
    SCRAM_MECHANISM,
    SECURE_LISTENER,
    SUPER_USER,
    KafkaSecurity,
    redact,
)
from deploy.processes import ManagedProcess, is_listening, last_error_line

POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
_BROKER_JAR = re.compile(r"kafka_2\.13-(?P<version>\d[\w.-]*)\.jar")
#: Kafka 4 brokers refuse to run on anything older.
MIN_JAVA_MAJOR = 17
#: A dev broker with a few hundred partitions fits in 1 GiB; the JVM default (a quarter of RAM)
#: would take 6 GiB of a 24 GiB box that also runs ClickHouse and the workers.
_HEAP = "-Xmx1g"
#: A cold fetch takes ~30 s (46 jars); ten minutes covers a slow mirror without hanging forever.
_FETCH_TIMEOUT_SECONDS = 600.0
#: Formatting writes two small files but pays a JVM start.
_FORMAT_TIMEOUT_SECONDS = 120.0
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class KafkaBroker:
    def __init__(
        self, home: Path, host: str, port: int, controller_port: int, secure_port: int
    ) -> None:
        self.home = home
        self.host = host
        self.port = port
        self.controller_port = controller_port
        self.secure_port = secure_port
        self.security = KafkaSecurity(home, host)
        self.libs_dir = home / "libs"
        self.data_dir = home / "data"
        self.cluster_id_file = home / "cluster.id"
        self.properties_file = home / "server.properties"
        self.log_path = home / "kafka.log"
        self.process = ManagedProcess(
            name="kafka",
            pid_file=home / "kafka.pid",
            log_path=self.log_path,
            signature=("kafka.Kafka", str(self.properties_file)),
        )
        # Written last by a successful fetch: holds the hash of the pom the jars came from, so an
        # interrupted fetch or a version bump in the pom both mean "fetch again".
        self._fetched_marker = self.libs_dir / ".fetched-from-pom"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def secure_bootstrap(self) -> str:
        return f"{self.host}:{self.secure_port}"

    @property
    def ports(self) -> tuple[int, int]:
        return (self.port, self.controller_port)

    @property
    def secured(self) -> bool:
        """Whether the last start (or the coming one, once prepared) has the SASL_SSL listener."""
        return f"{SECURE_LISTENER}://" in (_read_text(self.properties_file) or "")

    def version(self) -> str | None:
        """The broker version, read from the name of the fetched kafka_2.13 jar."""
        if not self.libs_dir.is_dir():
            return None
        for jar in sorted(self.libs_dir.iterdir()):
            if match := _BROKER_JAR.fullmatch(jar.name):
                return match["version"]
        return None

    def prepare(self, progress: Callable[[str], None], secure: bool = False) -> None:
        """Everything a start needs, each step done once: jars, the secured listener's
        certificate and passwords, config (for this start), formatted storage."""
        java = _java_17()
        self._fetch_jars(progress)
        if secure:
            self.security.ensure_material(progress)
        self._write_properties(secure)
        self._format_storage(java, progress, secure)

    def start(self) -> int:
        java = _java_17()
        argv = [
            java,
            _HEAP,
            "-XX:+ExitOnOutOfMemoryError",  # a half-dead broker is worse than a dead one
            "-Dorg.slf4j.simpleLogger.showDateTime=true",
            "-Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd'T'HH:mm:ss.SSSZ",
            "-cp",
            self._classpath(),
            "kafka.Kafka",
            str(self.properties_file),
        ]
        return self.process.start(argv, cwd=self.home)

    def probe(self) -> None:
        """Raises unless the broker answers and is unfenced, i.e. can lead partitions."""
        if not is_listening(self.host, self.port):
            raise ConnectionRefusedError(f"nothing listens on {self.bootstrap}")
        admin = KafkaAdminClient(
            bootstrap_servers=self.bootstrap,
            client_id="attribution-stack-probe",
            request_timeout_ms=5000,
            bootstrap_timeout_ms=5000,
        )
        try:
            brokers = admin.describe_cluster()["brokers"]
        finally:
            admin.close()
        if not any(not broker.get("is_fenced", False) for broker in brokers):
            raise RuntimeError("broker answers but is not unfenced yet")

    def plaintext_admin(self) -> KafkaAdminClient:
        """An admin client on the plaintext listener, whose principal is a super user."""
        return KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="attribution-stack",
                                request_timeout_ms=10_000)

    def probe_secure(self) -> None:
        """Raises unless `admin` can log in on the SASL_SSL listener and list the brokers."""
        if not is_listening(self.host, self.secure_port):
            raise ConnectionRefusedError(f"nothing listens on {self.secure_bootstrap}")
        admin = KafkaAdminClient(
            bootstrap_servers=self.secure_bootstrap,
            client_id="attribution-stack-probe",
            request_timeout_ms=5000,
            bootstrap_timeout_ms=5000,
            security_protocol=SECURE_LISTENER,
            ssl_cafile=str(self.security.ca_file),
            sasl_mechanism=SCRAM_MECHANISM,
            sasl_plain_username=SUPER_USER,
            sasl_plain_password=self.security.password(SUPER_USER),
        )
        try:
            admin.describe_cluster()
        finally:
            admin.close()

    def last_error(self) -> str | None:
        return last_error_line(self.log_path)

    def purge(self) -> None:
        """Delete the topic data, the cluster id and the secured listener's certificate and
        passwords (made anew by the next `up --secure`); keep the jars (re-fetching is slow)."""
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.cluster_id_file.unlink(missing_ok=True)
        self.security.purge()

    def _classpath(self) -> str:
        return f"{self.libs_dir}/*"  # the JVM expands the wildcard itself; no shell involved

    def _fetch_jars(self, progress: Callable[[str], None]) -> None:
        pom_hash = hashlib.sha256(POM.read_bytes()).hexdigest()
        if _read_text(self._fetched_marker) == pom_hash:
            return
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError(
                "mvn not found on PATH; it fetches the Kafka jars once: apt-get install -y maven"
            )
        progress(f"kafka: fetching jars from Maven Central into {self.libs_dir} (first run only)")
        self.home.mkdir(parents=True, exist_ok=True)
        pom_copy = self.home / "pom.xml"  # keeps anything Maven writes out of the source tree
        shutil.copyfile(POM, pom_copy)
        staging = self.home / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        command = [
            mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(pom_copy),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
            "-DincludeScope=runtime",
        ]  # fmt: skip
        output = _run(command, cwd=self.home, timeout=_FETCH_TIMEOUT_SECONDS, what="mvn jar fetch")
        if not any(_BROKER_JAR.fullmatch(jar.name) for jar in staging.glob("*.jar")):
            raise StackError(f"mvn finished but fetched no kafka_2.13 jar: {_cause_line(output)}")
        shutil.rmtree(self.libs_dir, ignore_errors=True)
        staging.rename(self.libs_dir)
        self._fetched_marker.write_text(pom_hash)

    def _write_properties(self, secure: bool) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        voters = f"1@{self.host}:{self.controller_port}"
        listeners = {"PLAINTEXT": self.port, "CONTROLLER": self.controller_port}
        if secure:
            listeners[SECURE_LISTENER] = self.secure_port
        advertised = {name: port for name, port in listeners.items() if name != "CONTROLLER"}
        lines = [
            "# Generated by deploy/kafka_broker.py before every start; edits here are overwritten.",
            "process.roles=broker,controller",
            "node.id=1",
            # A static voter set: format without --standalone, and ports may change between runs
            # (the formatted storage keeps voter ids only, never their addresses).
            f"controller.quorum.voters={voters}",
            "listeners=" + ",".join(f"{n}://{self.host}:{p}" for n, p in listeners.items()),
            "advertised.listeners=" + ",".join(
                f"{n}://{self.host}:{p}" for n, p in advertised.items()),
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=" + ",".join(
                f"{n}:{'PLAINTEXT' if n == 'CONTROLLER' else n}" for n in listeners),
            f"log.dirs={self.data_dir}",
            # Matches ATTRIBUTION_PARTITIONS' default, for topics created without an explicit count.
            "num.partitions=8",
            # One broker: internal topics must not ask for the default three replicas.
            "offsets.topic.replication.factor=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            # Topics are created by the pipeline with their partition count; a typo must fail.
            "auto.create.topics.enable=false",
            # A single dev worker should not wait 3 s for group members that will never come.
            "group.initial.rebalance.delay.ms=0",
            # No time-based deletion: retention compares record timestamps with now, so replaying
            # last year's events would lose whole segments as soon as they roll. `down --purge`
            # is how a dev box gets its disk back.
            "log.retention.ms=-1",
        ]
        if secure:
            lines += self.security.broker_properties()
        self.properties_file.write_text("\n".join(lines) + "\n")

    def _format_storage(self, java: str, progress: Callable[[str], None], secure: bool) -> None:
        if (self.data_dir / "meta.properties").exists():
            return  # a secured start of older storage adds the SCRAM users over the admin API
        cluster_id = self._cluster_id()
        progress(f"kafka: formatting storage in {self.data_dir} (cluster id {cluster_id})")
        command = [
            java, "-cp", self._classpath(), "kafka.tools.StorageTool", "format",
            "-t", cluster_id, "-c", str(self.properties_file),
        ]  # fmt: skip
        if secure:
            progress(f"kafka: adding the SCRAM users {', '.join(PRINCIPALS)}")
            command += self.security.scram_format_arguments()
        _run(command, cwd=self.home, timeout=_FORMAT_TIMEOUT_SECONDS, what="Kafka storage format",
             hidden=self.security.passwords() if secure else ())

    def _cluster_id(self) -> str:
        """The stored cluster id, or a new one in Kafka's format (22 chars of url-safe base64)."""
        stored = _read_text(self.cluster_id_file)
        if stored and len(stored) == 22:
            return stored
        cluster_id = "-"
        while cluster_id.startswith("-"):  # Kafka avoids these: they read as options on a CLI
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        self.cluster_id_file.write_text(cluster_id + "\n")
        return cluster_id


def _java_17() -> str:
    java = shutil.which("java")
    if java is None:
        raise StackError(
            f"java not found on PATH; Kafka needs Java {MIN_JAVA_MAJOR}+: "
            "apt-get install -y openjdk-17-jre-headless"
        )
    result = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    found = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    if found:
        major = int(found[2] or 0) if found[1] == "1" else int(found[1])  # "1.8.0" is Java 8
        if major < MIN_JAVA_MAJOR:
            raise StackError(f"{java} is Java {major}; Kafka needs Java {MIN_JAVA_MAJOR}+")
    return java


def _run(
    command: list[str], cwd: Path, timeout: float, what: str, hidden: Iterable[str] = ()
) -> str:
    """Run a set-up command to completion; any failure becomes a one-line StackError, with the
    `hidden` strings (passwords in its arguments) masked."""
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise StackError(redact(
            f"{what} did not finish within {timeout:.0f} s: {' '.join(command)}", hidden
        )) from None
    output = _ANSI_ESCAPE.sub("", result.stdout + result.stderr)
    if result.returncode != 0:
        raise StackError(redact(
            f"{what} failed (exit {result.returncode}): {_cause_line(output)}", hidden))
    return output


def _cause_line(output: str) -> str:
    """The line that names the cause: Maven and Java both print it first and pad it afterwards."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "ERROR" in line or "Exception" in line]
    return errors[0][:300] if errors else (lines or ["no output"])[-1][:300]


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
