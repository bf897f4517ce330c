"""`clickhouses://` against a real ClickHouse 18.16 listening with TLS (a private server with the
local stack's templates and its own CA: the shared server is not restarted for this): the worker's
sink writes over TLS verified against the CA file, and a certificate it cannot verify stops the
sink instead of being retried as an outage."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from deploy.clickhouse_server import ClickHouseServer
from integration.private_clickhouse import private_clickhouse
from schemas.config import ClickHouseTarget
from sinks.clickhouse import RowSink, SinkFatal, connect
from sinks.migrate import migrate_server
from sinks.rows import TABLES

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseServer]:
    with private_clickhouse(tmp_path_factory.mktemp("tls"), tls=True) as server:
        yield server


def tls_url(server: ClickHouseServer, options: str) -> str:
    return f"clickhouses://default@localhost:{server.tls_port}/attribution{options}"


def test_the_sink_writes_over_tls_verified_against_the_servers_ca(tls_server: ClickHouseServer) -> None:
    target = ClickHouseTarget(tls_url(tls_server, f"?ca_certs={tls_server.ca_file}&verify=true"))
    migrate_server(target)
    sink = RowSink(target, TABLES)
    try:
        sink.add("clicks", ("c-tls", datetime(2026, 11, 2, 10, 15), "v1", "s1", "sally", "blog", "", ""))
        assert sink.flush() == []
    finally:
        sink.close()
    client = connect(target)
    try:
        assert client.execute("SELECT event_id FROM clicks FINAL") == [("c-tls",)]
        # The TLS port, not the plain one, answered.
        assert client.connection.port == tls_server.tls_port and client.connection.secure_socket
    finally:
        client.disconnect()


def test_a_certificate_the_client_cannot_verify_is_fatal(tls_server: ClickHouseServer) -> None:
    """The system CAs do not know the local stack's CA: no connection, and no endless retry."""
    target = ClickHouseTarget(tls_url(tls_server, ""))
    sink = RowSink(target, TABLES, sleep=lambda seconds: pytest.fail("retried an untrusted certificate"))
    try:
        sink.add("clicks", ("c-x", datetime(2026, 11, 2), "v1", "s1", "sally", "blog", "", ""))
        with pytest.raises(SinkFatal, match="CERTIFICATE_VERIFY_FAILED"):
            sink.flush()
        assert sink.pending_rows() == 1
    finally:
        sink.close()


def test_verify_false_connects_to_an_unknown_certificate(tls_server: ClickHouseServer) -> None:
    client = connect(ClickHouseTarget(tls_url(tls_server, "?verify=false")), with_database=False)
    try:
        assert client.execute("SELECT 1") == [(1,)]
    finally:
        client.disconnect()


def test_the_ca_file_is_under_the_servers_home(tls_server: ClickHouseServer) -> None:
    assert tls_server.ca_file == tls_server.home / "tls" / "ca.pem"
    assert (Path(tls_server.home) / "tls" / "server.key").stat().st_mode & 0o077 == 0
