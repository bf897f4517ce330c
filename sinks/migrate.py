"""Versioned ClickHouse migrations: ordered SQL files, each applied once, recorded in a table.

Files are `sinks/migrations/NNNN_name.sql`; `{db}` in them is the configured database. Every
statement must be idempotent on its own (`IF NOT EXISTS`), because ClickHouse has no DDL
transactions: a migration interrupted half-way is simply applied again.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from schemas.config import ClickHouseTarget

MIGRATIONS_TABLE = "schema_migrations"
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class Executor(Protocol):
    """Runs one statement; `rows` are the data of an `INSERT ... VALUES` statement."""

    def __call__(self, sql: str, rows: list[tuple[object, ...]] | None = None) -> list[tuple[object, ...]]: ...


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    def statements(self, database: str) -> list[str]:
        """The file's statements with `{db}` filled in and comment lines dropped."""
        body = "\n".join(
            line for line in self.sql.splitlines() if not line.lstrip().startswith("--")
        ).replace("{db}", database)
        return [stmt.strip() for stmt in body.split(";") if stmt.strip()]


def available_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("sinks").joinpath("migrations").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if len(versions) != len(set(versions)):
        raise RuntimeError(f"two migration files share a version: {sorted(versions)}")
    return sorted(found, key=lambda m: m.version)


def migrate(
    execute: Executor, database: str, progress: Callable[[str], None] = lambda _: None
) -> list[Migration]:
    """Create `database` and apply the migrations it lacks; returns those applied now."""
    execute(f"CREATE DATABASE IF NOT EXISTS {database}")
    execute(
        f"CREATE TABLE IF NOT EXISTS {database}.{MIGRATIONS_TABLE} "
        "(version UInt32, name String, applied_at DateTime('UTC') DEFAULT now()) "
        "ENGINE = ReplacingMergeTree ORDER BY version"
    )
    applied = {int(str(row[0])) for row in execute(f"SELECT version FROM {database}.{MIGRATIONS_TABLE}")}
    done = []
    for migration in available_migrations():
        if migration.version in applied:
            continue
        progress(f"applying migration {migration.version:04d}_{migration.name}")
        for statement in migration.statements(database):
            execute(statement)
        execute(
            f"INSERT INTO {database}.{MIGRATIONS_TABLE} (version, name) VALUES",
            [(migration.version, migration.name)],
        )
        done.append(migration)
    return done


def migrate_server(target: "ClickHouseTarget", progress: Callable[[str], None] = lambda _: None) -> list[Migration]:
    """`migrate` against a ClickHouse server over the native protocol."""
    from .clickhouse import connect

    client = connect(target, with_database=False)
    try:
        def execute(sql: str, rows: list[tuple[object, ...]] | None = None) -> list[tuple[object, ...]]:
            return client.execute(sql, rows) if rows is not None else client.execute(sql)  # type: ignore[no-any-return]

        return migrate(execute, target.database, progress)
    finally:
        client.disconnect()
