"""The one place that turns a `Config` into Kafka clients (contract §1: `KAFKA_SECURITY_PROTOCOL`,
`KAFKA_SASL_*`, `KAFKA_SSL_CAFILE` hold for every client of every command).

Three client libraries connect to Kafka here: aiokafka (the worker's consumers, producer and admin
client), kafka-python (the CLI's producer and admin client, the load tests) and Faust (the
benchmark's bare agent). Each gets its connection settings from a function below; a constructor
anywhere else that passes `bootstrap_servers` itself would silently ignore the security settings.
Nothing here may log or print a password: it only travels to the client library.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.helpers import create_ssl_context
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient

from schemas.config import Config

if TYPE_CHECKING:
    from faust.types.auth import CredentialsT


def bootstrap_servers(config: Config) -> list[str]:
    return [server.strip() for server in config.kafka_bootstrap.split(",") if server.strip()]


def ssl_context(config: Config) -> ssl.SSLContext | None:
    """A client TLS context trusting KAFKA_SSL_CAFILE (the system's CAs without it), or None
    when the protocol has no TLS. aiokafka and Faust take a context, not a file."""
    if not config.kafka_uses_tls:
        return None
    cafile = str(config.kafka_ssl_cafile) if config.kafka_ssl_cafile is not None else None
    return create_ssl_context(cafile=cafile)


def _password(config: Config) -> str | None:
    secret = config.kafka_sasl_password_value
    return secret.get_secret_value() if secret is not None else None


def aiokafka_kwargs(config: Config) -> dict[str, Any]:
    """Connection settings for AIOKafkaConsumer, AIOKafkaProducer and AIOKafkaAdminClient."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers(config),
        "security_protocol": config.kafka_security_protocol,
    }
    context = ssl_context(config)
    if context is not None:
        kwargs["ssl_context"] = context
    if config.kafka_uses_sasl:
        kwargs.update(
            sasl_mechanism=config.kafka_sasl_mechanism,
            sasl_plain_username=config.kafka_sasl_username,
            sasl_plain_password=_password(config),
        )
    return kwargs


def kafka_python_kwargs(config: Config) -> dict[str, Any]:
    """Connection settings for kafka-python's KafkaProducer, KafkaConsumer and KafkaAdminClient."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers(config),
        "security_protocol": config.kafka_security_protocol,
    }
    if config.kafka_uses_tls and config.kafka_ssl_cafile is not None:
        kwargs["ssl_cafile"] = str(config.kafka_ssl_cafile)
    if config.kafka_uses_sasl:
        kwargs.update(
            sasl_mechanism=config.kafka_sasl_mechanism,
            sasl_plain_username=config.kafka_sasl_username,
            sasl_plain_password=_password(config),
        )
    return kwargs


def faust_broker(config: Config) -> str:
    """Faust's `broker` URL: every bootstrap server, `;`-separated as Faust expects."""
    return ";".join(f"kafka://{server}" for server in bootstrap_servers(config))


def faust_credentials(config: Config) -> "CredentialsT | None":
    """Faust's `broker_credentials`: SASL (over TLS for SASL_SSL), TLS alone, or None (plaintext)."""
    import faust  # imported here: only the benchmark's yardstick runs Faust

    context = ssl_context(config)
    if config.kafka_uses_sasl:
        return faust.SASLCredentials(
            username=config.kafka_sasl_username, password=_password(config),
            ssl_context=context, mechanism=config.kafka_sasl_mechanism,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


# --- the clients ------------------------------------------------------------------------------
# Each takes the Config and the client's own tuning keywords; the connection comes from above.


def aio_consumer(config: Config, *topics: str, **settings: Any) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(*topics, **aiokafka_kwargs(config), **settings)


def aio_producer(config: Config, **settings: Any) -> AIOKafkaProducer:
    return AIOKafkaProducer(**aiokafka_kwargs(config), **settings)


def aio_admin(config: Config, **settings: Any) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**aiokafka_kwargs(config), **settings)


def producer(config: Config, **settings: Any) -> KafkaProducer:
    return KafkaProducer(**kafka_python_kwargs(config), **settings)


def consumer(config: Config, *topics: str, **settings: Any) -> KafkaConsumer:
    return KafkaConsumer(*topics, **kafka_python_kwargs(config), **settings)


def admin(config: Config, **settings: Any) -> KafkaAdminClient:
    return KafkaAdminClient(**kafka_python_kwargs(config), **settings)
