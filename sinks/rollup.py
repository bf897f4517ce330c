"""The rollup `affiliate_channel_daily_totals`: one row per day x affiliate x channel x currency,
which `attribution report` and dashboards read instead of four `FINAL` scans of raw rows.

It stays exact under replays because it is never summed into: every refresh recomputes whole
stretches of it from the sources with `FINAL` (each logical row once) and swaps them in.

- Current servers (refreshable materialized views): the view
  `affiliate_channel_daily_totals_refresh` (migration 0007) recomputes the whole table every
  `ROLLUP_REFRESH_SECONDS` and replaces it atomically. Days past the click horizon (raw clicks
  expire after `CLICKHOUSE_CLICKS_TTL_DAYS`) are closed: their clicks are the table's own.
- 18.16 (no refreshable views): `refresh` rebuilds the stale months one partition each, into a
  staging table, swapped in by `REPLACE PARTITION`, and marks the month in `rollup_refreshes`
  with the rebuild's start and its sources' fingerprint: per source table, the highest block
  number among the month's active parts. Every insert takes a new block number; a merge keeps
  the highest of the parts it merges. So a month is stale exactly when something was written to
  it since (a replay writes parts, so it is rebuilt, and FINAL collapses the replay), and the
  background merges of a big backlog, which go on for many minutes, never make it stale.

This module must never add rows to the rollup outside a full recompute of their month (or the
whole table): an increment would count a replay twice.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .migrate import Dialect, Executor, SchemaOptions

TOTALS = "affiliate_channel_daily_totals"
#: The refreshable materialized view that fills TOTALS on current servers.
REFRESH_VIEW = "affiliate_channel_daily_totals_refresh"
#: The record of rebuilds: (month YYYYMM, started_at, sources: the fingerprint it was built
#: from); the latest per month counts. Month 0: the refreshable view's refreshes we asked for.
MARKS = "rollup_refreshes"
#: The tables the rollup is computed from; all are partitioned by month (toYYYYMM of their time).
SOURCES = ("clicks", "shares", "attributed_orders", "commission_facts")
COLUMNS = ("day", "affiliate_id", "channel", "currency", "clicks", "shares", "orders", "revenue",
           "net_commission", "pending", "approved", "held")

#: Server error codes that mean the connected user may not write (e.g. the `bi` user):
#: 164 READONLY, 392 QUERY_IS_PROHIBITED (18.16's allow_ddl = 0), 497 ACCESS_DENIED.
READ_ONLY_CODES = frozenset({164, 392, 497})

_REFRESH_PERIOD = re.compile(r"REFRESH\s+EVERY\s+(\d+)\s+(SECOND|MINUTE|HOUR|DAY|WEEK)S?\b", re.I)
_UNIT_SECONDS = {"SECOND": 1, "MINUTE": 60, "HOUR": 3600, "DAY": 86_400, "WEEK": 604_800}


# --- Pure pieces: months, staleness, SQL ---------------------------------------------------------


def month_of(day: date) -> int:
    """The month partition a day belongs to, as toYYYYMM writes it (e.g. 202611)."""
    return day.year * 100 + day.month


def month_start(month: int) -> date:
    year, number = divmod(month, 100)
    if not (1 <= number <= 12 and 1970 <= year <= 2299):
        raise ValueError(f"not a month YYYYMM: {month}")
    return date(year, number, 1)


def next_month(month: int) -> int:
    year, number = divmod(month, 100)
    return (year + 1) * 100 + 1 if number == 12 else month + 1


def format_month(month: int) -> str:
    return f"{month // 100:04d}-{month % 100:02d}"


def parse_partition(partition: str) -> int:
    """A source part's `partition` (toYYYYMM: '202611'; some servers quote it) as a month."""
    text = partition.strip().strip("'\"")
    if not re.fullmatch(r"\d{6}", text):
        raise ValueError(f"partition {partition!r} is not a month (toYYYYMM); the rollup's "
                         "rebuild assumes every source is partitioned by month")
    month = int(text)
    month_start(month)  # validates
    return month


@dataclass(frozen=True)
class MonthRange:
    """Months first..last inclusive (YYYYMM)."""

    first: int
    last: int

    @classmethod
    def of_days(cls, since: date, until: date) -> "MonthRange":
        return cls(month_of(since), month_of(until))

    def __contains__(self, month: object) -> bool:
        return isinstance(month, int) and self.first <= month <= self.last


def stale_months(
    sources: Mapping[int, str],
    marks: Mapping[int, str],
    built: Iterable[int] = (),
    within: MonthRange | None = None,
) -> list[int]:
    """The months to rebuild, oldest first.

    `sources`: month -> fingerprint of its active source parts now (`fingerprint`); `marks`:
    month -> the fingerprint its latest rebuild was made from; `built`: months the rollup has
    rows in. A month is stale when never built, when its sources' fingerprint changed since (an
    insert, a replay, a partition replaced), or when the rollup has rows for it but its sources
    have none left (dropped partitions).
    """
    stale = set()
    for month, now in sources.items():
        if marks.get(month) != now:
            stale.add(month)
    stale.update(month for month in built if month not in sources)
    return sorted(month for month in stale if within is None or month in within)


def click_horizon_sql(clicks_ttl_days: str | int, floor: date | None = None) -> str:
    """The first day whose clicks are still all in `clicks` (a Date expression): two days inside
    the TTL, so the refreshes of a whole day see its clicks before they start to expire; never
    before `floor` (clicks before it expired under an earlier, shorter TTL)."""
    horizon = (f"if({clicks_ttl_days} = 0, toDate('1970-01-01'), "
               f"today() - {clicks_ttl_days} + 2)")
    return f"greatest({horizon}, toDate('{floor.isoformat()}'))" if floor else horizon


_HORIZON_TTL = re.compile(r"if\((\d+) = 0, toDate\('1970-01-01'\)")
_HORIZON_FLOOR = re.compile(r"today\(\) - \d+\)? \+ 2\), toDate\('(\d{4}-\d{2}-\d{2})'\)\)")


@dataclass(frozen=True)
class ClickHorizon:
    """The click horizon of the view's query: the TTL it follows and its floor, if any."""

    ttl_days: int
    floor: date | None = None

    @classmethod
    def parse(cls, create_query: str) -> "ClickHorizon | None":
        ttl = _HORIZON_TTL.search(create_query)
        if not ttl:
            return None
        floor = _HORIZON_FLOOR.search(create_query)
        return cls(int(ttl[1]), date.fromisoformat(floor[1]) if floor else None)

    def day(self, today: date) -> date:
        ttl_day = today - timedelta(days=self.ttl_days - 2) if self.ttl_days else date(1970, 1, 1)
        return max(ttl_day, self.floor) if self.floor else ttl_day

    def under(self, ttl_days: int, today: date) -> "ClickHorizon":
        """The horizon once the TTL becomes `ttl_days` today. Raw clicks before today's horizon
        may be gone already: a longer TTL (or none) cannot bring them back, so that day becomes
        the floor until the new TTL's horizon passes it."""
        floor = self.day(today)
        kept = ClickHorizon(ttl_days)
        if floor <= date(1970, 1, 1) or kept.day(today) >= floor:
            return kept
        return ClickHorizon(ttl_days, floor)

    def sql(self) -> str:
        return click_horizon_sql(self.ttl_days, self.floor)


def totals_select(database: str, *, month: int | None = None,
                  click_horizon: str | None = None) -> str:
    """The rollup recomputed from its sources with FINAL, columns in COLUMNS' order.

    `month`: only that month (each source's partition). `click_horizon`: a Date expression;
    clicks of days before it are read from the rollup itself (raw clicks may have expired).
    Money goes by the order's day, like the view `affiliate_channel_daily`; pending, approved and
    held per order as `sinks.report` always had them: approved once the order has an approval
    fact, else its accrual's status.
    """
    def where(column: str) -> str:
        return f"WHERE toYYYYMM({column}) = {month}" if month is not None else ""

    clicks_where = where("ts")
    kept_clicks = ""
    if click_horizon is not None:
        clicks_where = (f"{clicks_where} AND " if clicks_where else "WHERE ") + (
            f"toDate(ts) >= {click_horizon}")
        kept_clicks = f"""
    SELECT day, affiliate_id, channel, currency,
           toUInt64(clicks) AS clicks_n, toUInt64(0) AS shares_n, toUInt64(0) AS orders_n,
           toDecimal128(0, 2) AS revenue_d, toDecimal128(0, 2) AS net_d,
           toDecimal128(0, 2) AS pending_d, toDecimal128(0, 2) AS approved_d,
           toDecimal128(0, 2) AS held_d
    FROM {database}.{TOTALS}
    WHERE day < {click_horizon} AND clicks > 0
    UNION ALL"""
    return f"""SELECT
    day, affiliate_id, channel, currency,
    sum(clicks_n)   AS clicks,
    sum(shares_n)   AS shares,
    sum(orders_n)   AS orders,
    sum(revenue_d)  AS revenue,
    sum(net_d)      AS net_commission,
    sum(pending_d)  AS pending,
    sum(approved_d) AS approved,
    sum(held_d)     AS held
FROM
({kept_clicks}
    SELECT toDate(ts) AS day, affiliate_id, channel, '' AS currency,
           toUInt64(count()) AS clicks_n, toUInt64(0) AS shares_n, toUInt64(0) AS orders_n,
           toDecimal128(0, 2) AS revenue_d, toDecimal128(0, 2) AS net_d,
           toDecimal128(0, 2) AS pending_d, toDecimal128(0, 2) AS approved_d,
           toDecimal128(0, 2) AS held_d
    FROM {database}.clicks FINAL
    {clicks_where}
    GROUP BY day, affiliate_id, channel
    UNION ALL
    SELECT toDate(ts) AS day, affiliate_id, channel, '' AS currency,
           toUInt64(0) AS clicks_n, toUInt64(count()) AS shares_n, toUInt64(0) AS orders_n,
           toDecimal128(0, 2) AS revenue_d, toDecimal128(0, 2) AS net_d,
           toDecimal128(0, 2) AS pending_d, toDecimal128(0, 2) AS approved_d,
           toDecimal128(0, 2) AS held_d
    FROM {database}.shares FINAL
    {where("ts")}
    GROUP BY day, affiliate_id, channel
    UNION ALL
    SELECT toDate(ts) AS day, affiliate_id, channel, currency,
           toUInt64(0) AS clicks_n, toUInt64(0) AS shares_n, toUInt64(count()) AS orders_n,
           toDecimal128(sum(total), 2) AS revenue_d, toDecimal128(0, 2) AS net_d,
           toDecimal128(0, 2) AS pending_d, toDecimal128(0, 2) AS approved_d,
           toDecimal128(0, 2) AS held_d
    FROM {database}.attributed_orders FINAL
    {where("ts")}
    GROUP BY day, affiliate_id, channel, currency
    UNION ALL
    SELECT toDate(order_ts) AS day, affiliate_id, channel, currency,
           toUInt64(0) AS clicks_n, toUInt64(0) AS shares_n, toUInt64(0) AS orders_n,
           toDecimal128(0, 2) AS revenue_d, toDecimal128(order_net, 2) AS net_d,
           toDecimal128(if(order_state = 'pending', order_net, toDecimal128(0, 2)), 2) AS pending_d,
           toDecimal128(if(order_state = 'approved', order_net, toDecimal128(0, 2)), 2) AS approved_d,
           toDecimal128(if(order_state = 'held', order_net, toDecimal128(0, 2)), 2) AS held_d
    FROM
    (
        SELECT order_id, affiliate_id, channel, currency, order_ts,
               sum(amount) AS order_net,
               if(countIf(kind = 'approval') > 0, 'approved',
                  anyIf(status, kind = 'accrual')) AS order_state
        FROM {database}.commission_facts FINAL
        {where("order_ts")}
        GROUP BY order_id, affiliate_id, channel, currency, order_ts
    )
)
GROUP BY day, affiliate_id, channel, currency"""


# --- Executing: 18.16's month rebuilds, current servers' view -----------------------------------


def _literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _int(value: object) -> int:
    return int(str(value))


@dataclass(frozen=True)
class RefreshResult:
    """What `refresh` did: the months it rebuilt (18.16), or whether it refreshed the view."""

    rebuilt: list[int] = field(default_factory=list)
    view_refreshed: bool = False


def fingerprint(blocks: Mapping[str, int]) -> str:
    """A month's sources as `table:highest block number`, sorted: equal exactly when nothing was
    inserted into (or replaced in) the month since (merges keep the highest block number)."""
    return ",".join(f"{table}:{number}" for table, number in sorted(blocks.items()))


def _source_parts(execute: "Executor", database: str) -> tuple[dict[int, str], dict[int, int]]:
    """Per month of the sources' active parts: its fingerprint, and its parts' latest
    modification (epoch seconds), from one read of `system.parts`."""
    tables = ", ".join(_literal(table) for table in SOURCES)
    rows = execute(
        f"SELECT partition, table, max(max_block_number), toUnixTimestamp(max(modification_time)) "
        f"FROM system.parts WHERE database = {_literal(database)} AND table IN ({tables}) "
        f"AND active GROUP BY partition, table"
    )
    blocks: dict[int, dict[str, int]] = {}
    changes: dict[int, int] = {}
    for partition, table, number, changed in rows:
        month = parse_partition(str(partition))
        blocks.setdefault(month, {})[str(table)] = _int(number)
        changes[month] = max(changes.get(month, 0), _int(changed))
    return {month: fingerprint(found) for month, found in blocks.items()}, changes


def _source_changes(execute: "Executor", database: str) -> dict[int, int]:
    return _source_parts(execute, database)[1]


def _source_fingerprints(execute: "Executor", database: str) -> dict[int, str]:
    return _source_parts(execute, database)[0]


def _whole_fingerprint(fingerprints: Mapping[int, str]) -> str:
    return ";".join(f"{month}={fingerprints[month]}" for month in sorted(fingerprints))


def _mark_rows(execute: "Executor", database: str) -> dict[int, tuple[int, str]]:
    rows = execute(f"SELECT month, toUnixTimestamp(max(started_at)), "
                   f"argMax(sources, started_at) FROM {database}.{MARKS} GROUP BY month")
    return {_int(month): (_int(started), str(sources)) for month, started, sources in rows}


def _marks(execute: "Executor", database: str) -> dict[int, int]:
    """Month -> start of its latest rebuild (epoch seconds)."""
    return {month: started for month, (started, _) in _mark_rows(execute, database).items()
            if month}


def _mark(execute: "Executor", database: str, month: int, started: int, sources: str) -> None:
    execute(f"INSERT INTO {database}.{MARKS} (month, started_at, sources) "
            f"SELECT {month}, toDateTime({started}), {_literal(sources)}")


def _built_months(execute: "Executor", database: str) -> set[int]:
    rows = execute(f"SELECT DISTINCT partition FROM system.parts WHERE database = "
                   f"{_literal(database)} AND table = {_literal(TOTALS)} AND active")
    return {parse_partition(str(partition)) for (partition,) in rows}


def _server_now(execute: "Executor") -> int:
    return _int(execute("SELECT toUnixTimestamp(now())")[0][0])


#: A staging table this old was left by a rebuild that died (kill -9) between its CREATE and DROP:
#: a month's rebuild takes seconds to minutes, so an hour never catches a live one.
ABANDONED_STAGING_SECONDS = 3600


def drop_abandoned_staging(execute: "Executor", database: str,
                           older_than: int = ABANDONED_STAGING_SECONDS) -> list[str]:
    """Drop the staging tables rebuilds left behind; returns their names."""
    rows = execute(
        f"SELECT name FROM system.tables WHERE database = {_literal(database)} "
        f"AND startsWith(name, {_literal(TOTALS + '_staging_')}) "
        f"AND metadata_modification_time < now() - {int(older_than)}"
    )
    names = [str(name) for (name,) in rows]
    for name in names:
        execute(f"DROP TABLE IF EXISTS {database}.{name}")
    return names


def rebuild_month(execute: "Executor", database: str, month: int) -> int:
    """Recompute one month of the rollup and swap it in; returns the rebuild's start (epoch s).

    The start is read from the server before the SELECT: a part written after it is newer than
    the mark, so its month is stale again at the next refresh.
    """
    started = _server_now(execute)
    sources = _source_fingerprints(execute, database).get(month, "")
    staging = f"{database}.{TOTALS}_staging_{month}_{uuid.uuid4().hex[:8]}"
    execute(f"CREATE TABLE {staging} AS {database}.{TOTALS}")
    try:
        execute(f"INSERT INTO {staging} ({', '.join(COLUMNS)}) "
                f"{totals_select(database, month=month)}")
        # Atomic per partition; from an empty staging partition it empties the rollup's.
        execute(f"ALTER TABLE {database}.{TOTALS} REPLACE PARTITION {month} FROM {staging}")
    finally:
        execute(f"DROP TABLE IF EXISTS {staging}")
    _mark(execute, database, month, started, sources)
    return started


def has_refresh_view(execute: "Executor", database: str) -> bool:
    rows = execute(f"SELECT count() FROM system.tables WHERE database = {_literal(database)} "
                   f"AND name = {_literal(REFRESH_VIEW)}")
    return bool(_int(rows[0][0]))


def create_refresh_view_sql(database: str, options: "SchemaOptions") -> str:
    """Migration 0007's view, for a database that lacks it on a server that can hold it (one
    migrated on 18.16, then upgraded)."""
    return (f"CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.{REFRESH_VIEW}\n"
            f"REFRESH EVERY {options.rollup_refresh_seconds} SECOND\n"
            f"TO {database}.{TOTALS}\nAS\n"
            f"{totals_select(database, click_horizon=click_horizon_sql(options.clicks_ttl_days))}")


def _view_last_start(execute: "Executor", database: str) -> int | None:
    """Start of the view's latest successful refresh (epoch s), None before the first."""
    rows = execute(
        f"SELECT toUnixTimestamp(last_success_time) FROM system.view_refreshes "
        f"WHERE database = {_literal(database)} AND view = {_literal(REFRESH_VIEW)} "
        f"AND last_success_time IS NOT NULL"
    )
    return _int(rows[0][0]) if rows and rows[0][0] not in (None, "\\N") else None


def refresh(
    execute: "Executor",
    database: str,
    *,
    within: MonthRange | None = None,
    force: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> RefreshResult:
    """Bring the rollup up to date for the months `within` (all when None).

    Where the refreshable view exists (current servers): refresh it and wait for it when a
    source changed since its last refresh started (always with `force`); it recomputes every
    month, so `within` does not narrow it. Elsewhere (18.16): rebuild each stale month (every
    month with `force`).
    """
    if has_refresh_view(execute, database):
        return RefreshResult(view_refreshed=_refresh_view(execute, database, force, progress))
    changes = _source_fingerprints(execute, database)
    marks = {month: sources for month, (_, sources) in _mark_rows(execute, database).items()}
    built = _built_months(execute, database)
    for name in drop_abandoned_staging(execute, database):
        progress(f"dropped {name}, left by a rebuild that did not finish")
    if force:
        months = sorted(m for m in set(changes) | built if within is None or m in within)
    else:
        months = stale_months(changes, marks, built, within)
    for month in months:
        begun = time.monotonic()
        rebuild_month(execute, database, month)
        progress(f"rebuilt {format_month(month)} in {time.monotonic() - begun:.1f} s")
    return RefreshResult(rebuilt=months)


def _refresh_view(execute: "Executor", database: str, force: bool,
                  progress: Callable[[str], None]) -> bool:
    last_start = _view_last_start(execute, database)
    fingerprints, changes = _source_parts(execute, database)
    changed = max(changes.values(), default=None)
    whole = _whole_fingerprint(fingerprints)
    recorded = _mark_rows(execute, database).get(0)
    if not force and last_start is not None:
        if recorded is not None and recorded[1] == whole and recorded[0] <= last_start:
            return False  # nothing inserted since a refresh we asked for (merges do not count)
        if changed is None:
            # No source rows at all: stale only if the rollup still has some.
            if not _built_months(execute, database):
                return False
        elif changed < last_start:
            return False
    begun = time.monotonic()
    view = f"{database}.{REFRESH_VIEW}"
    # A scheduled refresh already running when asked may have begun before the latest change,
    # and the request then only waits for it: if so, once more (WAIT raises if it failed).
    for _ in range(2):
        requested = _server_now(execute)
        execute(f"SYSTEM REFRESH VIEW {view}")
        execute(f"SYSTEM WAIT VIEW {view}")
        last_start = _view_last_start(execute, database)
        if last_start is None or last_start >= requested or changed is None or changed < last_start:
            break
    _mark(execute, database, 0, requested, whole)
    progress(f"refreshed {REFRESH_VIEW} in {time.monotonic() - begun:.1f} s")
    return True


def refreshed_at(execute: "Executor", database: str,
                 within: MonthRange | None = None) -> datetime | None:
    """When the rollup's oldest part for `within` was last recomputed (UTC); None if never."""
    if has_refresh_view(execute, database):
        started = _view_last_start(execute, database)
    else:
        months = {m: s for m, s in _marks(execute, database).items() if within is None or m in within}
        needed = {m for m in _source_changes(execute, database) if within is None or m in within}
        if needed - set(months):
            return None
        started = min(months.values(), default=None)
    return datetime.fromtimestamp(started, timezone.utc) if started is not None else None


def cannot_write(error: BaseException) -> bool:
    """Whether `error` is the server refusing a write to a read-only user."""
    return getattr(error, "code", None) in READ_ONLY_CODES


# --- After every `db migrate` --------------------------------------------------------------------


def refresh_period_seconds(create_query: str) -> int | None:
    """The period of a refreshable view from its `create_table_query` (the server writes 60
    SECOND back as 1 MINUTE)."""
    match = _REFRESH_PERIOD.search(create_query)
    if not match:
        return None
    return int(match[1]) * _UNIT_SECONDS[match[2].upper()]


def reconcile(execute: "Executor", database: str, dialect: "Dialect", options: "SchemaOptions",
              progress: Callable[[str], None] = lambda _: None) -> None:
    """Make the view follow the settings (current servers; 18.16: nothing): its refresh period
    ROLLUP_REFRESH_SECONDS, its click horizon CLICKHOUSE_CLICKS_TTL_DAYS; and create it where
    it is missing (a database migrated on 18.16 before the server was upgraded)."""
    if not dialect.refreshable_views:
        return
    rows = execute(f"SELECT create_table_query FROM system.tables WHERE database = "
                   f"{_literal(database)} AND name = {_literal(REFRESH_VIEW)}")
    if not rows:
        progress(f"  creating {REFRESH_VIEW} (this server has refreshable views)")
        execute(create_refresh_view_sql(database, options))
        return
    create_query = str(rows[0][0])
    period = refresh_period_seconds(create_query)
    if period != options.rollup_refresh_seconds:
        statement = (f"ALTER TABLE {database}.{REFRESH_VIEW} "
                     f"MODIFY REFRESH EVERY {options.rollup_refresh_seconds} SECOND")
        progress(f"  {statement.removeprefix(f'ALTER TABLE {database}.')}")
        execute(statement)
    horizon = ClickHorizon.parse(create_query)
    if horizon is not None and horizon.ttl_days != options.clicks_ttl_days:
        today = date.fromisoformat(str(execute("SELECT toString(today())")[0][0]))
        changed = horizon.under(options.clicks_ttl_days, today)
        progress(f"  {REFRESH_VIEW} MODIFY QUERY: days before {changed.sql()} are closed")
        execute(f"ALTER TABLE {database}.{REFRESH_VIEW} MODIFY QUERY "
                f"{totals_select(database, click_horizon=changed.sql())}")


def run_every(seconds: float, round_: Callable[[], None], on_error: Callable[[Exception], None],
              sleep: Callable[[float], None] = time.sleep) -> None:
    """Run `round_` every `seconds` until interrupted; a failed round is reported, not fatal
    (the server may be restarting), and the next one runs on time."""
    while True:
        begun = time.monotonic()
        try:
            round_()
        except Exception as exc:  # noqa: BLE001 - a service keeps going; the error is printed
            on_error(exc)
        sleep(max(0.0, seconds - (time.monotonic() - begun)))
