"""The secured listener of the local Kafka broker (`attribution stack up --secure`): its TLS
certificate, the SCRAM users of the four principals, and who may do what (ACLs).

The broker listens with SASL_SSL on its secure port beside the plaintext one. Clients prove who
they are with SCRAM-SHA-512 over TLS; the broker presents a certificate signed by the stack's own
CA (`<kafka home>/security/tls/ca.pem`). Four principals, passwords generated once and kept 0600
in `<kafka home>/security/<principal>.password`:

| principal | may |
|---|---|
| `admin` | everything (a super user: topics, reference data, ACLs, users) |
| `worker` | read the input, review and reference topics; read and write its internal topics and changelogs; write dead letters and abuse flags; create all of these; its consumer group |
| `producer` | write `clicks`, `shares`, `orders`, `refunds` |
| `reviewer` | write `reviews` |

ACLs name each topic and the worker's group exactly (LITERAL patterns) for one `TOPIC_PREFIX`:
a prefix is free text and a PREFIXED pattern on it would also match a longer prefix's topics.
Granting for one prefix never revokes another's.

The plaintext listener stays, on loopback, for the test suite and the tools that predate
security: its principal (ANONYMOUS, also the broker's own on the controller and inter-broker
listeners) is a super user. A production broker has no plaintext listener; its inter-broker
listener authenticates too and only that principal is a super user.

Never print or log a password: they travel to the StorageTool's arguments (redacted from every
message) and to the broker over the admin API, nowhere else.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kafka.admin import (
    ACL,
    ACLFilter,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    KafkaAdminClient,
    ResourcePattern,
    ResourcePatternFilter,
    ResourceType,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from deploy.errors import StackError
from deploy.tls import ServerCertificate, ensure_server_certificate, server_certificate
from schemas.config import (
    ABUSE_FLAGS_TOPIC,
    CODE_EVENTS_TOPIC,
    DEAD_LETTERS_TOPIC,
    INPUT_TOPICS,
    LEDGER_EVENTS_TOPIC,
    REFERENCE_TOPICS,
    REVIEWS_TOPIC,
    STATE_TABLES,
    VISITOR_EVENTS_TOPIC,
    app_id_for,
    changelog_topic_for,
    check_topic_prefix,
)

PRINCIPALS = ("admin", "worker", "producer", "reviewer")
#: The principal with every right; the others get exactly the ACLs of `grants`.
SUPER_USER = "admin"
#: The principal of the plaintext and controller listeners (see the module docstring).
PLAINTEXT_PRINCIPAL = "ANONYMOUS"
SCRAM_MECHANISM = "SCRAM-SHA-512"
#: Kafka's minimum for SCRAM-SHA-512 and what `kafka-storage format --add-scram` uses.
SCRAM_ITERATIONS = 4096
#: The listener name in server.properties (also its security protocol).
SECURE_LISTENER = "SASL_SSL"

Progress = Callable[[str], None]

READ, WRITE, CREATE, DESCRIBE = "READ", "WRITE", "CREATE", "DESCRIBE"


@dataclass(frozen=True, order=True)
class Grant:
    """One allowed operation of a principal on a topic or group named exactly."""

    principal: str
    resource: str  # "topic" or "group"
    name: str
    operation: str


def grants(topic_prefix: str) -> list[Grant]:
    """Every ACL the non-admin principals need for the pipeline's topics under `topic_prefix`."""
    prefix = check_topic_prefix(topic_prefix)
    app_id = app_id_for(prefix)
    worker_reads = [*INPUT_TOPICS, REVIEWS_TOPIC, *REFERENCE_TOPICS]
    worker_owns = [VISITOR_EVENTS_TOPIC, LEDGER_EVENTS_TOPIC, CODE_EVENTS_TOPIC]
    worker_writes = [DEAD_LETTERS_TOPIC, ABUSE_FLAGS_TOPIC]
    changelogs = [changelog_topic_for(app_id, table) for table in STATE_TABLES]
    # The worker creates whatever is missing at start (streams.topics.ensure_topics).
    table: list[tuple[str, list[str], tuple[str, ...]]] = [
        ("worker", [prefix + t for t in worker_reads], (READ, DESCRIBE, CREATE)),
        ("worker", [prefix + t for t in worker_owns] + changelogs, (READ, WRITE, DESCRIBE, CREATE)),
        ("worker", [prefix + t for t in worker_writes], (WRITE, DESCRIBE, CREATE)),
        ("producer", [prefix + t for t in INPUT_TOPICS], (WRITE, DESCRIBE)),
        ("reviewer", [prefix + REVIEWS_TOPIC], (WRITE, DESCRIBE)),
    ]
    found = [Grant(principal, "topic", topic, operation)
             for principal, topics, operations in table
             for topic in topics for operation in operations]
    found += [Grant("worker", "group", app_id, operation) for operation in (READ, DESCRIBE)]
    return sorted(found)


class KafkaSecurity:
    """The files of the secured listener under `<kafka home>/security` and what uses them."""

    def __init__(self, home: Path, host: str) -> None:
        self.dir = home / "security"
        self.tls_dir = self.dir / "tls"
        self.host = host
        #: The broker's PEM key store: its private key, then its certificate and the CA's.
        self.keystore = self.dir / "broker-keystore.pem"

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "ca.pem"

    def password_file(self, principal: str) -> Path:
        if principal not in PRINCIPALS:
            raise StackError(f"unknown principal {principal!r}; one of {', '.join(PRINCIPALS)}")
        return self.dir / f"{principal}.password"

    def password(self, principal: str) -> str:
        try:
            return self.password_file(principal).read_text().strip()
        except OSError:
            raise StackError(f"no password for {principal}: run `attribution stack up --secure`"
                             " first") from None

    def exists(self) -> bool:
        return self.keystore.exists() and all(self.password_file(p).exists() for p in PRINCIPALS)

    def ensure_material(self, progress: Progress) -> None:
        """The CA, the broker's key store and the principals' passwords, each made once."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        if not self.keystore.exists():
            progress(f"kafka: making a CA and the broker's certificate in {self.tls_dir}")
            certificate = ensure_server_certificate(self.tls_dir, self.host, "broker")
            _write_private(self.keystore, "".join(
                path.read_text() for path in (certificate.key, certificate.certificate,
                                              certificate.ca_file)))
        for principal in PRINCIPALS:
            path = self.password_file(principal)
            if not path.exists():
                # 160 bits of hex: nothing the StorageTool's `[name=...,password=...]` must escape.
                _write_private(path, secrets.token_hex(20) + "\n")

    def certificate(self) -> ServerCertificate:
        return server_certificate(self.tls_dir, "broker")

    def broker_properties(self) -> list[str]:
        """The server.properties lines of the secured listener (its address is the caller's)."""
        listener = SECURE_LISTENER.lower()
        return [
            f"sasl.enabled.mechanisms={SCRAM_MECHANISM}",
            f"listener.name.{listener}.{SCRAM_MECHANISM.lower()}.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            # PEM: the key is read from the 0600 file; no key store password to write down.
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={self.keystore}",
            "ssl.client.auth=none",
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            f"super.users=User:{SUPER_USER};User:{PLAINTEXT_PRINCIPAL}",
            "allow.everyone.if.no.acl.found=false",
        ]

    def scram_format_arguments(self) -> list[str]:
        """`--add-scram` arguments of the StorageTool: the users exist from the first start."""
        arguments: list[str] = []
        for principal in PRINCIPALS:
            arguments += ["--add-scram", f"{SCRAM_MECHANISM}=[name={principal},"
                                         f"password={self.password(principal)}]"]
        return arguments

    def passwords(self) -> list[str]:
        return [self.password(p) for p in PRINCIPALS if self.password_file(p).exists()]

    def ensure_users(self, admin: KafkaAdminClient) -> list[str]:
        """Add (over the admin API) the SCRAM users the broker does not know yet: storage
        formatted before the stack was first secured has none. Returns the names added."""
        described = admin.describe_user_scram_credentials(list(PRINCIPALS))
        missing = [
            principal for principal in PRINCIPALS
            if not any(info["mechanism"] == ScramMechanism.SCRAM_SHA_512
                       for info in (described.get(principal) or {}).get("credential_infos") or [])
        ]
        if not missing:
            return []
        failed = {
            user: error for user, error in admin.alter_user_scram_credentials([
                UserScramCredentialUpsertion(principal, ScramMechanism.SCRAM_SHA_512,
                                             self.password(principal), iterations=SCRAM_ITERATIONS)
                for principal in missing
            ]).items() if error
        }
        if failed:
            raise StackError(f"kafka: adding SCRAM users failed: {failed}")
        return missing

    def ensure_acls(self, admin: KafkaAdminClient, topic_prefix: str) -> int:
        """Create the ACLs of `grants(topic_prefix)` that do not exist yet; returns how many."""
        existing, error = admin.describe_acls(ACLFilter(
            principal=None, host=None, operation=ACLOperation.ANY,
            permission_type=ACLPermissionType.ANY,
            resource_pattern=ResourcePatternFilter(ResourceType.ANY, None,
                                                   ACLResourcePatternType.ANY)))
        if error.errno != 0:
            raise StackError(f"kafka: cannot list ACLs: {error}")
        have = {_key(acl) for acl in existing}
        missing = [acl for acl in map(_acl, grants(topic_prefix)) if _key(acl) not in have]
        if not missing:
            return 0
        result = admin.create_acls(missing)
        if result.get("failed"):
            raise StackError(f"kafka: creating ACLs failed: {result['failed'][:3]}")
        return len(missing)

    def purge(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def redact(text: str, hidden: Iterable[str]) -> str:
    for secret in hidden:
        if secret:
            text = text.replace(secret, "***")
    return text


def _acl(grant: Grant) -> ACL:
    resource = ResourceType.TOPIC if grant.resource == "topic" else ResourceType.GROUP
    return ACL(principal=f"User:{grant.principal}", host="*",
               operation=ACLOperation[grant.operation],
               permission_type=ACLPermissionType.ALLOW,
               resource_pattern=ResourcePattern(resource, grant.name,
                                                ACLResourcePatternType.LITERAL))


def _key(acl: Any) -> tuple[object, ...]:
    pattern = acl.resource_pattern
    return (acl.principal, acl.host, int(acl.operation), int(acl.permission_type),
            int(pattern.resource_type), pattern.resource_name, int(pattern.pattern_type))


def _write_private(path: Path, text: str) -> None:
    """Write `text` to a new file only its owner can read (never world-readable, not even briefly)."""
    staging = path.with_name(path.name + ".partial")
    staging.unlink(missing_ok=True)
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    staging.rename(path)
