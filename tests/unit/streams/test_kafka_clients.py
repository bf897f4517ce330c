"""streams.kafka_clients: every client library gets the security settings of the Config."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from schemas.config import Config
from streams import kafka_clients

#: A throwaway self-signed CA (its key was never kept): something `load_verify_locations` accepts.
CA_PEM = """-----BEGIN CERTIFICATE-----
MIIBnjCCAUOgAwIBAgIUCGQOuRmNqkQA8bknc1RxLKoVjOYwCgYIKoZIzj0EAwIw
IzEhMB8GA1UEAwwYYXR0cmlidXRpb24gdW5pdC10ZXN0IENBMCAXDTI2MTIwMTE3
NTcyOVoYDzIxMjYxMTA3MTc1NzI5WjAjMSEwHwYDVQQDDBhhdHRyaWJ1dGlvbiB1
bml0LXRlc3QgQ0EwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAS90TxeDSCjhKe/
XHsqWXdFrddcJw3oERs1SQpscmAF1nWPItmb1csKPpmEdAvjsUXbG7MzEPCsK/3O
XTe3pkzDo1MwUTAdBgNVHQ4EFgQUng+gqYYEVIt2t2Jxe9AC7XsMeHkwHwYDVR0j
BBgwFoAUng+gqYYEVIt2t2Jxe9AC7XsMeHkwDwYDVR0TAQH/BAUwAwEB/zAKBggq
hkjOPQQDAgNJADBGAiEA0YSW8c8FoGdAIvtABUHc2cB3xe8ncIAUNERdPLpAjcAC
IQC2JGFeZURv5/MUu29lhnzAbvSMKpsARJAJFuHW/wnaug==
-----END CERTIFICATE-----
"""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KAFKA_BOOTSTRAP", "KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM",
                 "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD", "KAFKA_SASL_PASSWORD_FILE",
                 "KAFKA_SSL_CAFILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def cafile(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_text(CA_PEM)
    return path


def config(**env: str) -> Config:
    return Config(KAFKA_BOOTSTRAP="h1:9093, h2:9093", **env)  # type: ignore[call-arg, arg-type]


def sasl_ssl(cafile: Path) -> Config:
    return config(KAFKA_SECURITY_PROTOCOL="SASL_SSL", KAFKA_SASL_USERNAME="worker",
                  KAFKA_SASL_PASSWORD="s3cret", KAFKA_SSL_CAFILE=str(cafile))


def test_plaintext_clients_get_the_servers_and_nothing_else() -> None:
    expected = {"bootstrap_servers": ["h1:9093", "h2:9093"], "security_protocol": "PLAINTEXT"}

    assert kafka_clients.kafka_python_kwargs(config()) == expected
    assert kafka_clients.aiokafka_kwargs(config()) == expected
    assert kafka_clients.faust_credentials(config()) is None


def test_kafka_python_clients_get_sasl_and_the_ca_file(cafile: Path) -> None:
    assert kafka_clients.kafka_python_kwargs(sasl_ssl(cafile)) == {
        "bootstrap_servers": ["h1:9093", "h2:9093"],
        "security_protocol": "SASL_SSL",
        "ssl_cafile": str(cafile),
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "worker",
        "sasl_plain_password": "s3cret",
    }


def test_aiokafka_clients_get_sasl_and_a_context_trusting_the_ca(cafile: Path) -> None:
    kwargs = kafka_clients.aiokafka_kwargs(sasl_ssl(cafile))
    context = kwargs.pop("ssl_context")

    assert kwargs == {
        "bootstrap_servers": ["h1:9093", "h2:9093"],
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "worker",
        "sasl_plain_password": "s3cret",
    }
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [ca["subject"] for ca in context.get_ca_certs()] == [
        ((("commonName", "attribution unit-test CA"),),)]


def test_sasl_plaintext_has_no_tls_and_takes_the_password_from_its_file(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("from-file\n")
    settings = config(KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT", KAFKA_SASL_MECHANISM="PLAIN",
                      KAFKA_SASL_USERNAME="producer", KAFKA_SASL_PASSWORD_FILE=str(secret))

    for kwargs in (kafka_clients.kafka_python_kwargs(settings),
                   kafka_clients.aiokafka_kwargs(settings)):
        assert "ssl_context" not in kwargs and "ssl_cafile" not in kwargs
        assert kwargs["sasl_mechanism"] == "PLAIN"
        assert kwargs["sasl_plain_password"] == "from-file"


def test_ssl_alone_gets_tls_without_sasl(cafile: Path) -> None:
    settings = config(KAFKA_SECURITY_PROTOCOL="SSL", KAFKA_SSL_CAFILE=str(cafile))

    assert kafka_clients.kafka_python_kwargs(settings)["ssl_cafile"] == str(cafile)
    assert "sasl_mechanism" not in kafka_clients.kafka_python_kwargs(settings)
    credentials = kafka_clients.faust_credentials(settings)
    assert credentials is not None and credentials.protocol.value == "SSL"


def test_faust_gets_sasl_credentials_over_tls(cafile: Path) -> None:
    import faust

    credentials = kafka_clients.faust_credentials(sasl_ssl(cafile))

    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol.value == "SASL_SSL"
    assert credentials.mechanism.value == "SCRAM-SHA-512"
    assert (credentials.username, credentials.password) == ("worker", "s3cret")
    assert kafka_clients.faust_broker(sasl_ssl(cafile)) == "kafka://h1:9093;kafka://h2:9093"


@pytest.mark.parametrize("make, client_class, kwargs_of", [
    (kafka_clients.aio_consumer, "AIOKafkaConsumer", kafka_clients.aiokafka_kwargs),
    (kafka_clients.aio_producer, "AIOKafkaProducer", kafka_clients.aiokafka_kwargs),
    (kafka_clients.aio_admin, "AIOKafkaAdminClient", kafka_clients.aiokafka_kwargs),
    (kafka_clients.consumer, "KafkaConsumer", kafka_clients.kafka_python_kwargs),
    (kafka_clients.producer, "KafkaProducer", kafka_clients.kafka_python_kwargs),
    (kafka_clients.admin, "KafkaAdminClient", kafka_clients.kafka_python_kwargs),
], ids=lambda value: value if isinstance(value, str) else "")
def test_every_constructor_passes_the_connection_and_the_clients_own_settings(
    make, client_class, kwargs_of, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    made: list[dict[str, object]] = []
    monkeypatch.setattr(kafka_clients, client_class, lambda **kwargs: made.append(kwargs))
    settings = config(KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT", KAFKA_SASL_USERNAME="worker",
                      KAFKA_SASL_PASSWORD="s3cret")

    make(settings, client_id="unit")

    assert made == [{**kwargs_of(settings), "client_id": "unit"}]
    assert made[0]["sasl_plain_password"] == "s3cret"
