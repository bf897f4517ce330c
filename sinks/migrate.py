"""Versioned ClickHouse migrations: ordered SQL files, each applied once, recorded in a table.

Files are `sinks/migrations/NNNN_name.sql`. Every statement must be idempotent on its own (`IF
NOT EXISTS`), because ClickHouse has no DDL transactions: a migration interrupted half-way is
simply applied again.

The DDL is rendered for the server it runs on (`Dialect`): production runs current ClickHouse,
the dev box Debian's 18.16, and the schema must be the best each can hold.

- `{db}` is the configured database; `{clicks_ttl_days}`, `{pii_ttl_days}` and
  `{rollup_refresh_seconds}` come from `SchemaOptions` (settings).
- `LowCardinality(T)` is written as `T` where the server lacks it (18.16 has it only behind an
  experimental setting).
- `DAY_OF(col)` in a sort key is `toDate(col)`, except on 18.16, where it is `toDate(col, 'UTC')`
  (the same day, as the columns are UTC): 18.16's FINAL computes the key's expressions into the
  block, and a query that computes the same expression (`toDate(ts) AS day ... GROUP BY day`)
  then fails with "Column 'toDate(ts)' already exists".
- A comment line `-- requires: FEATURE` right above a statement applies it only where the
  server has FEATURE (`low_cardinality`, `ttl`, `refreshable_views`); `-- unless: FEATURE` only
  where it has not.
- `-- rebuild: TABLE` above a `CREATE TABLE {db}.TABLE` gives the table a new definition (a sort
  key cannot be altered): the rows are copied into a table made from it, which then takes the old
  one's name (`rebuild_table`).

After the numbered migrations, `reconcile` makes what settings decide (TTL periods, the rollup's
refresh period) match them, on every run.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from schemas.config import ClickHouseTarget, Config

MIGRATIONS_TABLE = "schema_migrations"
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_DIRECTIVE = re.compile(r"^\s*--\s*(requires|unless|rebuild):\s*([a-z_][a-z0-9_]*)\s*$")
_MARK = re.compile(r"/\*@(requires|unless|rebuild):([a-z0-9_]+)\*/")
_DAY_OF = re.compile(r"\bDAY_OF\((\w+)\)")
_LOW_CARDINALITY = re.compile(r"LowCardinality\(([^()]*(?:\([^()]*\))?)\)")


class Executor(Protocol):
    """Runs one statement; `rows` are the data of an `INSERT ... VALUES` statement."""

    def __call__(self, sql: str, rows: list[tuple[object, ...]] | None = None) -> list[tuple[object, ...]]: ...


#: The first release with each feature the DDL uses where it can.
FEATURES: dict[str, tuple[int, int]] = {
    "low_cardinality": (19, 0),   # 18.12-18.x: experimental, behind a setting
    "ttl": (19, 6),
    "refreshable_views": (24, 10),  # 23.12-24.9: experimental, behind a setting
    # FINAL no longer clashes with a query computing a sort key expression (see DAY_OF above).
    "final_with_key_expressions": (19, 0),
}


@dataclass(frozen=True)
class Dialect:
    """What the connected server can hold, from its version."""

    version: tuple[int, int]

    @classmethod
    def detect(cls, execute: Executor) -> "Dialect":
        return cls.parse(str(execute("SELECT version()")[0][0]))

    @classmethod
    def parse(cls, version: str) -> "Dialect":
        match = re.match(r"\s*(\d+)\.(\d+)", version)
        if not match:
            raise ValueError(f"not a ClickHouse version: {version!r}")
        return cls((int(match[1]), int(match[2])))

    def has(self, feature: str) -> bool:
        if feature not in FEATURES:
            raise ValueError(f"unknown schema feature {feature!r}; known: {', '.join(FEATURES)}")
        return self.version >= FEATURES[feature]

    @property
    def low_cardinality(self) -> bool:
        return self.has("low_cardinality")

    @property
    def ttl(self) -> bool:
        return self.has("ttl")

    @property
    def refreshable_views(self) -> bool:
        return self.has("refreshable_views")

    def __str__(self) -> str:
        return f"ClickHouse {self.version[0]}.{self.version[1]}"


#: The oldest server the schema supports (Debian's package); what rendering assumes by default.
DEBIAN_18_16 = Dialect((18, 16))


@dataclass(frozen=True)
class SchemaOptions:
    """What settings decide in the schema (env, `schemas.config.Config`); 0 days = no TTL."""

    #: Raw clicks are deleted this many days after their `ts` (the rollup keeps their counts).
    clicks_ttl_days: int = 400
    #: Identifying columns (visitor, session and customer ids) are emptied this many days after
    #: their row's `ts`; money and attribution stay.
    pii_ttl_days: int = 400
    #: How often current servers refresh the rollup (its refreshable materialized view).
    rollup_refresh_seconds: int = 300

    @classmethod
    def from_config(cls, config: "Config") -> "SchemaOptions":
        return cls(config.clickhouse_clicks_ttl_days, config.clickhouse_pii_ttl_days,
                   config.rollup_refresh_seconds)

    def placeholders(self, database: str) -> dict[str, str]:
        return {"{db}": database, "{clicks_ttl_days}": str(self.clicks_ttl_days),
                "{pii_ttl_days}": str(self.pii_ttl_days),
                "{rollup_refresh_seconds}": str(self.rollup_refresh_seconds)}


@dataclass(frozen=True)
class Statement:
    sql: str
    #: The table this statement newly defines (`-- rebuild:`), rebuilt by `rebuild_table`.
    rebuild: str | None = None


def render(sql: str, database: str, dialect: Dialect = DEBIAN_18_16,
           options: SchemaOptions = SchemaOptions()) -> list[Statement]:
    """A migration file's statements for this server and these settings, in order."""
    lines = []
    for line in sql.splitlines():
        directive = _DIRECTIVE.match(line)
        if directive:
            lines.append(f"/*@{directive[1]}:{directive[2]}*/")
        elif not line.lstrip().startswith("--"):
            lines.append(line)
    body = "\n".join(lines)
    for placeholder, value in options.placeholders(database).items():
        body = body.replace(placeholder, value)
    statements = []
    for chunk in body.split(";"):
        marks = _MARK.findall(chunk)
        text = _MARK.sub("", chunk).strip()
        if not text:
            if marks:
                raise ValueError(f"a directive with no statement after it: {marks}")
            continue
        rebuild = None
        applies = True
        for kind, name in marks:
            if kind == "rebuild":
                rebuild = name
            elif dialect.has(name) != (kind == "requires"):
                applies = False
        if not applies:
            continue
        if not dialect.low_cardinality:
            text = _LOW_CARDINALITY.sub(r"\1", text)
        day_of = r"toDate(\1)" if dialect.has("final_with_key_expressions") else r"toDate(\1, 'UTC')"
        text = _DAY_OF.sub(day_of, text)
        statements.append(Statement(text, rebuild))
    return statements


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    def plan(self, database: str, dialect: Dialect = DEBIAN_18_16,
             options: SchemaOptions = SchemaOptions()) -> list[Statement]:
        return render(self.sql, database, dialect, options)

    def statements(self, database: str, dialect: Dialect = DEBIAN_18_16,
                   options: SchemaOptions = SchemaOptions()) -> list[str]:
        """The file's statements with the placeholders filled in and comment lines dropped."""
        return [statement.sql for statement in self.plan(database, dialect, options)]


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
    execute: Executor, database: str, progress: Callable[[str], None] = lambda _: None,
    options: SchemaOptions = SchemaOptions(),
) -> list[Migration]:
    """Create `database` and apply the migrations it lacks; returns those applied now."""
    dialect = Dialect.detect(execute)
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
        progress(f"applying migration {migration.version:04d}_{migration.name} ({dialect})")
        for statement in migration.plan(database, dialect, options):
            if statement.rebuild:
                rebuild_table(execute, database, statement.rebuild, statement.sql,
                              migration.version, progress)
            else:
                execute(statement.sql)
        execute(
            f"INSERT INTO {database}.{MIGRATIONS_TABLE} (version, name) VALUES",
            [(migration.version, migration.name)],
        )
        done.append(migration)
    reconcile(execute, database, dialect, options, progress)
    return done


def migrate_server(target: "ClickHouseTarget", progress: Callable[[str], None] = lambda _: None,
                   options: SchemaOptions = SchemaOptions()) -> list[Migration]:
    """`migrate` against a ClickHouse server over the native protocol."""
    from .clickhouse import connect

    client = connect(target, with_database=False)
    try:
        def execute(sql: str, rows: list[tuple[object, ...]] | None = None) -> list[tuple[object, ...]]:
            return client.execute(sql, rows) if rows is not None else client.execute(sql)  # type: ignore[no-any-return]

        return migrate(execute, target.database, progress, options)
    finally:
        client.disconnect()


# --- Rebuilding a table under a new definition ---------------------------------------------------


def _exists(execute: Executor, database: str, table: str) -> bool:
    rows = execute(f"SELECT count() FROM system.tables WHERE database = '{database}' AND name = '{table}'")
    return bool(int(str(rows[0][0])))


def _columns(execute: Executor, database: str, table: str) -> list[str]:
    rows = execute(f"SELECT name FROM system.columns WHERE database = '{database}' "
                   f"AND table = '{table}' AND default_kind NOT IN ('MATERIALIZED', 'ALIAS')")
    return [str(row[0]) for row in rows]


def rebuild_table(execute: Executor, database: str, table: str, create_sql: str, version: int,
                  progress: Callable[[str], None] = lambda _: None) -> None:
    """Give `table` the definition `create_sql` (a CREATE TABLE of `{database}.{table}`), keeping
    its rows: copy them into `<table>__rebuild`, swap the names, then copy again what the old table
    received meanwhile. The tables are ReplacingMergeTree with deterministic rows, so a row copied
    twice is shown once by FINAL; that makes every step safe to run again after an interruption.
    The old table stays as `<table>__before_<version>` unless it is empty.

    Stop the workers while it runs: an insert that meets the table between the two names fails.
    """
    full, staging = f"{database}.{table}", f"{database}.{table}__rebuild"
    kept_name = f"{table}__before_{version:04d}"
    kept = f"{database}.{kept_name}"
    if not create_sql.lstrip().startswith(f"CREATE TABLE {full}"):
        raise ValueError(f"-- rebuild: {table} must precede CREATE TABLE {full}")
    if not _exists(execute, database, table) and _exists(execute, database, kept_name) \
            and _exists(execute, database, f"{table}__rebuild"):
        execute(f"RENAME TABLE {staging} TO {full}")  # cut off between the two renames
    since = "0"
    if not _exists(execute, database, kept_name):
        if not _exists(execute, database, table):
            execute(create_sql.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1))
            return
        execute(f"DROP TABLE IF EXISTS {staging}")
        execute(create_sql.replace(full, staging, 1))
        columns = ", ".join(c for c in _columns(execute, database, f"{table}__rebuild")
                            if c in set(_columns(execute, database, table)))
        since = str(execute("SELECT toUInt32(now())")[0][0])
        rows = int(str(execute(f"SELECT count() FROM {full}")[0][0]))
        progress(f"  rebuilding {table} under its new definition: copying {rows:,} rows")
        execute(f"INSERT INTO {staging} ({columns}) SELECT {columns} FROM {full}")
        execute(f"RENAME TABLE {full} TO {kept}, {staging} TO {full}")
    # What the old table received while it was copied (a minute's margin: clocks and batches).
    columns = ", ".join(c for c in _columns(execute, database, table)
                        if c in set(_columns(execute, database, kept_name)))
    execute(f"INSERT INTO {full} ({columns}) SELECT {columns} FROM {kept} "
            f"WHERE toUInt32(inserted_at) + 60 >= {since}")
    left = int(str(execute(f"SELECT count() FROM {kept}")[0][0]))
    if left == 0:
        execute(f"DROP TABLE {kept}")
    else:
        progress(f"  kept the old {table} as {kept_name} ({left:,} rows): drop it once you have "
                 f"checked the new one (DROP TABLE {kept})")


# --- What settings decide: reconciled on every run -------------------------------------------------

#: Columns that identify a person, per table, emptied after `pii_ttl_days` (a column TTL).
IDENTIFYING_COLUMNS: dict[str, tuple[str, ...]] = {
    "clicks": ("visitor_id", "session_id"),
    "attributed_orders": ("visitor_id", "customer_id"),
}


def _create_query(execute: Executor, database: str, table: str) -> str:
    rows = execute(f"SELECT create_table_query FROM system.tables "
                   f"WHERE database = '{database}' AND name = '{table}'")
    return str(rows[0][0]) if rows else ""


def _column_types(execute: Executor, database: str, table: str) -> dict[str, str]:
    rows = execute(f"SELECT name, type FROM system.columns WHERE database = '{database}' AND table = '{table}'")
    return {str(name): str(kind) for name, kind in rows}


def _ttl(days: int) -> str:
    return f"ts + toIntervalDay({days})"


def ttl_statements(execute: Executor, database: str, options: SchemaOptions) -> list[str]:
    """The ALTERs that make the tables' TTLs what the settings say (none when they already are)."""
    statements = []
    query = _create_query(execute, database, "clicks")
    table_ttl = re.search(r"\)\s*ENGINE[^\n]*(?:\n.*)*?\bTTL\s+(.+?)(?:\s+SETTINGS\b|$)", query, re.S)
    current = table_ttl[1].strip() if table_ttl else ""
    if options.clicks_ttl_days and current != _ttl(options.clicks_ttl_days):
        statements.append(f"ALTER TABLE {database}.clicks MODIFY TTL {_ttl(options.clicks_ttl_days)}")
    elif not options.clicks_ttl_days and current:
        statements.append(f"ALTER TABLE {database}.clicks REMOVE TTL")
    for table, columns in IDENTIFYING_COLUMNS.items():
        query = _create_query(execute, database, table)
        types = _column_types(execute, database, table)
        for column in columns:
            # one line in system.tables: "`visitor_id` String TTL ts + toIntervalDay(400), `…"
            found = re.search(rf"`?\b{column}`? [^,`]*? TTL (.+?)(?=, `|,\s*\n|\n|\)\s*ENGINE)",
                              query)
            current = found[1].strip() if found else ""
            if options.pii_ttl_days and current != _ttl(options.pii_ttl_days):
                statements.append(f"ALTER TABLE {database}.{table} MODIFY COLUMN {column} "
                                  f"{types[column]} TTL {_ttl(options.pii_ttl_days)}")
            elif not options.pii_ttl_days and current:
                statements.append(f"ALTER TABLE {database}.{table} MODIFY COLUMN {column} REMOVE TTL")
    return statements


def reconcile(execute: Executor, database: str, dialect: Dialect, options: SchemaOptions,
              progress: Callable[[str], None] = lambda _: None) -> None:
    """Make the TTLs and the rollup's refresh period match the settings, where the server has them."""
    if dialect.ttl:
        for statement in ttl_statements(execute, database, options):
            progress(f"  {statement.removeprefix(f'ALTER TABLE {database}.')}")
            execute(statement)
    try:
        from . import rollup
    except ImportError:  # the rollup module arrives with migration 0007
        return
    reconcile_rollup = getattr(rollup, "reconcile", None)
    if reconcile_rollup is not None:
        reconcile_rollup(execute, database, dialect, options, progress)


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
