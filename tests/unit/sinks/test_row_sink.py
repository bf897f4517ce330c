"""The row sink's flush (`sinks.clickhouse.RowSink`) against failure doubles, no server: every
row written once, transient errors retried, fatal ones raised after the other tables are in, rows
the server rejects returned (not retried) once every other row is in."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from clickhouse_driver import errors as ch_errors

from schemas.config import ClickHouseTarget
from sinks import clickhouse
from sinks.clickhouse import (
    MAX_PARTITIONS_PER_INSERT,
    Rejected,
    RowSink,
    SinkFatal,
    Table,
    is_data_error,
    is_transient,
)

TABLES = {"a": Table("a", ("x",)), "b": Table("b", ("x",)), "c": Table("c", ("x", "ts"))}

TOO_MANY_PARTITIONS = (
    "Too many partitions for single INSERT block (more than 100). The limit is controlled by "
    "'max_partitions_per_insert_block' setting."
)
TOO_MANY_PARTS = "Too many parts (300). Merges are processing significantly slower than inserts."


class FakeServer:
    """What the sink's connections inserted; per table, how many attempts fail first and how.

    Like a current ClickHouse, it refuses an insert spanning more than 100 months of table c's
    `ts`, and any insert holding a row that `poison` objects to (nothing of that insert lands).
    """

    def __init__(self, failures: dict[str, list[Exception]] | None = None) -> None:
        self.inserted: dict[str, list[Any]] = {}
        self.inserts: list[tuple[str, list[Any]]] = []
        self.failures = {table: list(errors) for table, errors in (failures or {}).items()}
        self.poison: Callable[[Any], Exception | None] = lambda row: None
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def connect(self, target: Any) -> "FakeClient":
        return FakeClient(self)


class FakeClient:
    def __init__(self, server: FakeServer) -> None:
        self.server = server

    def execute(self, sql: str, rows: list[Any]) -> None:
        table = sql.split("INSERT INTO ")[1].split(" ")[0].split(".")[1]
        with self.server.lock:
            self.server.threads.add(threading.current_thread().name)
            pending = self.server.failures.get(table)
            if pending:
                raise pending.pop(0)
            if table == "c" and len({(r[1].year, r[1].month) for r in rows}) > 100:
                raise ch_errors.ServerException(TOO_MANY_PARTITIONS, code=252)
            for row in rows:
                error = self.server.poison(row)
                if error is not None:
                    raise error
            self.server.inserts.append((table, list(rows)))
            self.server.inserted.setdefault(table, []).extend(rows)

    def disconnect(self) -> None:
        pass


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    fake = FakeServer()
    monkeypatch.setattr(clickhouse, "connect", fake.connect)
    return fake


def sink(**kwargs: Any) -> RowSink:
    return RowSink(ClickHouseTarget("clickhouse://default@localhost:9000/db"), TABLES,
                   sleep=lambda seconds: None, **kwargs)


def months(count: int) -> list[datetime]:
    return [datetime(2015 + n // 12, n % 12 + 1, 3, 12, 0) for n in range(count)]


def test_a_flush_writes_every_table_once_each_on_its_own_thread(server: FakeServer) -> None:
    rows = sink()
    rows.add("a", (1,))
    rows.add("a", (2,))
    rows.add("b", (3,))
    assert rows.flush() == []
    assert server.inserted == {"a": [(1,), (2,)], "b": [(3,)]}
    assert all(name.startswith("clickhouse-insert") for name in server.threads)
    assert rows.pending_rows() == 0
    assert rows.flush() == []


def test_a_transient_error_is_retried_until_the_rows_are_in(server: FakeServer) -> None:
    server.failures = {"a": [EOFError("connection reset"), OSError("refused")]}
    rows = sink()
    rows.add("a", (1,))
    rows.add("b", (2,))
    rows.flush()
    assert server.inserted == {"a": [(1,)], "b": [(2,)]}


def test_a_fatal_error_is_raised_after_the_other_tables_are_in_and_keeps_its_rows(
    server: FakeServer,
) -> None:
    server.failures = {"a": [ch_errors.ServerException("no such table", code=60)]}
    rows = sink()
    rows.add("a", (1,))
    rows.add("b", (2,))
    with pytest.raises(SinkFatal):
        rows.flush()
    assert server.inserted == {"b": [(2,)]}
    assert rows.pending_rows() == 1  # the failed table's rows stay pending, nothing is dropped
    rows.flush()
    assert server.inserted == {"a": [(1,)], "b": [(2,)]}


def test_rows_over_101_months_are_inserted_in_inserts_of_at_most_100_months(
    server: FakeServer,
) -> None:
    rows = sink()
    stamps = months(101)
    for n, ts in enumerate(reversed(stamps)):
        rows.add("c", (f"click-{n}", ts))
    assert rows.flush() == []
    assert sorted(row[1] for row in server.inserted["c"]) == stamps
    assert len(server.inserts) == 2
    assert all(len({(r[1].year, r[1].month) for r in batch}) <= MAX_PARTITIONS_PER_INSERT
               for _, batch in server.inserts)


def test_an_insert_the_server_finds_spanning_too_many_partitions_is_split_not_retried(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server whose max_partitions_per_insert_block is below ours: halves until it fits."""
    monkeypatch.setattr(clickhouse, "MAX_PARTITIONS_PER_INSERT", 1000)
    rows = sink()
    for n, ts in enumerate(months(150)):
        rows.add("c", (f"click-{n}", ts))
    assert rows.flush() == []
    assert len(server.inserted["c"]) == 150


def test_a_row_the_server_rejects_is_returned_with_its_message_and_the_others_are_written(
    server: FakeServer,
) -> None:
    server.poison = lambda row: (
        ch_errors.ServerException("Decimal math overflow", code=407) if row[0] == 13 else None
    )
    rows = sink()
    for n in range(40):
        rows.add("a", (n,), origin=f"event-{n}")
    rows.add("b", (99,))
    rejected = rows.flush()
    assert rejected == [Rejected("a", (13,), "Code: 407.\nDecimal math overflow", "event-13")]
    assert sorted(server.inserted["a"]) == [(n,) for n in range(40) if n != 13]
    assert server.inserted["b"] == [(99,)]
    assert rows.pending_rows() == 0  # rejected rows are the caller's now, not retried


def test_values_the_driver_cannot_serialise_are_rejected_like_the_servers(
    server: FakeServer,
) -> None:
    def driver(row: Any) -> Exception | None:
        if row[0] == "int-in-a-string":
            return AttributeError("'int' object has no attribute 'encode'")
        if row[0] == "before-1970":
            out_of_range: Exception = ch_errors.TypeMismatchError("Column ts: argument out of range")
            return out_of_range
        return None

    server.poison = driver
    rows = sink()
    for value in ("ok-1", "int-in-a-string", "ok-2", "before-1970", "ok-3"):
        rows.add("a", (value,))
    rejected = rows.flush()
    assert [(r.row, r.error) for r in rejected] == [
        (("int-in-a-string",), "AttributeError: 'int' object has no attribute 'encode'"),
        (("before-1970",), "Code: 53. Column ts: argument out of range"),
    ]
    assert sorted(server.inserted["a"]) == [("ok-1",), ("ok-2",), ("ok-3",)]


def test_too_many_parts_is_waited_out_not_split_or_rejected(server: FakeServer) -> None:
    server.failures = {"a": [ch_errors.ServerException(TOO_MANY_PARTS, code=252)] * 3}
    rows = sink()
    rows.add("a", (1,))
    rows.add("a", (2,))
    assert rows.flush() == []
    assert server.inserts == [("a", [(1,), (2,)])]


def test_more_rejected_rows_than_allowed_is_fatal_and_keeps_the_rows_pending(
    server: FakeServer,
) -> None:
    """A schema whose column type changed rejects every row: stop, do not dead-letter them all."""
    server.poison = lambda row: ch_errors.TypeMismatchError("Column x: wrong type")
    rows = sink(max_rejected_rows=3)
    for n in range(10):
        rows.add("a", (n,))
    with pytest.raises(SinkFatal, match="more than 3 rows"):
        rows.flush()
    assert rows.pending_rows() == 10


@pytest.mark.parametrize(
    ("error", "data", "transient"),
    [
        (ch_errors.ServerException("Cannot parse datetime", code=41), True, False),
        (ch_errors.ServerException(TOO_MANY_PARTITIONS, code=252), True, False),
        (ch_errors.ServerException(TOO_MANY_PARTS, code=252), False, True),
        (ch_errors.ServerException("Memory limit (total) exceeded", code=241), False, True),
        (ch_errors.ServerException("Table db.x doesn't exist", code=60), False, False),
        (ch_errors.ServerException("Cannot execute query in readonly mode", code=164), False, False),
        (ch_errors.TypeMismatchError("Column ts: argument out of range"), True, False),
        (ch_errors.NetworkError("Connection refused"), False, True),
        (ConnectionResetError("reset"), False, True),
        (ValueError("cannot convert NaN to integer"), True, False),
    ],
)
def test_errors_are_data_transient_or_fatal(error: Exception, data: bool, transient: bool) -> None:
    assert (is_data_error(error), is_transient(error)) == (data, transient)
