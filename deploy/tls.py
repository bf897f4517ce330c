"""A local certificate authority and one server certificate it signs, made once with the `openssl`
command, for a service of the local stack that listens with TLS.

Clients trust `ca.pem`; the server presents `<name>.pem` (for localhost, 127.0.0.1, ::1 and the
host it binds) with `<name>.key`. Files are written to a staging directory and renamed into place,
so an interrupted run leaves nothing half-made. Private keys are 0600 and never leave the directory.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from deploy.errors import StackError

#: Ten years: a dev stack's certificate must not expire under a long-lived checkout.
TLS_DAYS = 3650
#: Each openssl call takes well under a second; a minute means something hangs.
_OPENSSL_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class ServerCertificate:
    ca_file: Path
    certificate: Path
    key: Path

    def exists(self) -> bool:
        return self.ca_file.exists() and self.certificate.exists() and self.key.exists()


def server_certificate(tls_dir: Path, name: str) -> ServerCertificate:
    return ServerCertificate(tls_dir / "ca.pem", tls_dir / f"{name}.pem", tls_dir / f"{name}.key")


def ensure_server_certificate(tls_dir: Path, host: str, name: str) -> ServerCertificate:
    """The CA and `name`'s certificate under `tls_dir`, made on the first call."""
    made = server_certificate(tls_dir, name)
    if made.exists():
        return made
    openssl = shutil.which("openssl")
    if openssl is None:
        raise StackError("the TLS listener of the local stack needs the `openssl` command"
                         " (Debian: apt-get install openssl)")
    staging = tls_dir.with_name(tls_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, mode=0o700)
    ca_key, request, extensions = (staging / f for f in ("ca.key", f"{name}.csr", f"{name}.ext"))
    staged = server_certificate(staging, name)
    extensions.write_text(
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        f"subjectAltName = {', '.join(_names_for(host))}\n"
        "authorityKeyIdentifier = keyid\n"
    )
    days = str(TLS_DAYS)
    for command in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key,
         "-out", staged.ca_file, "-days", days, "-subj", "/CN=attribution local stack CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", staged.key, "-out", request,
         "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", request, "-CA", staged.ca_file, "-CAkey", ca_key,
         "-CAcreateserial", "-days", days, "-extfile", extensions, "-out", staged.certificate],
    ):  # fmt: skip
        done = subprocess.run([openssl, *map(str, command)], capture_output=True, text=True,
                              timeout=_OPENSSL_TIMEOUT_SECONDS)
        if done.returncode != 0:
            cause = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise StackError(f"openssl {command[0]} failed (exit {done.returncode}): {cause}")
    for private in (ca_key, staged.key):
        private.chmod(0o600)
    staged.ca_file.chmod(0o644)
    shutil.rmtree(tls_dir, ignore_errors=True)
    staging.rename(tls_dir)
    return made


def _names_for(host: str) -> list[str]:
    """The certificate's subject alternative names: loopback, and `host` if it is another."""
    names = ["DNS:localhost", "IP:127.0.0.1", "IP:::1"]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        names.append(f"DNS:{host}")
    else:
        names.append(f"IP:{address}")
    return list(dict.fromkeys(names))
