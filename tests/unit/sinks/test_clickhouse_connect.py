"""`sinks.clickhouse.connect` hands the URL's TLS settings to clickhouse-driver, and a certificate
that does not verify stops the sink instead of being retried as an outage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from clickhouse_driver import errors as ch_errors

from schemas.config import ClickHouseTarget
from sinks import clickhouse


@pytest.fixture
def driver_kwargs(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(clickhouse, "Client", lambda **kwargs: seen.update(kwargs))
    return seen


def test_a_clickhouses_url_with_a_ca_file_connects_with_tls_verified_against_it(
    driver_kwargs: dict[str, Any], tmp_path: Path,
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    clickhouse.connect(ClickHouseTarget(f"clickhouses://worker:pw@ch.example/attribution?ca_certs={ca}"))
    assert {k: driver_kwargs[k] for k in ("host", "port", "user", "password", "database", "secure",
                                          "verify", "ca_certs")} == {
        "host": "ch.example", "port": 9440, "user": "worker", "password": "pw",
        "database": "attribution", "secure": True, "verify": True, "ca_certs": str(ca),
    }


def test_a_plain_url_connects_without_tls(driver_kwargs: dict[str, Any]) -> None:
    clickhouse.connect(ClickHouseTarget("clickhouse://default@localhost:9000/attribution"),
                       with_database=False)
    assert (driver_kwargs["secure"], driver_kwargs["verify"], driver_kwargs["ca_certs"],
            driver_kwargs["database"]) == (False, False, None, "default")


def test_an_untrusted_certificate_is_fatal_not_transient() -> None:
    error = ch_errors.NetworkError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
                                   "unable to get local issuer certificate (ch:9440)")
    assert clickhouse.is_untrusted_certificate(error)
    assert not clickhouse.is_transient(error)
    assert clickhouse.is_transient(ch_errors.NetworkError("Connection refused (ch:9440)"))
