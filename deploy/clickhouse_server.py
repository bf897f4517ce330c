"""The local ClickHouse server: Debian's clickhouse-server package, run with our own config and
users file so that nothing depends on what the package left in /etc or on a system service.

Everything lives under one home directory (`<stack root>/clickhouse`): `config.xml` and
`users.xml` (generated from the templates beside this module before every start; the server writes
its preprocessed copies next to them, so they cannot stay in the source tree), `data/`, `logs/`,
`clickhouse.pid` and, when the server also listens with TLS, `tls/` (its own CA and a certificate
for localhost and 127.0.0.1, made with the `openssl` command on first start). It never touches a
server it did not start, and deletes data only when asked to purge.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from string import Template
from xml.sax.saxutils import escape

from clickhouse_driver import Client

from deploy.errors import StackError
from deploy.processes import ManagedProcess, is_listening, last_error_line
from deploy.tls import ensure_server_certificate

TEMPLATES = Path(__file__).resolve().parent / "clickhouse"
SERVER_BINARY = Path("/usr/sbin/clickhouse-server")
PACKAGES = ("clickhouse-server", "clickhouse-client")
#: `apt-get update` plus ~60 MB of packages; generous for a slow mirror, but never endless.
_APT_TIMEOUT_SECONDS = 900.0


def ensure_clickhouse_installed(progress: Callable[[str], None] = print) -> Path:
    """The clickhouse-server binary, installed with apt-get first if absent and we are root."""
    found = shutil.which("clickhouse-server") or (
        str(SERVER_BINARY) if SERVER_BINARY.exists() else None
    )
    if found:
        return Path(found)
    install = f"apt-get install -y {' '.join(PACKAGES)}"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise StackError(
            "clickhouse-server is not installed and cannot be installed from here (needs root and"
            f" apt-get); run: sudo {install}"
        )
    progress(f"clickhouse: installing {' '.join(PACKAGES)} with apt-get (first run only)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", *PACKAGES]):
        try:
            result = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=_APT_TIMEOUT_SECONDS
            )
        except subprocess.TimeoutExpired:
            raise StackError(
                f"`{' '.join(command)}` did not finish within {_APT_TIMEOUT_SECONDS:.0f} s"
            ) from None
        if result.returncode != 0:
            cause = (
                [line for line in result.stderr.splitlines() if line.strip()] or ["no output"]
            )[-1]
            raise StackError(f"`{' '.join(command)}` failed (exit {result.returncode}): {cause}")
    if not SERVER_BINARY.exists():
        raise StackError(f"`{install}` succeeded but {SERVER_BINARY} is still missing")
    return SERVER_BINARY


class ClickHouseServer:
    def __init__(
        self, home: Path, host: str, tcp_port: int, http_port: int, tls_port: int | None = None
    ) -> None:
        self.home = home
        self.host = host
        self.tcp_port = tcp_port
        self.http_port = http_port
        #: Native protocol over TLS (`clickhouses://`), off unless given.
        self.tls_port = tls_port
        self.tls_dir = home / "tls"
        self.config_file = home / "config.xml"
        self.users_file = home / "users.xml"
        self.data_dir = home / "data"
        self.log_dir = home / "logs"
        self.log_path = self.log_dir / "server.log"
        self._error_log = self.log_dir / "server.err.log"
        self.process = ManagedProcess(
            name="clickhouse",
            pid_file=home / "clickhouse.pid",
            # Only what the server prints before its logger is set up (bad config, crash).
            log_path=self.log_dir / "console.log",
            signature=(f"--config-file={self.config_file}",),
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.tcp_port}"

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.tcp_port, self.http_port) + ((self.tls_port,) if self.tls_port else ())

    @property
    def ca_file(self) -> Path:
        """The CA that signs the TLS port's certificate (`?ca_certs=` of a `clickhouses://` URL)."""
        return self.tls_dir / "ca.pem"

    def prepare(self, progress: Callable[[str], None]) -> Path:
        """Install if needed and write the config; returns the server binary."""
        binary = ensure_clickhouse_installed(progress)
        for directory in (
            self.log_dir,
            self.data_dir / "tmp",
            self.data_dir / "user_files",
            self.data_dir / "format_schemas",
        ):
            directory.mkdir(parents=True, exist_ok=True)
        values = {
            "log_dir": self.log_dir,
            "data_dir": self.data_dir,
            "users_config": self.users_file,
            "listen_host": self.host,
            "tcp_port": self.tcp_port,
            "http_port": self.http_port,
        }
        template = Template((TEMPLATES / "config.xml").read_text())
        substitutions = {key: escape(str(value)) for key, value in values.items()}
        substitutions["tls"] = self._tls_config() if self.tls_port else ""
        self.config_file.write_text(template.substitute(substitutions))
        shutil.copyfile(TEMPLATES / "users.xml", self.users_file)
        return binary

    def _tls_config(self) -> str:
        """`<tcp_port_secure>` and the server's certificate, made first if absent."""
        made = ensure_server_certificate(self.tls_dir, self.host, "server")
        certificate, key = made.certificate, made.key
        return (
            f"<tcp_port_secure>{self.tls_port}</tcp_port_secure>\n"
            "    <openSSL>\n"
            "        <server>\n"
            f"            <certificateFile>{escape(str(certificate))}</certificateFile>\n"
            f"            <privateKeyFile>{escape(str(key))}</privateKeyFile>\n"
            # Clients are not asked for certificates: they authenticate with a password.
            "            <verificationMode>none</verificationMode>\n"
            "            <loadDefaultCAFile>false</loadDefaultCAFile>\n"
            "            <cacheSessions>true</cacheSessions>\n"
            "            <disableProtocols>sslv2,sslv3,tlsv1,tlsv1_1</disableProtocols>\n"
            "            <preferServerCiphers>true</preferServerCiphers>\n"
            "        </server>\n"
            "    </openSSL>"
        )

    def start(self, binary: Path) -> int:
        return self.process.start([str(binary), f"--config-file={self.config_file}"], cwd=self.home)

    def probe(self) -> None:
        """Raises unless the server answers `SELECT 1` over the native protocol."""
        rows = self._query("SELECT 1")
        if rows != [(1,)]:
            raise RuntimeError(f"SELECT 1 returned {rows!r}")

    def version(self) -> str | None:
        try:
            return str(self._query("SELECT version()")[0][0])
        except Exception:  # status must render whatever state the server is in
            return None

    def last_error(self) -> str | None:
        return last_error_line(self.process.log_path, self._error_log)

    def purge(self) -> None:
        """Delete the databases; keep the logs."""
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def _query(self, sql: str) -> list[tuple[object, ...]]:
        if not is_listening(self.host, self.tcp_port):
            raise ConnectionRefusedError(f"nothing listens on {self.address}")
        client = Client(
            self.host,
            port=self.tcp_port,
            client_name="attribution-stack-probe",
            connect_timeout=2,
            send_receive_timeout=5,
            sync_request_timeout=2,
        )
        try:
            rows: list[tuple[object, ...]] = client.execute(sql)
        finally:
            client.disconnect()
        return rows

