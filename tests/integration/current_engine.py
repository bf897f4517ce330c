"""Fixtures for a current ClickHouse server (26.9, from chdb-core) beside the local 18.16.

Import the fixtures into a test module that needs them:

    from integration.current_engine import current_clickhouse, current_target  # noqa: F401

Both skip, saying why, when the pinned chdb-core is not installed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from deploy.current_clickhouse import CurrentClickHouse, chdb_core_extension
from deploy.current_clickhouse import current_clickhouse as started_server
from deploy.processes import free_port
from schemas.config import ClickHouseTarget


@pytest.fixture(scope="session")
def current_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CurrentClickHouse]:
    """The current server of this test session: started on first use, stopped at the end."""
    try:
        chdb_core_extension()
    except LookupError as missing:
        pytest.skip(f"no current ClickHouse: {missing}")
    home = tmp_path_factory.mktemp("current-clickhouse")
    with started_server(home, free_port(), free_port()) as server:
        yield server


@pytest.fixture(scope="session")
def current_clickhouse(current_server: CurrentClickHouse) -> ClickHouseTarget:
    """The current server as a CLICKHOUSE_URL target, database `attribution` (not created)."""
    return ClickHouseTarget(current_server.url("attribution"))


@pytest.fixture
def current_target(current_server: CurrentClickHouse) -> Iterator[ClickHouseTarget]:
    """A database of this test's own on the current server (not created), dropped after it."""
    target = ClickHouseTarget(current_server.url(f"t_{uuid.uuid4().hex[:10]}"))
    yield target
    from sinks.clickhouse import connect

    client = connect(target, with_database=False)
    try:
        client.execute(f"DROP DATABASE IF EXISTS {target.database}")
    finally:
        client.disconnect()
