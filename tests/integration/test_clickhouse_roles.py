"""Least privilege in ClickHouse, against a real 18.16 server (a private one with the local stack's
users.xml, so that users added since the shared server started are there) and, for the SQL roles
of current servers, chdb's embedded engine:

- the local stack's `bi` user reads but cannot INSERT or ALTER;
- `db migrate --print-roles` prints the GRANTs of the writer and reader roles, which parse on the
  current engine;
- on 18.16, which has no SQL access control, `db migrate` prints a users.xml snippet instead, and
  installed as printed it gives the worker INSERT without DDL and BI SELECT only.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from clickhouse_driver import errors as ch_errors

from deploy.clickhouse_server import ClickHouseServer
from integration.private_clickhouse import private_clickhouse
from schemas.config import ClickHouseTarget
from sinks.clickhouse import RowSink, SinkFatal, connect
from sinks.migrate import migrate_server, role_statements
from sinks.rows import TABLES

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
#: Seconds 18.16 may take to notice a changed users.d file (it looks every few seconds).
USERS_RELOAD_SECONDS = 30.0
A_CLICK = ("c1", datetime(2026, 11, 2, 10, 15), "v1", "s1", "sally", "blog", "", "")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseServer]:
    with private_clickhouse(tmp_path_factory.mktemp("roles")) as started:
        yield started


@pytest.fixture
def database(server: ClickHouseServer) -> str:
    name = f"t_{uuid.uuid4().hex[:10]}"
    migrate_server(ClickHouseTarget(f"clickhouse://default@{server.address}/{name}"))
    return name


def as_user(server: ClickHouseServer, user: str, database: str, password: str = "") -> ClickHouseTarget:
    secret = f":{password}" if password else ""
    return ClickHouseTarget(f"clickhouse://{user}{secret}@{server.address}/{database}")


def execute(target: ClickHouseTarget, sql: str, rows: list[Any] | None = None) -> Any:
    client = connect(target)
    try:
        return client.execute(sql, rows) if rows is not None else client.execute(sql)
    finally:
        client.disconnect()


def refused(target: ClickHouseTarget, sql: str, rows: list[Any] | None = None) -> int:
    """The code of the server's refusal of `sql`; fails if it was run."""
    with pytest.raises(ch_errors.ServerException) as refusal:
        execute(target, sql, rows)
    return int(refusal.value.code)


def insert_sql(database: str) -> str:
    return TABLES["clicks"].insert_sql(database)


def attribution(database: str, server: ClickHouseServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CLICKHOUSE_URL=f"clickhouse://default@{server.address}/{database}",
               PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "attribution", "db", "migrate", *args], env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_the_local_stacks_bi_user_reads_but_cannot_insert_or_alter(
    server: ClickHouseServer, database: str,
) -> None:
    admin, bi = as_user(server, "default", database), as_user(server, "bi", database)
    execute(admin, insert_sql(database), [A_CLICK])
    assert execute(bi, "SELECT count() FROM clicks FINAL") == [(1,)]
    readonly = 164  # READONLY: "Cannot insert into table in readonly mode"
    assert refused(bi, insert_sql(database), [A_CLICK]) == readonly
    assert refused(bi, "ALTER TABLE clicks DELETE WHERE 1") == readonly
    assert refused(bi, "CREATE TABLE bi_was_here (a UInt8) ENGINE = Memory") == readonly
    # A worker misconfigured with the BI user stops (fatal), it does not retry forever.
    sink = RowSink(bi, TABLES, sleep=lambda seconds: pytest.fail("retried a readonly refusal"))
    try:
        sink.add("clicks", A_CLICK)
        with pytest.raises(SinkFatal, match="readonly"):
            sink.flush()
    finally:
        sink.close()


def test_print_roles_prints_the_grants_of_the_writer_and_reader_roles(
    server: ClickHouseServer,
) -> None:
    done = attribution("attribution", server, "--print-roles")
    assert done.returncode == 0, done.stderr
    assert "GRANT SELECT, INSERT ON attribution.* TO attribution_writer;" in done.stdout
    assert "GRANT SELECT ON attribution.* TO attribution_reader;" in done.stdout
    statements = [line for line in done.stdout.splitlines() if line and not line.startswith("--")]
    assert statements == [f"{s};" for s in role_statements("attribution")]
    assert not any(word in done.stdout for word in ("ALTER", "DROP", "ACCESS MANAGEMENT", "WITH GRANT"))


def test_the_role_sql_parses_on_current_clickhouse() -> None:
    """chdb's embedded engine keeps no roles (no writable access storage), so EXPLAIN AST: the
    current parser checks the statement, the privilege names included."""
    chdb_session = pytest.importorskip("chdb.session", reason="chdb is not installed")
    session = chdb_session.Session()
    try:
        for statement in role_statements("attribution"):
            assert "Query" in str(session.query(f"EXPLAIN AST {statement}", "TSV")), statement
        with pytest.raises(Exception, match="Syntax error"):
            session.query("EXPLAIN AST GRANT SELECT, INSERTS ON attribution.* TO attribution_writer")
    finally:
        session.close()


def test_on_18_16_migrate_prints_users_xml_that_gives_the_worker_insert_without_ddl(
    server: ClickHouseServer, database: str,
) -> None:
    done = attribution(database, server)
    assert done.returncode == 0, done.stderr
    assert "no SQL access control" in done.stderr
    snippet = done.stdout[done.stdout.index("<?xml"):]
    password = uuid.uuid4().hex
    digest = hashlib.sha256(password.encode()).hexdigest()
    users_d = server.home / "users.d"
    users_d.mkdir(exist_ok=True)
    (users_d / f"{database}.xml").write_text(
        snippet.replace("REPLACE_WITH_SHA256_OF_THE_PASSWORD", digest)
    )
    worker = as_user(server, f"{database}_worker", database, password)
    bi = as_user(server, f"{database}_bi", database, password)
    deadline = time.monotonic() + USERS_RELOAD_SECONDS
    while True:
        try:
            execute(worker, "SELECT 1")
            break
        except ch_errors.ServerException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)

    sink = RowSink(worker, TABLES)
    try:
        sink.add("clicks", A_CLICK)
        assert sink.flush() == []
    finally:
        sink.close()
    assert execute(bi, "SELECT count() FROM clicks FINAL") == [(1,)]
    query_is_prohibited, readonly, database_access_denied = 392, 164, 291
    assert refused(worker, "ALTER TABLE clicks DELETE WHERE 1") == query_is_prohibited
    assert refused(worker, "DROP TABLE clicks") == query_is_prohibited
    assert refused(worker, "SET allow_ddl = 1") == query_is_prohibited
    assert refused(worker, "SELECT count() FROM default.nothing_here") == database_access_denied
    assert refused(bi, insert_sql(database), [A_CLICK]) == readonly
