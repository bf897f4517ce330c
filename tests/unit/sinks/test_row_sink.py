"""The row sink's flush (`sinks.clickhouse.RowSink`) against failure doubles, no server: every
row written once, transient errors retried, fatal ones raised after the other tables are in."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from clickhouse_driver import errors as ch_errors

from schemas.config import ClickHouseTarget
from sinks import clickhouse
from sinks.clickhouse import RowSink, SinkFatal, Table

TABLES = {"a": Table("a", ("x",)), "b": Table("b", ("x",))}


class FakeServer:
    """What the sink's connections inserted; per table, how many attempts fail first and how."""

    def __init__(self, failures: dict[str, list[Exception]] | None = None) -> None:
        self.inserted: dict[str, list[Any]] = {}
        self.failures = {table: list(errors) for table, errors in (failures or {}).items()}
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
            self.server.inserted.setdefault(table, []).extend(rows)

    def disconnect(self) -> None:
        pass


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    fake = FakeServer()
    monkeypatch.setattr(clickhouse, "connect", fake.connect)
    return fake


def sink() -> RowSink:
    return RowSink(ClickHouseTarget("clickhouse://default@localhost:9000/db"), TABLES,
                   sleep=lambda seconds: None)


def test_a_flush_writes_every_table_once_each_on_its_own_thread(server: FakeServer) -> None:
    rows = sink()
    rows.add("a", (1,))
    rows.add("a", (2,))
    rows.add("b", (3,))
    assert rows.flush() == 3
    assert server.inserted == {"a": [(1,), (2,)], "b": [(3,)]}
    assert all(name.startswith("clickhouse-insert") for name in server.threads)
    assert rows.pending_rows() == 0
    assert rows.flush() == 0


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
