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


# --- Least privilege: who may do what in the database ----------------------------------------


@dataclass(frozen=True)
class Role:
    """A ClickHouse role of the database's users, e.g. `attribution_writer`."""

    suffix: str
    privileges: str
    #: Who is given it, for the printed SQL and users.xml.
    holder: str

    def name(self, database: str) -> str:
        return f"{database}_{self.suffix}"


#: The worker inserts rows and reads them back; BI dashboards and `attribution report` read.
#: Neither may change the schema (`db migrate` runs as an administrator) or anyone's rights.
WRITER = Role("writer", "SELECT, INSERT", "the worker")
READER = Role("reader", "SELECT", "BI dashboards and `attribution report`")
ROLES = (WRITER, READER)


def role_statements(database: str) -> list[str]:
    """CREATE ROLE and GRANT for each role, idempotent (ClickHouse with SQL access control).

    GRANT only adds: a privilege dropped from a role here must be revoked by hand.
    """
    statements = []
    for role in ROLES:
        statements += [f"CREATE ROLE IF NOT EXISTS {role.name(database)}",
                       f"GRANT {role.privileges} ON {database}.* TO {role.name(database)}"]
    return statements


def roles_sql(database: str) -> str:
    """The role statements as a script for `clickhouse-client --multiquery`, users as comments."""
    lines = [f"-- Roles of the attribution database `{database}` (ClickHouse with SQL access control,"
             " 20.x and later).",
             "-- Run as a user with access management; idempotent."]
    lines += [f"{statement};" for statement in role_statements(database)]
    lines += ["-- Then one user per process, e.g.:"]
    for role, user in ((WRITER, "worker"), (READER, "bi")):
        lines += [
            f"--   CREATE USER IF NOT EXISTS {database}_{user} IDENTIFIED WITH sha256_password BY '...';",
            f"--   GRANT {role.name(database)} TO {database}_{user};  -- {role.holder}",
        ]
    return "\n".join(lines) + "\n"


def roles_users_xml(database: str) -> str:
    """The same rights for servers without SQL access control (18.16): a users.xml snippet."""
    writer, reader = WRITER.name(database), READER.name(database)
    return f"""<?xml version="1.0"?>
<!--
  Users of the attribution database `{database}` for ClickHouse without SQL access control (before
  20.x, e.g. Debian's 18.16), which has no CREATE ROLE or GRANT: put this file in users.d/ beside
  users.xml (read again within seconds, no restart). Replace each password hash with
  `printf '%s' "$PASSWORD" | sha256sum`, and the networks with where the processes run.
  {writer}: INSERT and SELECT; allow_ddl 0 refuses CREATE, ALTER, DROP, TRUNCATE and OPTIMIZE, and
  turning it back on. {reader}: readonly 1, SELECT only. allow_databases keeps both in `{database}`.
-->
<yandex>
    <profiles>
        <{writer}>
            <allow_ddl>0</allow_ddl>
        </{writer}>
        <{reader}>
            <readonly>1</readonly>
        </{reader}>
    </profiles>
    <users>
        <{database}_worker>
            <password_sha256_hex>REPLACE_WITH_SHA256_OF_THE_PASSWORD</password_sha256_hex>
            <networks><ip>::/0</ip></networks>
            <profile>{writer}</profile>
            <quota>default</quota>
            <allow_databases><database>{database}</database></allow_databases>
        </{database}_worker>
        <{database}_bi>
            <password_sha256_hex>REPLACE_WITH_SHA256_OF_THE_PASSWORD</password_sha256_hex>
            <networks><ip>::/0</ip></networks>
            <profile>{reader}</profile>
            <quota>default</quota>
            <allow_databases><database>{database}</database></allow_databases>
        </{database}_bi>
    </users>
</yandex>
"""


def has_sql_access_control(execute: Executor) -> bool:
    """Whether the server knows CREATE ROLE (20.x and later have `system.roles`)."""
    rows = execute("SELECT count() FROM system.tables WHERE database = 'system' AND name = 'roles'")
    return bool(rows and int(str(rows[0][0])))


def create_roles(execute: Executor, database: str) -> list[str]:
    """Create the roles and grant their rights; returns the roles' names."""
    for statement in role_statements(database):
        execute(statement)
    return [role.name(database) for role in ROLES]


@dataclass(frozen=True)
class RolesOutcome:
    """What `ensure_roles_server` did: created the roles, or why not and what to run by hand."""

    created: list[str]
    #: When not created: the SQL (or, without SQL access control, the users.xml) to apply by hand.
    by_hand: str | None = None
    reason: str | None = None


def ensure_roles_server(target: "ClickHouseTarget") -> RolesOutcome:
    """Create the database's roles when the server and the connected user can; else say why."""
    from clickhouse_driver import errors as ch_errors

    from .clickhouse import connect

    client = connect(target, with_database=False)
    try:
        def execute(sql: str, rows: list[tuple[object, ...]] | None = None) -> list[tuple[object, ...]]:
            return client.execute(sql)  # type: ignore[no-any-return]

        if not has_sql_access_control(execute):
            return RolesOutcome([], roles_users_xml(target.database),
                                "this ClickHouse has no SQL access control (CREATE ROLE, GRANT)")
        try:
            return RolesOutcome(create_roles(execute, target.database))
        except ch_errors.ServerException as exc:  # no access management for this user, mostly
            message = (exc.message or "").strip().splitlines() or [""]
            return RolesOutcome([], roles_sql(target.database),
                                f"{target.user} cannot create roles (code {exc.code}: {message[0]})")
    finally:
        client.disconnect()
