"""The one runtime configuration object, built from the environment at start-up (contract §1).

Every process (worker, CLI, tests) builds a `Config` once and passes it down; nothing else reads
the environment. It is frozen, validated, and never logged with its password.
"""

from __future__ import annotations

import ipaddress
import re
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, unquote, urlparse

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Input, output and reference topics, before `TOPIC_PREFIX`.
INPUT_TOPICS = ("clicks", "shares", "orders", "refunds")
DEAD_LETTERS_TOPIC = "dead-letters"
REFERENCE_TOPICS = ("ref-programs", "ref-affiliates", "ref-settings")
#: Internal topics the worker owns: visitor-keyed clicks+orders, order-keyed ledger input.
VISITOR_EVENTS_TOPIC = "visitor-events"
#: An `attribution forget` request on `visitor-events` (streams/forget.py): the worker erases the
#: visitor's touches.
FORGET_TYPE = "forget"
LEDGER_EVENTS_TOPIC = "ledger-events"
#: Decided orders that used a discount code, keyed by the normalised code (code velocity).
CODE_EVENTS_TOPIC = "code-events"
#: Reviewer decisions on held orders (`attribution review`), keyed by order_id.
REVIEWS_TOPIC = "reviews"
#: Every abuse flag raised, for alerting systems, keyed by order_id.
ABUSE_FLAGS_TOPIC = "abuse-flags"
#: The worker's state stores (per visitor, per order, per code), each with a changelog
#: topic `<app id>-<table>-changelog`.
STATE_TABLES = ("touches", "order-ledgers", "code-redemptions")

KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
KafkaSaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
_SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
_TLS_PROTOCOLS = ("SSL", "SASL_SSL")


def check_topic_prefix(prefix: str) -> str:
    """`prefix` if it can start a Kafka topic name, else ValueError."""
    if prefix and not re.fullmatch(r"[A-Za-z0-9._-]+", prefix):
        raise ValueError("TOPIC_PREFIX may only contain letters, digits, '.', '_' and '-'")
    return prefix


def app_id_for(topic_prefix: str) -> str:
    """The worker's consumer group (and changelog name prefix) for a topic prefix."""
    suffix = re.sub(r"[^A-Za-z0-9_-]", "-", topic_prefix).strip("-")
    return f"attribution-{suffix}" if suffix else "attribution"


def changelog_topic_for(app_id: str, table: str) -> str:
    """The changelog topic of a state store (the name Faust gave it, kept)."""
    return f"{app_id}-{table}-changelog"


class ClickHouseTarget:
    """A parsed `clickhouse[s]://user:password@host:port/database[?ca_certs=PATH&verify=BOOL]` URL.

    `clickhouses://` is the native protocol over TLS (port 9440 unless given). The server's
    certificate is verified, against the CA bundle `ca_certs` or else the system's, unless
    `verify=false` (never in production: anyone on the path could read the passwords).
    """

    #: The URL's query options; any other is a mistake, refused rather than ignored.
    OPTIONS = ("ca_certs", "verify")

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("clickhouse", "clickhouses"):
            raise ValueError(f"CLICKHOUSE_URL must start with clickhouse://, got {parsed.scheme!r}")
        self.host = parsed.hostname or "localhost"
        self.port = parsed.port or (9440 if parsed.scheme == "clickhouses" else 9000)
        self.user = unquote(parsed.username or "default")
        self.password = SecretStr(unquote(parsed.password or ""))
        self.database = (parsed.path or "/").lstrip("/") or "attribution"
        self.secure = parsed.scheme == "clickhouses"
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.database):
            raise ValueError(f"ClickHouse database name {self.database!r} is not a plain identifier")
        options = parse_qs(parsed.query, keep_blank_values=True, strict_parsing=bool(parsed.query))
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise ValueError(f"CLICKHOUSE_URL has unknown option(s) {', '.join(unknown)}; "
                             f"known: {', '.join(self.OPTIONS)}")
        if options and not self.secure:
            raise ValueError("CLICKHOUSE_URL: ca_certs and verify are TLS options; use clickhouses://")
        if any(len(values) > 1 for values in options.values()):
            raise ValueError("CLICKHOUSE_URL gives an option twice")
        verify = options.get("verify", ["true"])[0].lower()
        if verify not in ("true", "false"):
            raise ValueError(f"CLICKHOUSE_URL: verify must be true or false, got {verify!r}")
        #: Whether the server's certificate must be signed by a trusted CA and name the host.
        self.verify = self.secure and verify == "true"
        #: The CA bundle that signs the server's certificate; None: the system's CAs.
        self.ca_certs = Path(options["ca_certs"][0]) if "ca_certs" in options else None
        if self.ca_certs is not None:
            if not self.verify:
                raise ValueError("CLICKHOUSE_URL: ca_certs is unused with verify=false")
            if not self.ca_certs.is_file():
                raise ValueError(f"CLICKHOUSE_URL: ca_certs {str(self.ca_certs)!r} is not a file")

    def __repr__(self) -> str:  # never shows the password
        scheme = "clickhouses" if self.secure else "clickhouse"
        options = "".join((f"?ca_certs={self.ca_certs}" if self.ca_certs else "",
                           "?verify=false" if self.secure and not self.verify else ""))
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{self.database}{options}"


class Config(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="forbid", case_sensitive=False)

    kafka_bootstrap: str = Field("localhost:9092", validation_alias="KAFKA_BOOTSTRAP")
    topic_prefix: str = Field("", validation_alias="TOPIC_PREFIX")
    clickhouse_url: SecretStr = Field(
        SecretStr("clickhouse://default@localhost:9000/attribution"),
        validation_alias="CLICKHOUSE_URL",
    )
    metrics_port: int = Field(9102, ge=0, le=65535, validation_alias="METRICS_PORT")

    # How every Kafka client of every command connects (streams/kafka_clients.py builds them).
    kafka_security_protocol: KafkaSecurityProtocol = Field(
        "PLAINTEXT", validation_alias="KAFKA_SECURITY_PROTOCOL")
    kafka_sasl_mechanism: KafkaSaslMechanism = Field(
        "SCRAM-SHA-512", validation_alias="KAFKA_SASL_MECHANISM")
    kafka_sasl_username: str | None = Field(None, validation_alias="KAFKA_SASL_USERNAME")
    kafka_sasl_password: SecretStr | None = Field(None, validation_alias="KAFKA_SASL_PASSWORD")
    kafka_sasl_password_file: Path | None = Field(None, validation_alias="KAFKA_SASL_PASSWORD_FILE")
    kafka_ssl_cafile: Path | None = Field(None, validation_alias="KAFKA_SSL_CAFILE")

    # Contract §1: the key of the keyed hash that stands in for ip and user_agent (schemas/pii.py),
    # given itself or as a file holding it (read here, once). `pii_key` is the one to use.
    pii_key_secret: SecretStr | None = Field(None, validation_alias="PII_KEY")
    pii_key_from_file: SecretStr | None = Field(None, validation_alias="PII_KEY_FILE")
    # The tracking edge (contract §8): its HTTP port, and the secret that signs postbacks (given
    # itself or as a file holding it). `edge_secret` is the one to use.
    edge_port: int = Field(8080, ge=0, le=65535, validation_alias="EDGE_PORT")
    edge_secret_value: SecretStr | None = Field(None, validation_alias="EDGE_SECRET")
    edge_secret_from_file: SecretStr | None = Field(None, validation_alias="EDGE_SECRET_FILE")
    # The edge's rate limits (edge/limits.py): requests per second and burst, per client address
    # and per tracking link; and the proxies whose X-Forwarded-For it believes (comma-separated
    # addresses or CIDR networks; none by default: the peer address is the client's).
    edge_rate_per_ip: float = Field(20.0, gt=0, validation_alias="EDGE_RATE_PER_IP")
    edge_burst_per_ip: int = Field(40, ge=1, validation_alias="EDGE_BURST_PER_IP")
    edge_rate_per_link: float = Field(200.0, gt=0, validation_alias="EDGE_RATE_PER_LINK")
    edge_burst_per_link: int = Field(400, ge=1, validation_alias="EDGE_BURST_PER_LINK")
    edge_trusted_proxies: str = Field("", validation_alias="EDGE_TRUSTED_PROXIES")
    # Where the edge spools events Kafka did not acknowledge, and how much it may hold there (past
    # it, 503 with Retry-After): 1 GiB is minutes of the target 20,000 events/s.
    edge_spool_dir: Path = Field(Path(".stack/edge-spool"), validation_alias="EDGE_SPOOL_DIR")
    edge_spool_max_bytes: int = Field(1 << 30, ge=1 << 20, validation_alias="EDGE_SPOOL_MAX_BYTES")

    # The ClickHouse schema (sinks/migrate.py SchemaOptions; applied by `db migrate`, on servers
    # with TTL): raw clicks and identifying columns expire after so many days (0: never); how
    # often current servers refresh the rollup that `report` and dashboards read.
    clickhouse_clicks_ttl_days: int = Field(400, ge=0, le=36_500,
                                            validation_alias="CLICKHOUSE_CLICKS_TTL_DAYS")
    clickhouse_pii_ttl_days: int = Field(400, ge=0, le=36_500,
                                         validation_alias="CLICKHOUSE_PII_TTL_DAYS")
    rollup_refresh_seconds: int = Field(300, ge=1, le=86_400, validation_alias="ROLLUP_REFRESH_SECONDS")

    # Project settings beyond the contract.
    partitions: int = Field(8, ge=1, le=1024, validation_alias="ATTRIBUTION_PARTITIONS")
    replication_factor: int = Field(1, ge=1, validation_alias="ATTRIBUTION_REPLICATION_FACTOR")
    state_dir: Path = Field(Path(".stack/worker-state"), validation_alias="ATTRIBUTION_STATE_DIR")
    #: Rows per ClickHouse insert and the longest a row waits in a batch.
    batch_size: int = Field(5000, ge=1, validation_alias="ATTRIBUTION_BATCH_SIZE")
    batch_seconds: float = Field(0.2, gt=0, validation_alias="ATTRIBUTION_BATCH_SECONDS")

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_is_topic_safe(cls, value: str) -> str:
        return check_topic_prefix(value)

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper_case(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, str) and not value.strip():  # empty means unset: the default
            assert info.field_name is not None
            return cls.model_fields[info.field_name].default
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("kafka_sasl_username", "kafka_sasl_password", "kafka_sasl_password_file",
                     "kafka_ssl_cafile", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("kafka_sasl_password_file", "kafka_ssl_cafile")
    @classmethod
    def _file_is_readable(cls, value: Path | None) -> Path | None:
        if value is not None and not _readable(value):
            raise ValueError(f"cannot read {value}")
        return value

    @model_validator(mode="after")
    def _kafka_credentials_fit_the_protocol(self) -> "Config":
        if self.kafka_sasl_password is not None and self.kafka_sasl_password_file is not None:
            raise ValueError("KAFKA_SASL_PASSWORD and KAFKA_SASL_PASSWORD_FILE are both set; "
                             "give one")
        if self.kafka_security_protocol in _SASL_PROTOCOLS:
            if not self.kafka_sasl_username:
                raise ValueError(f"KAFKA_SASL_USERNAME is required with KAFKA_SECURITY_PROTOCOL="
                                 f"{self.kafka_security_protocol}")
            if not self.kafka_sasl_password_value:
                raise ValueError(f"KAFKA_SASL_PASSWORD or KAFKA_SASL_PASSWORD_FILE is required "
                                 f"with KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol}")
        return self

    @field_validator("pii_key_secret")
    @classmethod
    def _pii_key_is_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        return _checked_pii_key(value.get_secret_value(), "PII_KEY") if value is not None else None

    @field_validator("pii_key_from_file", mode="before")
    @classmethod
    def _pii_key_file_is_read(cls, value: object, info: ValidationInfo) -> object:
        return _secret_from_file(value, info, "pii_key_secret", "PII_KEY", "the key")

    @field_validator("edge_secret_value")
    @classmethod
    def _edge_secret_is_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        # A shared secret is held to the same minimum as the PII key.
        return _checked_pii_key(value.get_secret_value(), "EDGE_SECRET") if value is not None else None

    @field_validator("edge_secret_from_file", mode="before")
    @classmethod
    def _edge_secret_file_is_read(cls, value: object, info: ValidationInfo) -> object:
        return _secret_from_file(value, info, "edge_secret_value", "EDGE_SECRET", "the secret")

    @field_validator("edge_trusted_proxies")
    @classmethod
    def _proxies_are_networks(cls, value: str) -> str:
        for item in filter(None, (part.strip() for part in value.split(","))):
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
        return value

    @field_validator("clickhouse_url")
    @classmethod
    def _url_parses(cls, value: SecretStr) -> SecretStr:
        ClickHouseTarget(value.get_secret_value())
        return value

    @cached_property
    def clickhouse(self) -> ClickHouseTarget:
        return ClickHouseTarget(self.clickhouse_url.get_secret_value())

    @cached_property
    def kafka_sasl_password_value(self) -> SecretStr | None:
        """KAFKA_SASL_PASSWORD, or the first line of KAFKA_SASL_PASSWORD_FILE (read once)."""
        if self.kafka_sasl_password_file is not None:
            lines = self.kafka_sasl_password_file.read_text().splitlines()
            return SecretStr(lines[0]) if lines and lines[0] else None
        return self.kafka_sasl_password or None

    @property
    def kafka_uses_sasl(self) -> bool:
        return self.kafka_security_protocol in _SASL_PROTOCOLS

    @property
    def kafka_uses_tls(self) -> bool:
        return self.kafka_security_protocol in _TLS_PROTOCOLS

    @property
    def pii_key(self) -> bytes | None:
        """The PII key (PII_KEY, or the content of PII_KEY_FILE) as bytes; None when not set."""
        secret = self.pii_key_secret or self.pii_key_from_file
        return secret.get_secret_value().encode() if secret is not None else None

    @property
    def edge_secret(self) -> bytes | None:
        """The postback signing secret (EDGE_SECRET, or the content of EDGE_SECRET_FILE)."""
        secret = self.edge_secret_value or self.edge_secret_from_file
        return secret.get_secret_value().encode() if secret is not None else None

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    @property
    def app_id(self) -> str:
        """The consumer group (and changelog name prefix): derived from the prefix so workers stay apart."""
        return app_id_for(self.topic_prefix)

    def changelog_topic(self, table: str) -> str:
        """The changelog topic of a state store (the name Faust gave it, kept)."""
        return changelog_topic_for(self.app_id, table)

    @classmethod
    def from_env(cls) -> "Config":
        return cls()  # type: ignore[call-arg]


#: 16 characters at least: the key is all that stands between a keyed hash of an IPv4 address
#: and its 2^32 candidates. Surrounding whitespace (a key file's newline) is not part of it.
MIN_PII_KEY_LENGTH = 16


def _secret_from_file(value: object, info: ValidationInfo, direct_field: str, variable: str,
                      noun: str) -> SecretStr | None:
    """`<variable>_FILE`'s content as the secret (read once, here), checked like `<variable>`;
    None when unset. Both given, an unreadable or empty file: a ValueError naming the file."""
    path = value.get_secret_value() if isinstance(value, SecretStr) else value
    if path is None or (isinstance(path, str) and not path.strip()):
        return None
    if info.data.get(direct_field) is not None:
        raise ValueError(f"{variable} and {variable}_FILE are both set; give one")
    try:
        text = Path(str(path)).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"cannot read {path}: {reason}") from None
    if not text.strip():
        raise ValueError(f"{path} is empty")
    return _checked_pii_key(text, f"{noun} in {path}")


def _checked_pii_key(text: str, what: str) -> SecretStr | None:
    """The key without surrounding whitespace; None when empty (not set); ValueError if short."""
    key = text.strip()
    if not key:
        return None
    if len(key) < MIN_PII_KEY_LENGTH:
        raise ValueError(f"{what} must be at least {MIN_PII_KEY_LENGTH} characters "
                         "(a random secret, e.g. `openssl rand -hex 32`)")
    return SecretStr(key)


def _readable(path: Path) -> bool:
    try:
        with path.open("rb"):
            return True
    except OSError:
        return False
