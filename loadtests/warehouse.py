"""The warehouse benchmark (issue 14's targets): BI and finance queries over a store's history.

    python -m loadtests.warehouse [--clicks 200000000] [--orders 10000000] [--days 180]
        [--database attribution_bench] [--url CLICKHOUSE_URL] [--runs 3] [--patience 120]
        [--give-up 600] [--settle 600] [--keep] [--current] [--skip-local] [--end DATE]
        [--json FILE]

1. **generate** — a store's history is written by the server itself, `INSERT INTO ... SELECT ...
   FROM numbers(N)` in chunks (nothing crosses the network), into a database of its own made by
   the project's migrations (`sinks.migrate.migrate_server`, so the real schema): clicks over
   `--days` days up to today (UTC), ~2,000 affiliates with Zipf-like traffic (affiliate k gets
   ~1/k of it), eight channels, a share per 200 clicks, and orders in USD, EUR and GBP, each
   from a click (its affiliate and channel) or a code, or unattributed. Every attributed order has
   its accrual (`<order_id>:accrual`, 10 % of the total; 2 % held, 0.5 % rejected with 0.00);
   pending orders whose lock (30 days, 14 for `friends`) ended before today have their approval
   (`<order_id>:approval`, 0.00, at lock end); 8 % were refunded within 45 days, a reversal
   before lock end and a clawback after (`<order_id>:reversal:refund-<n>`). Held and rejected
   orders have their abuse flag. The rows are the ones the worker writes (`sinks.rows`), ids
   deterministic as the worker's are; the same arguments give the same rows.
2. **refresh** — the rollup that `report` reads is brought up to date once
   (`sinks.rollup.refresh`), timed.
3. **measure**, each `--runs` times (median and max), through the project's own code:
   `report` for one day and for 30 days (`sinks.report.build_report`); one affiliate's
   `statement` for a month (`sinks.payouts` reads + `streams.rules.payouts.statements`, as the
   CLI does), for a median affiliate and for the largest; `payouts create` over the whole ledger
   (`attribution.payouts.create_or_get`, the CLI's path), the payout tables emptied before
   each run so each run does the whole work. A query whose first run exceeds `--patience`
   seconds runs once.

With `--current` the same history is generated on a current ClickHouse (26.9, the `chdb-core`
server of `deploy/current_clickhouse.py`, loopback, a directory of its own) and the same queries
measured there; the table gives the ratio current / local. It prints a table and a JSON document
(also written to --json FILE). The local server is never stopped or restarted. At the end the
database is dropped (and the current server's directory removed) unless --keep, which also
reuses a history generated with the same --clicks, --orders and --days.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import orjson
from clickhouse_driver import Client

from deploy.processes import free_port
from loadtests.generator import CLICK_CHANNELS
from loadtests.host import host_facts
from schemas.config import ClickHouseTarget, Config
from sinks.migrate import Executor, SchemaOptions

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE = "attribution_bench"

#: The issue's targets, seconds.
REPORT_DAY_TARGET = 1.0
REPORT_30_DAYS_TARGET = 3.0
STATEMENT_TARGET = 1.0
PAYOUTS_CREATE_TARGET = 30.0

AFFILIATES = 2_000
#: One share per this many clicks (the click it came from shares its affiliate and channel).
CLICKS_PER_SHARE = 200
#: Percent of orders: unattributed, then by last click, by code with the owner's click, by code.
UNATTRIBUTED_PCT, LAST_CLICK_PCT, CODE_CLICK_PCT = 10, 70, 10
#: Per mille of attributed orders held (a reviewer decides; never approved here) and rejected.
HELD_PER_MILLE, REJECTED_PER_MILLE = 20, 5
REFUNDED_PCT = 8
REFUND_WITHIN_DAYS = 45
#: Of the refunds, this many in ten are full; the others refund half.
FULL_REFUNDS_IN_TEN = 6
#: Affiliates whose number is a multiple of this are in `friends` (lock 14 days), the others in
#: `ambassadors` (30 days), as in `loadtests.generator`'s reference data.
FRIENDS_EVERY = 5
LOCK_DAYS = {"friends": 14, "ambassadors": 30}
CURRENCIES = (("USD", 65), ("EUR", 25), ("GBP", 10))
REFERRERS = {"facebook": "l.facebook.com", "instagram": "l.instagram.com",
             "tiktok": "www.tiktok.com", "youtube": "www.youtube.com", "twitter": "t.co",
             "blog": "blog.example"}

#: Source rows per INSERT ... SELECT, (clicks, orders), by server. Measured here at 10M clicks:
#: 18.16 inserts 790k clicks/s in statements of 1M rows (its insert block) and 280k/s in
#: statements of 10M (one thread sorts the whole statement); 26.9 830k/s with 10M and 450k/s
#: with 1M (it sorts and writes in parallel).
CHUNKS_18_16 = (1_000_000, 1_000_000)
CHUNKS_CURRENT = (10_000_000, 2_000_000)
#: After generation, wait at most this long for the server's background merges to finish, so
#: that the measurements do not share the cores with them (they may still be running after).
SETTLE_SECONDS = 600.0
#: Generation statements run for minutes; the project's client gives up on a silent socket
#: after 60 s (right for the worker, not here).
GENERATION_TIMEOUT_SECONDS = 3_600
#: The schema's settings but the rollup view's period (current servers): a day, not a minute, so
#: that its recompute of the whole history does not run in the background of the measurements;
#: the bench refreshes it itself, timed, and before each report run.
BENCH_SCHEMA = SchemaOptions(rollup_refresh_seconds=86_400)
#: At most one progress line per table this often.
PROGRESS_SECONDS = 15.0
#: The bench's own record of what it generated (for --keep), beside the schema's tables.
HISTORY_TABLE = "warehouse_bench_history"


@dataclass(frozen=True)
class History:
    """What to generate: `days` whole days of traffic up to `end` (00:00 UTC, exclusive)."""

    clicks: int
    orders: int
    days: int
    end: date

    @property
    def start(self) -> date:
        return self.end - timedelta(days=self.days)

    @property
    def shares(self) -> int:
        return self.clicks // CLICKS_PER_SHARE

    @property
    def start_epoch(self) -> int:
        return _epoch(self.start)

    @property
    def end_epoch(self) -> int:
        return _epoch(self.end)

    @property
    def clicks_per_order(self) -> int:
        return max(1, self.clicks // self.orders)


def _epoch(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp())


def _array(values: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


# --- generation SQL -----------------------------------------------------------------------------
# Every value is a function of the row's number (cityHash64 of it and a salt per attribute), so
# the same history is the same rows on any server and in any chunking. Written for 18.16 and
# current releases alike.


def _click_columns(history: History, number: str, prefix: str) -> str:
    """The attributes of click `number` as aliased expressions `{prefix}name`.

    Clicks are spread evenly over the days in number order (so a chunk touches one or two
    monthly partitions); affiliate k of 1..2000 gets traffic ~1/k (floor of 2001^u, u uniform),
    and posts 70 % on its own channel.
    """
    p, span = prefix, history.end_epoch - history.start_epoch
    channels = _array(CLICK_CHANNELS)
    return f"""
        {history.start_epoch} + intDiv({number} * {span}, {history.clicks}) AS {p}ts_s,
        toUInt32(floor(pow({AFFILIATES + 1}, (cityHash64({number}, 11) % 1000000) / 1000000)))
            AS {p}aff,
        concat('aff-', substring(toString(10000 + {p}aff), 2)) AS {p}affiliate_id,
        if(cityHash64({number}, 12) % 10 < 7, {channels}[{p}aff % {len(CLICK_CHANNELS)} + 1],
           {channels}[cityHash64({number}, 13) % {len(CLICK_CHANNELS)} + 1]) AS {p}channel,
        concat('v', toString(cityHash64({number}, 14) % {max(1, history.clicks // 3)})) AS {p}visitor
    """


def clicks_sql(database: str, history: History, offset: int, count: int) -> str:
    hosts = tuple(REFERRERS)
    return f"""
        INSERT INTO {database}.clicks
            (event_id, ts, visitor_id, session_id, affiliate_id, channel, share_id, referrer_host)
        SELECT concat('click-', toString(j)), toDateTime(c_ts_s), c_visitor,
               concat(c_visitor, '-s', toString(cityHash64(j, 15) % 3)), c_affiliate_id, c_channel,
               if(j % {CLICKS_PER_SHARE} = 0, concat('share-', toString(intDiv(j, {CLICKS_PER_SHARE}))), ''),
               transform(c_channel, {_array(hosts)}, {_array([REFERRERS[h] for h in hosts])}, '')
        FROM (SELECT number + {offset} AS j, {_click_columns(history, 'j', 'c_')}
              FROM numbers({count}))
    """


def shares_sql(database: str, history: History, offset: int, count: int) -> str:
    """Share n is shared by click n x CLICKS_PER_SHARE's affiliate on its channel, up to a day
    before that click."""
    return f"""
        INSERT INTO {database}.shares (event_id, ts, affiliate_id, share_id, channel, url)
        SELECT concat('share-event-', toString(n)),
               toDateTime(greatest(c_ts_s, {history.start_epoch} + 86400) - cityHash64(n, 16) % 86400),
               c_affiliate_id, concat('share-', toString(n)), c_channel,
               concat('https://shop.example/p/', toString(n % 500), '?aff=', c_affiliate_id)
        FROM (SELECT number + {offset} AS n, n * {CLICKS_PER_SHARE} AS j,
                     {_click_columns(history, 'j', 'c_')}
              FROM numbers({count}))
    """


def _currency() -> str:
    cases, bound = [], 0
    for code, percent in CURRENCIES[:-1]:
        bound += percent
        cases.append(f"u_cur < {bound}, '{code}'")
    return f"multiIf({', '.join(cases)}, '{CURRENCIES[-1][0]}')"


def orders_select(history: History, offset: int, count: int) -> str:
    """Orders `offset`..`offset + count - 1` with everything their rows and facts need.

    Order i comes from click k (i x clicks-per-order + a hash below it): its visitor, its time
    plus 1 to 60 minutes, and (when attributed) its affiliate and, by click, its channel.
    """
    step, end = history.clicks_per_order, history.end_epoch
    by_click = "('last_click', 'code+click')"
    by_code = "('code', 'code+click')"
    return f"""
        SELECT number + {offset} AS i,
               i * {step} + cityHash64(i, 21) % {step} AS k,
               {_click_columns(history, 'k', 'c_')},
               concat('order-', toString(i)) AS order_id,
               cityHash64(i, 31) % 100 AS u_method,
               multiIf(u_method < {UNATTRIBUTED_PCT}, 'none',
                       u_method < {UNATTRIBUTED_PCT + LAST_CLICK_PCT}, 'last_click',
                       u_method < {UNATTRIBUTED_PCT + LAST_CLICK_PCT + CODE_CLICK_PCT}, 'code+click',
                       'code') AS method,
               method != 'none' AS attributed,
               least(c_ts_s + 60 + cityHash64(i, 38) % 3540, {end - 1}) AS ts_s,
               if(attributed, c_affiliate_id, '') AS affiliate_id,
               c_aff % {FRIENDS_EVERY} = 0 AS friends,
               if(attributed, if(friends, 'friends', 'ambassadors'), '') AS program_id,
               if(friends, {LOCK_DAYS['friends']}, {LOCK_DAYS['ambassadors']}) * 86400 AS lock_s,
               if(method IN {by_click}, concat('click-', toString(k)), '') AS click_event_id,
               if(method IN {by_click}, c_channel, '') AS channel,
               if(method IN {by_code}, concat('AFF', substring(toString(10000 + c_aff), 2)), '')
                   AS discount_code,
               cityHash64(i, 33) % 100 AS u_cur,
               {_currency()} AS currency,
               1000 + cityHash64(i, 34) % 29001 AS total_cents,
               cityHash64(i, 32) % 1000 AS u_flag,
               multiIf(NOT attributed, 'unattributed', u_flag < {HELD_PER_MILLE}, 'held',
                       u_flag < {HELD_PER_MILLE + REJECTED_PER_MILLE}, 'rejected', 'pending')
                   AS status,
               if(status IN ('pending', 'held'), intDiv(total_cents + 5, 10), 0) AS commission_cents,
               status = 'pending' AND ts_s + lock_s < {end} AS approved,
               attributed AND commission_cents > 0 AND cityHash64(i, 35) % 100 < {REFUNDED_PCT}
                   AND ts_s + 3600 + cityHash64(i, 36) % {REFUND_WITHIN_DAYS * 86400} < {end}
                   AS refunded,
               ts_s + 3600 + cityHash64(i, 36) % {REFUND_WITHIN_DAYS * 86400} AS refund_s,
               if(cityHash64(i, 37) % 10 < {FULL_REFUNDS_IN_TEN}, commission_cents,
                  intDiv(commission_cents + 1, 2)) AS reversed_cents,
               concat('cust-', toString(cityHash64(i, 39) % {history.orders // 2 + 1})) AS customer_id
        FROM numbers({count})
    """


def orders_sql(database: str, history: History, offset: int, count: int) -> str:
    return f"""
        INSERT INTO {database}.attributed_orders
            (order_id, ts, visitor_id, customer_id, affiliate_id, program_id, method,
             click_event_id, channel, discount_code, total, currency, commission, flags, status,
             version, coupon_site, discount_amount)
        SELECT order_id, toDateTime(ts_s), c_visitor, customer_id, affiliate_id, program_id,
               method, click_event_id, channel, discount_code, toDecimal64(total_cents, 2) / 100,
               currency, toDecimal64(commission_cents, 2) / 100,
               multiIf(status = 'held', ['code_velocity'], status = 'rejected', ['self_referral'],
                       emptyArrayString()),
               status, 0, '',
               if(discount_code != '', toDecimal64(intDiv(total_cents, 10), 2) / 100,
                  toDecimal64(0, 2))
        FROM ({orders_select(history, offset, count)})
    """


_FACT_COLUMNS = ("(fact_id, order_id, affiliate_id, program_id, kind, amount, currency, status, "
                 "ts, channel, order_ts)")


def facts_sql(database: str, history: History, offset: int, count: int) -> list[str]:
    """The accruals, approvals and reversals of the chunk's orders: three statements."""
    source = f"FROM ({orders_select(history, offset, count)})"
    return [
        f"""INSERT INTO {database}.commission_facts {_FACT_COLUMNS}
            SELECT concat(order_id, ':accrual'), order_id, affiliate_id, program_id, 'accrual',
                   toDecimal64(commission_cents, 2) / 100, currency, status, toDateTime(ts_s),
                   channel, toDateTime(ts_s)
            {source} WHERE attributed""",
        f"""INSERT INTO {database}.commission_facts {_FACT_COLUMNS}
            SELECT concat(order_id, ':approval'), order_id, affiliate_id, program_id, 'approval',
                   toDecimal64(0, 2), currency, 'approved', toDateTime(ts_s + lock_s), channel,
                   toDateTime(ts_s)
            {source} WHERE approved""",
        f"""INSERT INTO {database}.commission_facts {_FACT_COLUMNS}
            SELECT concat(order_id, ':reversal:refund-', toString(i)), order_id, affiliate_id,
                   program_id, 'reversal', toDecimal64(-toInt64(reversed_cents), 2) / 100,
                   currency, if(refund_s < ts_s + lock_s, 'reversed', 'clawback'),
                   toDateTime(refund_s), channel, toDateTime(ts_s)
            {source} WHERE refunded""",
    ]


def flags_sql(database: str, history: History, offset: int, count: int) -> str:
    return f"""
        INSERT INTO {database}.abuse_flags
            (order_id, ts, affiliate_id, discount_code, reason, severity, detail)
        SELECT order_id, toDateTime(ts_s), affiliate_id, discount_code,
               if(status = 'held', 'code_velocity', 'self_referral'),
               if(status = 'held', 'hold', 'reject'),
               if(status = 'held', 'code used too often in the window',
                  concat('customer ', customer_id, ' is the affiliate''s own account'))
        FROM ({orders_select(history, offset, count)})
        WHERE status IN ('held', 'rejected')
    """


# --- connections --------------------------------------------------------------------------------


def target_for(url: str, database: str) -> ClickHouseTarget:
    """`url` (a CLICKHOUSE_URL) with its database replaced by `database`."""
    parsed = urlparse(url)
    return ClickHouseTarget(urlunparse(parsed._replace(path=f"/{database}")))


@contextmanager
def clickhouse(target: ClickHouseTarget, *, timeout: int | None = None,
               with_database: bool = True) -> Iterator[tuple[Client, Executor]]:
    """A client of `target` made by the project's `connect`, and an Executor over it."""
    from sinks.clickhouse import connect

    client = connect(target, with_database=with_database)
    if timeout is not None:
        client.connection.send_receive_timeout = timeout

    def execute(sql: str, rows: list[tuple[object, ...]] | None = None) -> list[tuple[object, ...]]:
        return client.execute(sql, rows) if rows is not None else client.execute(sql)  # type: ignore[no-any-return]

    try:
        yield client, execute
    finally:
        client.disconnect()


# --- generation ---------------------------------------------------------------------------------


@dataclass
class Generation:
    seconds: float = 0.0
    reused: bool = False
    rows: dict[str, int] = field(default_factory=dict)
    seconds_per_table: dict[str, float] = field(default_factory=dict)
    settle_seconds: float = 0.0
    parts_after: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 1), "reused": self.reused, "rows": self.rows,
                "seconds_per_table": {k: round(v, 1) for k, v in self.seconds_per_table.items()},
                "settle_seconds": round(self.settle_seconds, 1), "parts_after": self.parts_after}


def stored_history(execute: Executor, database: str, history: History) -> History | None:
    """The history generated earlier in `database` with the same sizes, if complete."""
    exists = execute(f"SELECT count() FROM system.tables WHERE database = '{database}' "
                     f"AND name = '{HISTORY_TABLE}'")
    if not int(str(exists[0][0])):
        return None
    rows = execute(f"SELECT end_day FROM {database}.{HISTORY_TABLE} WHERE clicks = {history.clicks} "
                   f"AND orders = {history.orders} AND days = {history.days}")
    if not rows:
        return None
    end = rows[0][0]
    return History(history.clicks, history.orders, history.days,
                   end if isinstance(end, date) else date.fromisoformat(str(end)))


def _chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for offset in range(0, total, size):
        yield offset, min(size, total - offset)


def generate(target: ClickHouseTarget, history: History, say: Callable[[str], None],
             *, keep: bool = False,
             settle_limit: float = SETTLE_SECONDS) -> tuple[History, Generation]:
    """Create the database with the project's migrations and write `history` into it.

    With `keep`, a history of the same sizes already there is reused (its own end date)."""
    from sinks.migrate import Dialect, migrate_server

    outcome = Generation()
    with clickhouse(target, timeout=GENERATION_TIMEOUT_SECONDS, with_database=False) as (_, execute):
        if keep:
            found = stored_history(execute, target.database, history)
            if found is not None:
                say(f"reusing the history in {target.database} (until {found.end})")
                outcome.reused = True
                outcome.rows = row_counts(execute, target.database)
                return found, outcome
        execute(f"DROP DATABASE IF EXISTS {target.database}")
    started = time.monotonic()
    migrate_server(target, progress=say, options=BENCH_SCHEMA)
    with clickhouse(target, timeout=GENERATION_TIMEOUT_SECONDS) as (_, execute):
        db = target.database
        click_chunk, order_chunk = (
            CHUNKS_CURRENT if Dialect.detect(execute).low_cardinality else CHUNKS_18_16)
        steps: list[tuple[str, int, int, Callable[[int, int], list[str]]]] = [
            ("clicks", history.clicks, click_chunk,
             lambda o, c: [clicks_sql(db, history, o, c)]),
            ("shares", history.shares, click_chunk, lambda o, c: [shares_sql(db, history, o, c)]),
            ("attributed_orders", history.orders, order_chunk,
             lambda o, c: [orders_sql(db, history, o, c)]),
            ("commission_facts", history.orders, order_chunk,
             lambda o, c: facts_sql(db, history, o, c)),
            ("abuse_flags", history.orders, order_chunk,
             lambda o, c: [flags_sql(db, history, o, c)]),
        ]
        for table, total, size, statements in steps:
            table_started = said = time.monotonic()
            for offset, count in _chunks(total, size):
                for sql in statements(offset, count):
                    execute(sql)
                done, now = offset + count, time.monotonic()
                if done == total or now - said >= PROGRESS_SECONDS:
                    said = now
                    say(f"  {table}: {done:,} of {total:,} source rows ({done / total:.0%}), "
                        f"{done / max(now - table_started, 1e-9):,.0f}/s")
            outcome.seconds_per_table[table] = time.monotonic() - table_started
        outcome.seconds = time.monotonic() - started
        execute(f"CREATE TABLE IF NOT EXISTS {db}.{HISTORY_TABLE} "
                "(clicks UInt64, orders UInt64, days UInt32, end_day Date, seconds Float64) ENGINE = Log")
        execute(f"INSERT INTO {db}.{HISTORY_TABLE} (clicks, orders, days, end_day, seconds) VALUES",
                [(history.clicks, history.orders, history.days, history.end, outcome.seconds)])
        settled = time.monotonic()
        outcome.parts_after = settle(execute, db, say, settle_limit)
        outcome.settle_seconds = time.monotonic() - settled
        outcome.rows = row_counts(execute, db)
    say(f"generated in {outcome.seconds:,.0f} s: "
        + ", ".join(f"{t} {n:,}" for t, n in outcome.rows.items()))
    return history, outcome


def settle(execute: Executor, database: str, say: Callable[[str], None],
           limit: float = SETTLE_SECONDS) -> int:
    """Wait (at most `limit`) for background merges of `database`; the active parts left."""
    deadline = time.monotonic() + limit
    while True:
        merging = int(str(execute(
            f"SELECT count() FROM system.merges WHERE database = '{database}'")[0][0]))
        if not merging or time.monotonic() > deadline:
            break
        time.sleep(5)
    parts = int(str(execute(
        f"SELECT count() FROM system.parts WHERE database = '{database}' AND active")[0][0]))
    say(f"merges {'still running' if merging else 'done'}; {parts} active parts")
    return parts


def row_counts(execute: Executor, database: str) -> dict[str, int]:
    return {table: int(str(execute(f"SELECT count() FROM {database}.{table}")[0][0]))
            for table in ("clicks", "shares", "attributed_orders", "commission_facts",
                          "abuse_flags")}


# --- measurement --------------------------------------------------------------------------------


@dataclass
class Timing:
    name: str
    target: float | None
    runs: list[float] = field(default_factory=list)
    #: Per run, the part of it spent in the driver's execute: ClickHouse, the network, decoding.
    clickhouse_runs: list[float] = field(default_factory=list)
    detail: str = ""
    #: The run was stopped at `--give-up` seconds: the figure is a lower bound.
    stopped: bool = False
    #: The largest resident set of a run's process (the CLI's would be the same), MB.
    peak_rss_mb: int = 0
    #: The query failed (its exception); no figures then.
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.runs) if self.runs else float("nan")

    @property
    def max(self) -> float:
        return max(self.runs) if self.runs else float("nan")

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return bool(self.runs) and not self.stopped and self.median <= self.target

    def as_dict(self) -> dict[str, Any]:
        return {"query": self.name, "target_s": self.target, "runs_s": [round(r, 3) for r in self.runs],
                "median_s": round(self.median, 3), "max_s": round(self.max, 3),
                "clickhouse_median_s": round(statistics.median(self.clickhouse_runs), 3)
                if self.clickhouse_runs else None,
                "met": self.met, "stopped": self.stopped, "error": self.error,
                "peak_rss_mb": self.peak_rss_mb, "detail": self.detail}


#: What a measured query does, given a client of the database and an Executor over it: it
#: returns a line saying what it found (rows, lines), so a run that found nothing shows.
Action = Callable[[Client, Executor], str]


def _run_child(pipe: Any, target: ClickHouseTarget, action: Action) -> None:
    try:
        with clickhouse(target) as (client, execute):
            execute("SELECT 1")  # connected before the clock starts, as a CLI run is
            waited = [0.0]
            plain = client.execute

            def execute_timed(*args: Any, **kwargs: Any) -> Any:
                """The client's execute, its time added up: what the run spent waiting for
                ClickHouse and the driver, the rest being Python (the rules, the report's merge)."""
                began = time.perf_counter()
                try:
                    return plain(*args, **kwargs)
                finally:
                    waited[0] += time.perf_counter() - began

            # This child's own client: nothing else sees the wrapper.
            client.execute = execute_timed  # type: ignore[method-assign]
            started = time.perf_counter()
            detail = action(client, execute)
            seconds = time.perf_counter() - started
        pipe.send(Run(seconds, waited[0], detail,
                      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024))
    except BaseException as exc:  # reported by the parent, whatever it was
        pipe.send(Run(0.0, 0.0, "", 0, error=f"{type(exc).__name__}: {exc}"))


@dataclass(frozen=True)
class Run:
    seconds: float
    #: Of `seconds`, the time spent in the driver's execute (ClickHouse, network, decoding).
    clickhouse_seconds: float
    detail: str
    peak_rss_mb: int
    stopped: bool = False
    error: str | None = None


def run_once(target: ClickHouseTarget, action: Action, give_up: float) -> Run:
    """One run of `action` in a child process of its own (forked). A run still going after
    `give_up` seconds is killed and counted as `give_up` seconds, stopped."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_run_child, args=(sender, target, action), daemon=True)
    child.start()
    try:
        if not receiver.poll(give_up):
            return Run(give_up, 0.0, f"stopped after {give_up:.0f} s", 0, stopped=True)
        outcome: Run = receiver.recv()
        return outcome
    finally:
        if child.is_alive():
            child.kill()
        child.join()


def timed(target: ClickHouseTarget, name: str, goal: float | None, action: Action, runs: int,
          patience: float, give_up: float, say: Callable[[str], None],
          before: Callable[[], None] = lambda: None) -> Timing:
    """`action` run `runs` times (once if its first run exceeds `patience` s or fails)."""
    timing = Timing(name, goal)
    for _ in range(runs):
        before()
        run = run_once(target, action, give_up)
        if run.error is not None:
            timing.error = run.error
            say(f"  {name}: FAILED: {run.error}")
            break
        timing.runs.append(run.seconds)
        timing.clickhouse_runs.append(run.clickhouse_seconds)
        timing.detail, timing.stopped = run.detail, run.stopped
        timing.peak_rss_mb = max(timing.peak_rss_mb, run.peak_rss_mb)
        say(f"  {name}: {run.seconds:.3f} s, {run.clickhouse_seconds:.3f} s of it in ClickHouse "
            f"({run.detail})")
        if run.stopped or run.seconds > patience:
            break
    return timing


def month_of(history: History) -> str:
    """The last whole calendar month of the history."""
    day = history.end - timedelta(days=31)
    return f"{day.year:04d}-{day.month:02d}"


def affiliates_by_size(execute: Executor, database: str) -> list[str]:
    """Affiliates from the most orders to the fewest."""
    rows = execute(f"SELECT affiliate_id FROM {database}.commission_facts WHERE kind = 'accrual' "
                   "GROUP BY affiliate_id ORDER BY count() DESC, affiliate_id")
    return [str(r[0]) for r in rows]


def report_action(database: str, since: date, until: date) -> Action:
    """`attribution report --since --until`: `build_report` as the CLI calls it (the rollup's
    months in the range refreshed first when stale)."""
    from sinks.report import build_report

    def run(client: Client, execute: Executor) -> str:
        rows = build_report(client, database, since, until).rows
        return f"{len(rows):,} rows, {sum(r.orders for r in rows):,} orders"
    return run


def statement_action(database: str, affiliate: str, month: str) -> Action:
    """`attribution statement AFFILIATE --month M`: the CLI's reads and rules (statements_for)."""
    from attribution.payouts import statements_for

    def run(client: Client, execute: Executor) -> str:
        found = statements_for(execute, database, affiliate, month)
        return (f"{affiliate} {month}: {len(found)} currencies, "
                f"{sum(len(s.orders) for s in found):,} orders in the month")
    return run


def payouts_create_action(database: str, until: date) -> Action:
    """`attribution payouts create --until DATE`: the CLI's `create_or_get`, default minimum."""
    from attribution.payouts import create_or_get
    from streams.rules.payouts import DEFAULT_MINIMUM

    def run(client: Client, execute: Executor) -> str:
        now = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)
        batch, planned = create_or_get(execute, database, until, DEFAULT_MINIMUM, None, now)
        assert planned is not None, "the batch existed: the run measured nothing"
        total = sum((line.amount for line in batch.lines), Decimal("0.00"))
        return f"{len(batch.lines):,} lines, {total:,} in all currencies"
    return run


def rollup_refresh_action(database: str) -> Action:
    """`sinks.rollup.refresh` of every month (`attribution rollup refresh`)."""
    from sinks.rollup import refresh

    def run(client: Client, execute: Executor) -> str:
        result = refresh(execute, database)
        return str(result)
    return run


def measure(target: ClickHouseTarget, history: History, runs: int, patience: float,
            give_up: float, say: Callable[[str], None]) -> list[Timing]:
    """Time each query. The rollup is refreshed whole first (timed), and again before each
    report run (not timed): "kept current", as a scheduled `attribution rollup refresh` or the
    view keeps it, so a merge of the sources since does not make a report rebuild a month."""
    from sinks.rollup import refresh

    db = target.database
    last_day = history.end - timedelta(days=1)
    month = month_of(history)
    timings = [timed(target, "rollup refresh, whole history", None, rollup_refresh_action(db), 1,
                     patience, give_up, say)]
    with clickhouse(target) as (_, execute):
        def keep_current() -> None:
            refresh(execute, db)

        def empty_payouts() -> None:
            execute(f"TRUNCATE TABLE {db}.payout_lines")
            execute(f"TRUNCATE TABLE {db}.payouts")

        timings.append(timed(target, "report, one day", REPORT_DAY_TARGET,
                             report_action(db, last_day, last_day), runs, patience, give_up, say,
                             before=keep_current))
        timings.append(timed(target, "report, 30 days", REPORT_30_DAYS_TARGET,
                             report_action(db, history.end - timedelta(days=30), last_day), runs,
                             patience, give_up, say, before=keep_current))
        ranked = affiliates_by_size(execute, db)
        timings.append(timed(target, "statement, a median affiliate", STATEMENT_TARGET,
                             statement_action(db, ranked[len(ranked) // 2], month), runs, patience,
                             give_up, say))
        timings.append(timed(target, "statement, the largest affiliate", STATEMENT_TARGET,
                             statement_action(db, ranked[0], month), runs, patience, give_up, say))
        timings.append(timed(target, "payouts create, whole ledger", PAYOUTS_CREATE_TARGET,
                             payouts_create_action(db, history.end), runs, patience, give_up, say,
                             before=empty_payouts))
        empty_payouts()
    return timings


# --- engines ------------------------------------------------------------------------------------


def server_version(target: ClickHouseTarget) -> str:
    with clickhouse(target, with_database=False) as (_, execute):
        return str(execute("SELECT version()")[0][0])


def run_engine(target: ClickHouseTarget, history: History, runs: int, patience: float,
               give_up: float, keep: bool, settle_limit: float,
               say: Callable[[str], None]) -> dict[str, Any]:
    version = server_version(target)
    say(f"ClickHouse {version} at {target.host}:{target.port}, database {target.database}")
    used, generation = generate(target, history, say, keep=keep, settle_limit=settle_limit)
    try:
        timings = measure(target, used, runs, patience, give_up, say)
    finally:
        if not keep:
            with clickhouse(target, with_database=False) as (_, execute):
                execute(f"DROP DATABASE IF EXISTS {target.database}")
    return {"clickhouse": version, "history": {"clicks": used.clicks, "orders": used.orders,
            "days": used.days, "start": used.start.isoformat(), "end": used.end.isoformat()},
            "generation": generation.as_dict(), "timings": [t.as_dict() for t in timings]}


@contextmanager
def current_server(keep: bool) -> Iterator[Any]:
    """The 26.9 server of `deploy/current_clickhouse.py`, its data under a directory of its own
    (`.stack/warehouse-current/` with --keep, kept; else a temporary one, removed)."""
    from deploy.current_clickhouse import current_clickhouse

    home = REPO / ".stack" / "warehouse-current" if keep else Path(
        tempfile.mkdtemp(prefix="warehouse-current-"))
    try:
        with current_clickhouse(home, free_port(), free_port()) as server:
            yield server
    finally:
        if not keep:
            shutil.rmtree(home, ignore_errors=True)


def machine() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    return {**host_facts(), "commit": commit,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def table(results: dict[str, Any]) -> str:
    """The measured queries, one line each: median, max, the median's part in ClickHouse, target,
    met; with --current the same on the current engine and the ratio of the medians."""
    local = {t["query"]: t for t in results.get("local", {}).get("timings", [])}
    current = {t["query"]: t for t in results.get("current", {}).get("timings", [])}
    figures = f"{'median':>10} {'max':>10} {'in CH':>9}"
    header = f"{'query':34} {figures} {'target':>7} {'met':>4}"
    if current:
        header += f"  | 26.9: {figures} {'met':>4} {'26.9/18.16':>10}"
    lines = [header]
    for name in dict.fromkeys([*local, *current]):
        mine, theirs = local.get(name), current.get(name)
        first = mine or theirs
        assert first is not None
        target = f"{first['target_s']:.0f} s" if first["target_s"] is not None else "—"
        line = f"{name:34} {_figures(mine)} {target:>7} {_met(mine):>4}"
        if current:
            ratio = ""
            if (mine and theirs and not mine["error"] and not theirs["error"]
                    and not mine["stopped"] and not theirs["stopped"] and mine["median_s"]):
                ratio = f"{theirs['median_s'] / mine['median_s']:.2f}"
            line += f"  |       {_figures(theirs)} {_met(theirs):>4} {ratio:>10}"
        lines.append(line)
    return "\n".join(lines)


def _figures(timing: dict[str, Any] | None) -> str:
    """median, max and the median's ClickHouse part; "> N s" for a run stopped at --give-up."""
    if timing is None:
        return f"{'':>10} {'':>10} {'':>9}"
    if timing["error"]:
        return f"{'failed':>10} {'':>10} {'':>9}"
    more = ">" if timing["stopped"] else ""
    in_clickhouse = timing["clickhouse_median_s"]
    return (f"{more + format(timing['median_s'], '.3f') + 's':>10} "
            f"{more + format(timing['max_s'], '.3f') + 's':>10} "
            f"{(format(in_clickhouse, '.3f') + 's') if in_clickhouse is not None and not more else '':>9}")


def _met(timing: dict[str, Any] | None) -> str:
    if timing is None:
        return ""
    return "—" if timing["met"] is None else ("yes" if timing["met"] else "NO")


def run(url: str, database: str, history: History, runs: int, patience: float, give_up: float,
        keep: bool, local: bool, current: bool, settle_limit: float = SETTLE_SECONDS,
        say: Callable[[str], None] = print) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "runs": runs,
                               "asked": {"clicks": history.clicks, "orders": history.orders,
                                         "days": history.days}}
    if local:
        say("== the local server")
        results["local"] = run_engine(target_for(url, database), history, runs, patience,
                                      give_up, keep, settle_limit, say)
    if current:
        say("== the current engine (chdb-core)")
        with current_server(keep) as server:
            results["current"] = run_engine(ClickHouseTarget(server.url(database)), history, runs,
                                            patience, give_up, keep, settle_limit, say)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:]) if __doc__ else None)
    parser.add_argument("--clicks", type=int, default=200_000_000, help="default 200,000,000")
    parser.add_argument("--orders", type=int, default=10_000_000, help="default 10,000,000")
    parser.add_argument("--days", type=int, default=180,
                        help="days of history up to --end (default 180; 32 to 365, inside the "
                             "schema's default TTLs)")
    parser.add_argument("--database", default=DEFAULT_DATABASE,
                        help=f"the database to generate into (default {DEFAULT_DATABASE}); "
                             "dropped first, and at the end unless --keep")
    parser.add_argument("--url", default=None,
                        help="CLICKHOUSE_URL of the local server (default: the environment's, "
                             "else the local stack's); its database is replaced by --database")
    parser.add_argument("--runs", type=int, default=3, help="runs of each query (default 3)")
    parser.add_argument("--patience", type=float, default=120.0,
                        help="a query whose first run takes longer is run once (default 120 s)")
    parser.add_argument("--give-up", type=float, default=600.0,
                        help="a run still going after this long is stopped and counted as a "
                             "failure at this time (default 600 s)")
    parser.add_argument("--settle", type=float, default=SETTLE_SECONDS,
                        help="after generating, wait at most this long for the server's "
                             f"background merges (default {SETTLE_SECONDS:.0f} s)")
    parser.add_argument("--keep", action="store_true",
                        help="reuse a history of the same sizes if present, and keep it")
    parser.add_argument("--current", action="store_true",
                        help="also on a current ClickHouse (26.9, chdb-core), with the ratio")
    parser.add_argument("--skip-local", action="store_true",
                        help="only the current engine (with --current)")
    parser.add_argument("--end", type=date.fromisoformat, default=None,
                        help="the history's end, exclusive (default today, UTC)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.clicks < 1 or args.orders < 1 or args.orders > args.clicks:
        parser.error("--clicks and --orders must be positive, and orders at most clicks")
    if not 31 < args.days <= 365:
        parser.error("--days must be 32 to 365")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.skip_local and not args.current:
        parser.error("--skip-local needs --current")
    url = args.url or Config.from_env().clickhouse_url.get_secret_value()
    end = args.end or datetime.now(timezone.utc).date()
    history = History(args.clicks, args.orders, args.days, end)

    def say(line: str) -> None:
        print(f"{datetime.now(timezone.utc):%H:%M:%S} {line}", flush=True)

    results = run(url, args.database, history, args.runs, args.patience, args.give_up, args.keep,
                  not args.skip_local, args.current, args.settle, say)
    print(table(results))
    text = orjson.dumps(results, option=orjson.OPT_INDENT_2).decode()
    print(text)
    if args.json is not None:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
