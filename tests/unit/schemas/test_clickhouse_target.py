"""`CLICKHOUSE_URL` (schemas.config.ClickHouseTarget): TLS and its verification options."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.config import ClickHouseTarget


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return path


def test_plain_clickhouse_is_not_tls() -> None:
    target = ClickHouseTarget("clickhouse://worker:secret@ch:9000/attribution")
    assert (target.secure, target.verify, target.ca_certs, target.port) == (False, False, None, 9000)


def test_clickhouses_is_tls_verified_against_the_system_cas_by_default() -> None:
    target = ClickHouseTarget("clickhouses://worker:secret@ch/attribution")
    assert (target.secure, target.verify, target.ca_certs, target.port) == (True, True, None, 9440)


def test_clickhouses_verifies_against_the_given_ca_file(ca_file: Path) -> None:
    target = ClickHouseTarget(f"clickhouses://worker:secret@ch:9440/attribution?ca_certs={ca_file}&verify=true")
    assert (target.verify, target.ca_certs) == (True, ca_file)
    assert repr(target) == f"clickhouses://worker@ch:9440/attribution?ca_certs={ca_file}"
    assert "secret" not in repr(target)


def test_verification_can_be_turned_off_and_says_so() -> None:
    target = ClickHouseTarget("clickhouses://worker@ch/attribution?verify=false")
    assert (target.secure, target.verify) == (True, False)
    assert repr(target).endswith("?verify=false")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("clickhouse://ch/attribution?ca_certs=/etc/hosts", "use clickhouses://"),
        ("clickhouses://ch/attribution?cafile=/etc/hosts", "unknown option"),
        ("clickhouses://ch/attribution?verify=maybe", "verify must be true or false"),
        ("clickhouses://ch/attribution?ca_certs=/no/such/ca.pem", "is not a file"),
        ("clickhouses://ch/attribution?verify=false&ca_certs=/etc/hosts", "unused with verify=false"),
        ("clickhouses://ch/attribution?verify=true&verify=false", "twice"),
    ],
)
def test_a_wrong_tls_option_is_refused_with_a_message(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClickHouseTarget(url)
