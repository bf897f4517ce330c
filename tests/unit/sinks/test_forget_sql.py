"""`sinks.forget` without a server: tombstones, the SQL it plans, waiting for mutations, and what
a run records when the worker could not be told. The mutations themselves run on both ClickHouse
servers in tests/integration/test_forget.py."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.pii import keyed_hash
from sinks.forget import (
    ForgetError,
    MutationsPending,
    Subject,
    forget_customer,
    mention_pattern,
    plan_erasures,
    quote,
    tombstone,
    wait_for_mutations,
)

KEY = b"k" * 32
ALL_TABLES = {"attributed_orders", "clicks", "abuse_flags", "reviews", "privacy_audit"}


def python_pattern(re2: str) -> re.Pattern[str]:
    """The re2 pattern in Python's syntax (only `\\x{hh}` differs among what it uses)."""
    return re.compile(re.sub(r"\\x\{([0-9a-f]{2})\}", r"\\x\1", re2))


def test_a_tombstone_is_forgotten_and_the_keyed_hash_of_the_id() -> None:
    assert tombstone("cust-1", KEY) == "forgotten:" + keyed_hash("cust-1", KEY)
    assert tombstone("cust-1", KEY) == tombstone("cust-1", KEY) != tombstone("cust-2", KEY)


@pytest.mark.parametrize("text, mentioned", [
    ("customer cust-1 is affiliate a's own customer account", True),
    ("own account cust-1", True),
    ("cust-1", True),
    ("(cust-1)", True),
    ("customer cust-10 looks like", False),
    ("customer xcust-1 is", False),
    ("customer cust-1.5 is", False),
    ("urn:cust-1", False),
])
def test_the_customer_id_is_mentioned_only_as_a_whole_word(text: str, mentioned: bool) -> None:
    assert bool(python_pattern(mention_pattern("cust-1")).search(text)) is mentioned


@given(st.text(min_size=1, max_size=20))
def test_any_id_is_found_as_a_word_and_never_inside_its_tombstone(identifier: str) -> None:
    pattern = python_pattern(mention_pattern(identifier))
    assert pattern.search(f"customer {identifier} is")
    assert not pattern.search(f"customer {tombstone(identifier, KEY)} is") or \
        identifier == tombstone(identifier, KEY)


@pytest.mark.parametrize("value, literal", [
    ("plain", "'plain'"),
    ("o'brien", "'o\\'brien'"),
    ("back\\slash", "'back\\\\slash'"),
    ("two\nlines\ttab\0nul", "'two\\nlines\\ttab\\0nul'"),
    ("€", "'€'"),
])
def test_values_become_escaped_clickhouse_literals(value: str, literal: str) -> None:
    assert quote(value) == literal


def test_the_plan_changes_identifiers_only_and_never_a_money_column() -> None:
    subject = Subject("cust-1", ("o1",), ("v1", "v2"), ("s1",))
    erasures = plan_erasures(subject, KEY, ALL_TABLES)
    assert [(e.table, [c for c, _ in e.assignments]) for e in erasures] == [
        ("attributed_orders", ["customer_id", "visitor_id"]),
        ("clicks", ["visitor_id", "session_id"]),
        ("abuse_flags", ["detail"]),
        ("reviews", ["note"]),
    ]
    sql = " ".join(e.mutation_sql("db") for e in erasures)
    assert "commission_facts" not in sql
    assert not re.search(r"\b(total|commission|amount|discount_amount)\s*=", sql)
    assert tombstone("v2", KEY) in sql and tombstone("s1", KEY) in sql


def test_without_visitors_only_the_customer_id_and_its_mentions_are_planned() -> None:
    erasures = plan_erasures(Subject("cust-1"), KEY, ALL_TABLES)
    assert [e.table for e in erasures] == ["attributed_orders", "abuse_flags", "reviews"]
    assert erasures[0].where == "customer_id = 'cust-1'"


def test_tables_that_do_not_exist_are_not_planned() -> None:
    erasures = plan_erasures(Subject("cust-1", ("o1",), ("v1",)), KEY, {"attributed_orders"})
    assert [e.table for e in erasures] == ["attributed_orders"]


class FakeMutations:
    """system.mutations answering `pending` for a while; a clock that sleeps don't move."""

    def __init__(self, pending: list[tuple[int, int]]) -> None:
        self.pending = pending
        self.now = 0.0

    def execute(self, sql: str, rows: Any = None) -> list[tuple[object, ...]]:
        assert "system.mutations" in sql
        return [self.pending.pop(0) if self.pending else (0, 0)]

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_waiting_reports_progress_when_it_changes_until_every_mutation_is_done() -> None:
    fake = FakeMutations([(2, 5), (2, 5), (1, 1)])
    lines: list[str] = []
    wait_for_mutations(fake.execute, "db", ["clicks"], timeout=60, progress=lines.append,
                       sleep=fake.sleep, clock=lambda: fake.now)
    assert lines == ["waiting for 2 mutation(s) of clicks: 5 part(s) to do",
                     "waiting for 1 mutation(s) of clicks: 1 part(s) to do"]


def test_mutations_not_done_in_time_raise_mutations_pending() -> None:
    fake = FakeMutations([(1, 3)] * 1000)
    with pytest.raises(MutationsPending, match="not done after 2 s"):
        wait_for_mutations(fake.execute, "db", ["clicks"], timeout=2, sleep=fake.sleep,
                           clock=lambda: fake.now)


class FakeServer:
    """Just enough ClickHouse for a run whose forget records fail: it records every statement."""

    def __init__(self) -> None:
        self.statements: list[str] = []
        self.inserted: list[tuple[object, ...]] = []

    def execute(self, sql: str, rows: Any = None) -> list[tuple[object, ...]]:
        self.statements.append(sql)
        if rows is not None:
            self.inserted.extend(rows)
            return []
        if "system.tables" in sql:
            return [(t,) for t in ALL_TABLES]
        if "DISTINCT order_id" in sql:
            return [("o1", "v1")]
        if "DISTINCT session_id" in sql:
            return [("s1",)]
        return [(0,)]


def test_when_the_broker_does_not_take_the_forget_records_nothing_is_erased_and_that_is_audited() -> None:
    server = FakeServer()
    with pytest.raises(ForgetError, match="not acknowledged"):
        forget_customer(server.execute, "db", "cust-1", KEY, requested_by="dpo",
                        forget_state=lambda visitors: len(visitors), timeout=5)
    assert not any(s.startswith("ALTER") for s in server.statements)
    [audit] = server.inserted
    assert audit[2:4] == ("forget", keyed_hash("cust-1", KEY))
    assert audit[-2:] == ("dpo", "incomplete")
    assert "cust-1" not in repr(audit)
