"""Fixtures for a current ClickHouse server (26.9, from chdb-core) beside the local 18.16.

Import the fixtures into a test module that needs them:

    from integration.current_engine import current_clickhouse, current_target  # noqa: F401

The current ones skip, saying why, when the pinned chdb-core is not installed. `debian_target` is
a database on the local 18.16; `engine_target` runs a test once on each server (import
`current_server`, `current_target` and `debian_target` with it).
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


def drop_database(target: ClickHouseTarget) -> None:
    """Drop a test's database (if it was made)."""
    from sinks.clickhouse import connect

    client = connect(target, with_database=False)
    try:
        client.execute(f"DROP DATABASE IF EXISTS {target.database}")
    finally:
        client.disconnect()


@pytest.fixture
def current_target(current_server: CurrentClickHouse) -> Iterator[ClickHouseTarget]:
    """A database of this test's own on the current server (not created), dropped after it."""
    target = ClickHouseTarget(current_server.url(f"t_{uuid.uuid4().hex[:10]}"))
    yield target
    drop_database(target)


@pytest.fixture
def debian_target(request: pytest.FixtureRequest) -> Iterator[ClickHouseTarget]:
    """A database of this test's own on the local 18.16 (not created), dropped after it.

    Only ClickHouse is needed: the `stack` fixture (which starts Kafka too) only when ClickHouse
    is not running, so a broker held down on purpose elsewhere is left alone.
    """
    from deploy.stack import Stack

    local = Stack()
    if not local.status().clickhouse.running:
        local = request.getfixturevalue("stack")
    target = ClickHouseTarget(
        f"clickhouse://default@{local.clickhouse_address}/t_{uuid.uuid4().hex[:10]}")
    yield target
    drop_database(target)


@pytest.fixture(params=["debian_18_16", "current"])
def engine_target(request: pytest.FixtureRequest) -> ClickHouseTarget:
    """A database of this test's own (not created), on the local 18.16 and on the current server:
    the test runs once on each."""
    name = "debian_target" if request.param == "debian_18_16" else "current_target"
    target: ClickHouseTarget = request.getfixturevalue(name)
    return target
