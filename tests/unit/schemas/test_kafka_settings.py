"""Contract §1's Kafka security settings: validated at start-up, secrets never shown."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from schemas.config import Config

SASL = {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_USERNAME": "worker"}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME",
                 "KAFKA_SASL_PASSWORD", "KAFKA_SASL_PASSWORD_FILE", "KAFKA_SSL_CAFILE"):
        monkeypatch.delenv(name, raising=False)


def config(**env: str) -> Config:
    return Config(**env)  # type: ignore[arg-type]


def failure(**env: str) -> str:
    with pytest.raises(ValidationError) as caught:
        config(**env)
    return str(caught.value)


def test_defaults_are_plaintext_and_scram_sha_512() -> None:
    plain = config()

    assert plain.kafka_security_protocol == "PLAINTEXT"
    assert plain.kafka_sasl_mechanism == "SCRAM-SHA-512"
    assert not plain.kafka_uses_sasl and not plain.kafka_uses_tls


def test_the_protocol_and_mechanism_are_read_from_the_environment_in_any_case(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "sasl_plaintext")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "scram-sha-256")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "worker")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "s3cret")

    from_env = Config.from_env()

    assert from_env.kafka_security_protocol == "SASL_PLAINTEXT"
    assert from_env.kafka_sasl_mechanism == "SCRAM-SHA-256"
    assert from_env.kafka_uses_sasl and not from_env.kafka_uses_tls


def test_an_unknown_protocol_is_refused_naming_the_variable() -> None:
    assert "KAFKA_SECURITY_PROTOCOL" in failure(KAFKA_SECURITY_PROTOCOL="TLS")


def test_an_unknown_mechanism_is_refused_naming_the_variable() -> None:
    assert "KAFKA_SASL_MECHANISM" in failure(KAFKA_SASL_MECHANISM="GSSAPI")


def test_sasl_without_a_username_is_refused() -> None:
    assert "KAFKA_SASL_USERNAME is required" in failure(
        KAFKA_SECURITY_PROTOCOL="SASL_SSL", KAFKA_SASL_PASSWORD="s3cret")


def test_sasl_without_a_password_is_refused() -> None:
    assert "KAFKA_SASL_PASSWORD or KAFKA_SASL_PASSWORD_FILE is required" in failure(**SASL)


def test_a_password_and_a_password_file_together_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")

    message = failure(**SASL, KAFKA_SASL_PASSWORD="s3cret", KAFKA_SASL_PASSWORD_FILE=str(secret))

    assert "both set" in message


def test_the_password_file_gives_its_first_line(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")

    settings = config(**SASL, KAFKA_SASL_PASSWORD_FILE=str(secret))

    assert settings.kafka_sasl_password_value is not None
    assert settings.kafka_sasl_password_value.get_secret_value() == "s3cret"


def test_an_unreadable_password_file_is_refused_naming_the_variable(tmp_path: Path) -> None:
    message = failure(**SASL, KAFKA_SASL_PASSWORD_FILE=str(tmp_path / "missing"))

    assert "KAFKA_SASL_PASSWORD_FILE" in message and "cannot read" in message


def test_an_empty_password_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "password"
    empty.write_text("")

    assert "KAFKA_SASL_PASSWORD_FILE is required" in failure(
        **SASL, KAFKA_SASL_PASSWORD_FILE=str(empty))


def test_a_missing_ca_file_is_refused_naming_the_variable(tmp_path: Path) -> None:
    message = failure(KAFKA_SSL_CAFILE=str(tmp_path / "ca.pem"))

    assert "KAFKA_SSL_CAFILE" in message


def test_an_empty_variable_counts_as_unset() -> None:
    """`attribution stack env` exports the settings a connection does not use empty."""
    settings = config(KAFKA_SECURITY_PROTOCOL="", KAFKA_SASL_MECHANISM="", KAFKA_SSL_CAFILE="",
                      KAFKA_SASL_USERNAME="", KAFKA_SASL_PASSWORD="", KAFKA_SASL_PASSWORD_FILE="")

    assert settings.kafka_security_protocol == "PLAINTEXT"
    assert settings.kafka_sasl_mechanism == "SCRAM-SHA-512"
    assert settings.kafka_sasl_username is None and settings.kafka_sasl_password is None
    assert settings.kafka_sasl_password_file is None and settings.kafka_ssl_cafile is None


def test_the_password_never_appears_in_repr_or_str(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("file-s3cret\n")
    inline = config(**SASL, KAFKA_SASL_PASSWORD="inline-s3cret")
    from_file = config(**SASL, KAFKA_SASL_PASSWORD_FILE=str(secret))
    from_file.kafka_sasl_password_value  # read and cached: must not show up either

    for settings, password in ((inline, "inline-s3cret"), (from_file, "file-s3cret")):
        assert password not in repr(settings) and password not in str(settings)
        assert password not in str(settings.model_dump())


def test_credentials_are_ignored_without_sasl() -> None:
    assert not config(KAFKA_SASL_USERNAME="worker").kafka_uses_sasl
