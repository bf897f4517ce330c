"""ClickHouse connection and the batching row sink.

The sink is the only way rows reach ClickHouse. It never drops a row silently: `flush()` retries
transient failures (server down, network, timeouts, too many parts) in place with capped
exponential backoff until the rows are in; raises `SinkFatal` for errors a retry cannot fix
(unknown table, bad credentials, an untrusted certificate), so the caller stops without
advancing offsets; and returns as `Rejected` the rows the server (or the driver, against the
server's column types) refuses for what they contain, after inserting every other row, so that
one poison row cannot stall the worker. `add` and `flush` must never be called from two threads
at once (a flush inserts into each table on a thread of its own).
"""

from __future__ import annotations

import logging
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from clickhouse_driver import Client
from clickhouse_driver import errors as ch_errors

from schemas.config import ClickHouseTarget

from .metrics import METRICS

log = logging.getLogger(__name__)

#: Server error codes that retrying cannot fix: the schema or the credentials are wrong. (An
#: untrusted TLS certificate is fatal too, see `is_untrusted_certificate`.)
#: 60 unknown table, 81 unknown database, 16 no such column, 47 unknown identifier,
#: 516/192/193/194 authentication, 195 address not allowed, 164 readonly user, 497 access
#: denied, 291 database access denied (18.16's allow_databases), 62 syntax error.
FATAL_SERVER_CODES = frozenset({16, 47, 60, 62, 81, 164, 192, 193, 194, 195, 291, 497, 516})

#: Server error codes that blame the inserted values, not the server or the schema: retrying the
#: same rows fails the same way, so the sink bisects the insert down to the rows responsible.
#: Names from ClickHouse's src/Common/ErrorCodes.cpp. Native-protocol inserts arrive as typed
#: columns, so today's schema mostly meets these in the driver (below); the server raises them
#: for values its types, defaults or constraints refuse:
#: 6 CANNOT_PARSE_TEXT, 26 CANNOT_PARSE_QUOTED_STRING, 27 CANNOT_PARSE_INPUT_ASSERTION_FAILED,
#: 38 CANNOT_PARSE_DATE, 41 CANNOT_PARSE_DATETIME, 53 TYPE_MISMATCH, 69 ARGUMENT_OUT_OF_BOUND,
#: 70 CANNOT_CONVERT_TYPE, 72 CANNOT_PARSE_NUMBER, 117 INCORRECT_DATA, 131 TOO_LARGE_STRING_SIZE,
#: 190 SIZES_OF_ARRAYS_DOESNT_MATCH, 321 VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE,
#: 349 CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN, 376 CANNOT_PARSE_UUID,
#: 395 FUNCTION_THROW_IF_VALUE_IS_NON_ZERO, 407 DECIMAL_OVERFLOW,
#: 441 CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING, 467 CANNOT_PARSE_BOOL, 469 VIOLATED_CONSTRAINT,
#: 691 UNKNOWN_ELEMENT_OF_ENUM.
#: Not here: 252 TOO_MANY_PARTS, which names two things (see `is_partition_overflow`); 241
#: MEMORY_LIMIT_EXCEEDED and 159 TIMEOUT_EXCEEDED, which pass (retried); 16 NO_SUCH_COLUMN, the
#: schema's fault (fatal).
DATA_ERROR_CODES = frozenset({6, 26, 27, 38, 41, 53, 69, 70, 72, 117, 131, 190, 321, 349, 376,
                              395, 407, 441, 467, 469, 691})

#: What the driver raises while it serialises a value the column's type cannot hold
#: (`'int' object has no attribute 'encode'` for a String, a DateTime before 1970, a Decimal
#: beyond its precision as `TypeMismatchError`, NaN, an unencodable surrogate...). The insert
#: has not reached the table; the connection is dropped and made again.
DRIVER_DATA_ERRORS: tuple[type[BaseException], ...] = (
    ch_errors.TypeMismatchError, AttributeError, TypeError, ValueError, ArithmeticError,
    struct.error,
)

#: ClickHouse refuses an insert block that spans more partitions than
#: `max_partitions_per_insert_block` (100 by default since 19.x; 18.16 has no such limit). Every
#: table is partitioned by month, so one insert holds at most this many months.
MAX_PARTITIONS_PER_INSERT = 100

#: More rejected rows than this for one table in one flush is not bad events but a schema or code problem (a
#: column whose type changed, a converter that writes the wrong type): every row would go to the
#: dead letters. The sink stops instead (`SinkFatal`). An event writes a handful of rows at most.
MAX_REJECTED_ROWS_PER_FLUSH = 100

#: Backoff between insert attempts: 0.2 s doubling to 10 s. A ClickHouse restart takes seconds;
#: polling faster only floods the log, slower delays the catch-up after the outage.
FIRST_BACKOFF_SECONDS = 0.2
MAX_BACKOFF_SECONDS = 10.0


class SinkError(Exception):
    """Base of the sink's errors."""


class SinkFatal(SinkError):
    """A write failed in a way no retry can fix. Stop; do not advance offsets."""


class SinkBackpressure(SinkError):
    """More rows are pending than the sink may hold: flush before adding more."""


@dataclass(frozen=True)
class Rejected:
    """A row ClickHouse will not take as it is: it goes to the dead letters, not into a retry.

    `error` is the server's (or driver's) message; `origin` is whatever the caller passed to
    `RowSink.add` with the row (the event it came from), untouched.
    """

    table: str
    row: Sequence[Any]
    error: str
    origin: Any = None


def connect(target: ClickHouseTarget, *, with_database: bool = True) -> Client:
    """A native-protocol client for `target` (its database, unless `with_database` is False).

    Every ClickHouse connection of the project is made here, so TLS and its verification are
    decided in one place (`deploy/` probes its own local server without it: it imports no sinks).
    """
    return Client(
        host=target.host,
        port=target.port,
        user=target.user,
        password=target.password.get_secret_value(),
        database=target.database if with_database else "default",
        secure=target.secure,
        verify=target.verify,
        ca_certs=str(target.ca_certs) if target.ca_certs else None,
        connect_timeout=5,
        send_receive_timeout=60,
        settings={"insert_block_size": 1_000_000},
    )


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same statement later may succeed (the server or network recovers)."""
    if is_data_error(exc) or is_untrusted_certificate(exc):
        return False
    if isinstance(exc, ch_errors.ServerException):
        return exc.code not in FATAL_SERVER_CODES
    return isinstance(exc, (ch_errors.Error, OSError, EOFError, TimeoutError))


def is_data_error(exc: BaseException) -> bool:
    """Whether the inserted values, not the server, caused `exc` (see `DATA_ERROR_CODES`)."""
    if isinstance(exc, ch_errors.ServerException):
        return exc.code in DATA_ERROR_CODES or is_partition_overflow(exc)
    return isinstance(exc, DRIVER_DATA_ERRORS)


def is_untrusted_certificate(exc: BaseException) -> bool:
    """The server's TLS certificate does not verify: a wrong `ca_certs` or host, not an outage.

    The driver turns the `ssl.SSLCertVerificationError` into a `NetworkError` with its text.
    """
    return (isinstance(exc, ssl.SSLCertVerificationError)
            or (isinstance(exc, ch_errors.NetworkError) and "CERTIFICATE_VERIFY_FAILED" in str(exc)))


def is_partition_overflow(exc: BaseException) -> bool:
    """"Too many partitions for single INSERT block": the insert must be split, not retried.

    Code 252 also means "Too many parts", merges lagging behind inserts, which passes with time
    (retried); only the message tells them apart.
    """
    return (isinstance(exc, ch_errors.ServerException) and exc.code == 252
            and "partitions for single insert block" in str(exc).lower())


@dataclass
class Table:
    name: str
    columns: tuple[str, ...]
    #: The DateTime column of the table's `PARTITION BY toYYYYMM(...)`.
    partition_column: str = "ts"
    _partition_index: int | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._partition_index = (self.columns.index(self.partition_column)
                                 if self.partition_column in self.columns else None)

    def insert_sql(self, database: str) -> str:
        return f"INSERT INTO {database}.{self.name} ({', '.join(self.columns)}) VALUES"

    def partition_of(self, row: Sequence[Any]) -> tuple[int, int] | None:
        """The row's month (its partition), None when the row has no date there to read."""
        if self._partition_index is None or self._partition_index >= len(row):
            return None
        value = row[self._partition_index]
        return (value.year, value.month) if isinstance(value, date) else None


@dataclass(frozen=True)
class _Pending:
    row: Sequence[Any]
    origin: Any


def split_by_partition(table: Table, rows: list[_Pending]) -> list[list[_Pending]]:
    """`rows` as inserts of at most `MAX_PARTITIONS_PER_INSERT` months each, months in order."""
    months: dict[tuple[int, int] | None, list[_Pending]] = {}
    for pending in rows:
        months.setdefault(table.partition_of(pending.row), []).append(pending)
    inserts: list[list[_Pending]] = []
    for n, month in enumerate(sorted(months, key=lambda m: m or (0, 0))):
        if n % MAX_PARTITIONS_PER_INSERT == 0:
            inserts.append([])
        inserts[-1].extend(months[month])
    return inserts


@dataclass
class RowSink:
    """Pending rows per table; `flush()` writes them all (but the rejected ones) or raises.

    Batching by size and time is the caller's (the engine's batch): one flush per
    batch of events, then the offsets of those events may advance.
    """

    target: ClickHouseTarget
    tables: dict[str, Table]
    max_pending_rows: int = 500_000
    max_rejected_rows: int = MAX_REJECTED_ROWS_PER_FLUSH
    sleep: Callable[[float], None] = time.sleep
    _pending: dict[str, list[_Pending]] = field(default_factory=dict)
    #: One connection per table: a flush inserts into its tables at once, each on its own.
    _clients: dict[str, Client] = field(default_factory=dict)
    _pool: ThreadPoolExecutor | None = None

    def add(self, table: str, row: Sequence[Any], origin: Any = None) -> None:
        """Queue `row`; `origin` (e.g. the event it came from) comes back with it if rejected."""
        if self.pending_rows() >= self.max_pending_rows:
            raise SinkBackpressure(f"{self.pending_rows()} rows pending; flush first")
        self._pending.setdefault(table, []).append(_Pending(row, origin))

    def discard(self) -> int:
        """Forget every pending row (a batch dropped before its flush); returns how many."""
        dropped = self.pending_rows()
        self._pending.clear()
        return dropped

    def pending_rows(self) -> int:
        return sum(len(rows) for rows in self._pending.values())

    def flush(self) -> list[Rejected]:
        """Write every pending row; returns the rows ClickHouse rejected, which are not pending
        any more (the caller dead-letters them). Retries transient errors until done.

        Tables are inserted into at once (one connection each): a batch's latency is its slowest
        insert, not the sum of them. A fatal error is raised once every table's insert ended; the
        failed table's rows stay pending (inserting one of them twice is harmless: every table is
        a ReplacingMergeTree and every row deterministic).
        """
        pending = {name: rows for name, rows in self._pending.items() if rows}
        rejected: list[Rejected] = []
        if len(pending) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=len(self.tables),
                                                thread_name_prefix="clickhouse-insert")
            futures = {name: self._pool.submit(self._insert_table, self.tables[name], rows)
                       for name, rows in pending.items()}
            failure: BaseException | None = None
            for name, future in futures.items():
                try:
                    rejected += future.result()
                    del self._pending[name]
                except BaseException as exc:  # noqa: BLE001 - raised below, after the others
                    failure = failure or exc
            if failure is not None:
                raise failure
        else:
            for name, rows in pending.items():
                rejected += self._insert_table(self.tables[name], rows)
                del self._pending[name]
        self._pending.clear()
        return rejected

    def _insert_table(self, table: Table, rows: list[_Pending]) -> list[Rejected]:
        rejected: list[Rejected] = []
        for insert in split_by_partition(table, rows):
            rejected += self._insert_or_bisect(table, insert, len(rejected))
        if rejected:
            log.warning("ClickHouse rejected %d of %d rows for %s (first: %s)",
                        len(rejected), len(rows), table.name, rejected[0].error)
        return rejected

    def _insert_or_bisect(self, table: Table, rows: list[_Pending],
                          rejected_so_far: int) -> list[Rejected]:
        """Insert `rows`; on a data error, the halves on their own, down to the rows to blame."""
        error = self._insert_with_retry(table, rows)
        if error is None:
            return []
        if len(rows) == 1:  # a row is in one partition: this row is to blame
            if rejected_so_far + 1 > self.max_rejected_rows:
                raise SinkFatal(
                    f"ClickHouse rejected more than {self.max_rejected_rows} rows for "
                    f"{table.name} in one flush, a schema or code problem: {error}"
                ) from error
            return [Rejected(table.name, rows[0].row, _describe(error), rows[0].origin)]
        middle = len(rows) // 2
        left = self._insert_or_bisect(table, rows[:middle], rejected_so_far)
        return left + self._insert_or_bisect(table, rows[middle:], rejected_so_far + len(left))

    def _insert_with_retry(self, table: Table, rows: list[_Pending]) -> BaseException | None:
        """Insert until it succeeds (None) or fails for the data (that error); raises if fatal."""
        backoff = FIRST_BACKOFF_SECONDS
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                client = self._connected(table.name)
                client.execute(table.insert_sql(self.target.database), [p.row for p in rows])
            except Exception as exc:  # classified below: nothing is swallowed silently
                METRICS.clickhouse_insert_errors.labels(table.name).inc()
                self._drop_client(table.name)
                if is_data_error(exc):
                    return exc
                if not is_transient(exc):
                    raise SinkFatal(f"insert into {table.name} failed: {exc}") from exc
                log.warning(
                    "ClickHouse insert into %s failed (attempt %d, %d rows kept, retry in %.1fs): %s",
                    table.name, attempt, len(rows), backoff, exc,
                )
                self.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                continue
            METRICS.clickhouse_insert_seconds.labels(table.name).observe(time.perf_counter() - started)
            METRICS.clickhouse_insert_rows.labels(table.name).inc(len(rows))
            METRICS.clickhouse_insert_batches.labels(table.name).inc()
            return None

    def _connected(self, table: str) -> Client:
        client = self._clients.get(table)
        if client is None:
            client = self._clients[table] = connect(self.target)
        return client

    def _drop_client(self, table: str) -> None:
        client = self._clients.pop(table, None)
        if client is not None:
            try:
                client.disconnect()
            except Exception:  # already broken; we only want a fresh connection next time
                pass

    def close(self) -> None:
        for table in list(self._clients):
            self._drop_client(table)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _describe(error: BaseException) -> str:
    """The message a dead letter carries: the server's text, or the driver's with its type."""
    if isinstance(error, ch_errors.Error):
        return str(error).strip()
    return f"{type(error).__name__}: {error}"
