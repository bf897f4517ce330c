"""ClickHouse connection and the batching row sink.

The sink is the only way rows reach ClickHouse. It never drops a row: `flush()` retries transient
failures (server down, network, timeouts) in place with capped exponential backoff until the rows
are in, and raises `SinkFatal` for errors a retry cannot fix (unknown table, bad credentials), so
the caller stops without advancing offsets. `add` and `flush` must never be called from two
threads at once (a flush inserts into each table on a thread of its own).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from clickhouse_driver import Client
from clickhouse_driver import errors as ch_errors

from schemas.config import ClickHouseTarget

from .metrics import METRICS

log = logging.getLogger(__name__)

#: Server error codes that retrying cannot fix: the schema or the credentials are wrong.
#: 60 unknown table, 81 unknown database, 16 no such column, 47 unknown identifier,
#: 516/192/193/194 authentication, 497 access denied, 53 type mismatch, 62 syntax error.
FATAL_SERVER_CODES = frozenset({16, 47, 53, 60, 62, 81, 192, 193, 194, 497, 516})

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


def connect(target: ClickHouseTarget, *, with_database: bool = True) -> Client:
    """A native-protocol client for `target` (its database, unless `with_database` is False)."""
    return Client(
        host=target.host,
        port=target.port,
        user=target.user,
        password=target.password.get_secret_value(),
        database=target.database if with_database else "default",
        secure=target.secure,
        connect_timeout=5,
        send_receive_timeout=60,
        settings={"insert_block_size": 1_000_000},
    )


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ch_errors.ServerException):
        return exc.code not in FATAL_SERVER_CODES
    return isinstance(exc, (ch_errors.Error, OSError, EOFError, TimeoutError))


@dataclass
class Table:
    name: str
    columns: tuple[str, ...]

    def insert_sql(self, database: str) -> str:
        return f"INSERT INTO {database}.{self.name} ({', '.join(self.columns)}) VALUES"


@dataclass
class RowSink:
    """Pending rows per table; `flush()` writes them all or raises.

    Batching by size and time is the caller's (the engine's batch): one flush per
    batch of events, then the offsets of those events may advance.
    """

    target: ClickHouseTarget
    tables: dict[str, Table]
    max_pending_rows: int = 500_000
    sleep: Callable[[float], None] = time.sleep
    _pending: dict[str, list[Sequence[Any]]] = field(default_factory=dict)
    #: One connection per table: a flush inserts into its tables at once, each on its own.
    _clients: dict[str, Client] = field(default_factory=dict)
    _pool: ThreadPoolExecutor | None = None

    def add(self, table: str, row: Sequence[Any]) -> None:
        if self.pending_rows() >= self.max_pending_rows:
            raise SinkBackpressure(f"{self.pending_rows()} rows pending; flush first")
        self._pending.setdefault(table, []).append(row)

    def discard(self) -> int:
        """Forget every pending row (a batch dropped before its flush); returns how many."""
        dropped = self.pending_rows()
        self._pending.clear()
        return dropped

    def pending_rows(self) -> int:
        return sum(len(rows) for rows in self._pending.values())

    def flush(self) -> int:
        """Write every pending row; returns how many. Retries transient errors until done.

        Tables are inserted into at once (one connection each): a batch's latency is its slowest
        insert, not the sum of them. A fatal error is raised once every table's insert ended.
        """
        pending = {name: rows for name, rows in self._pending.items() if rows}
        if len(pending) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=len(self.tables),
                                                thread_name_prefix="clickhouse-insert")
            futures = {name: self._pool.submit(self._insert_with_retry, self.tables[name], rows)
                       for name, rows in pending.items()}
            failure: BaseException | None = None
            for name, future in futures.items():
                try:
                    future.result()
                    del self._pending[name]
                except BaseException as exc:  # noqa: BLE001 - raised below, after the others
                    failure = failure or exc
            if failure is not None:
                raise failure
        else:
            for name, rows in pending.items():
                self._insert_with_retry(self.tables[name], rows)
                del self._pending[name]
        self._pending.clear()
        return sum(len(rows) for rows in pending.values())

    def _insert_with_retry(self, table: Table, rows: list[Sequence[Any]]) -> None:
        backoff = FIRST_BACKOFF_SECONDS
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                client = self._connected(table.name)
                client.execute(table.insert_sql(self.target.database), rows)
            except Exception as exc:  # classified below: nothing is swallowed silently
                METRICS.clickhouse_insert_errors.labels(table.name).inc()
                self._drop_client(table.name)
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
            return

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
