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
    ClickRow,
    ForgetError,
    Mention,
    MutationsPending,
    OrderRow,
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
    assert bool(mention_pattern("cust-1").search(text)) is mentioned


@given(st.text(min_size=1, max_size=20))
def test_any_id_is_found_as_a_word_and_never_inside_its_tombstone(identifier: str) -> None:
    pattern = mention_pattern(identifier)
    assert pattern.search(f"customer {identifier} is")
    assert not pattern.search(f"customer {tombstone(identifier, KEY)} is")


@pytest.mark.parametrize("value, literal", [
    ("plain", "'plain'"),
    ("o'brien", "'o\\'brien'"),
    ("back\\slash", "'back\\\\slash'"),
    ("two\nlines\ttab\0nul", "'two\\nlines\\ttab\\0nul'"),
    ("€", "'€'"),
])
def test_values_become_escaped_clickhouse_literals(value: str, literal: str) -> None:
    assert quote(value) == literal


SUBJECT = Subject(
    "cust-1", ("v1", "v2"),
    orders=(OrderRow("o1", "v1", "cust-1"), OrderRow("o2", "v2", "cust-1"),
            OrderRow("o3", "v2", "cust-10")),
    clicks=(ClickRow("c1", "v1", "s1"), ClickRow("c2", "v2", "s2"), ClickRow("c9", "v9", "s2")),
    mentions=(Mention("abuse_flags", ("o2", "self_referral"), "customer cust-1 is x"),
              Mention("reviews", ("o2", "r1"), "asked cust-1, and cust-1 agreed")),
)


def test_the_plan_changes_identifiers_only_clicks_and_texts_before_orders() -> None:
    erasures = plan_erasures(SUBJECT, KEY)
    assert [(e.table, [c for c, _ in e.assignments]) for e in erasures] == [
        ("clicks", ["visitor_id", "session_id"]),
        ("abuse_flags", ["detail"]),
        ("reviews", ["note"]),
        ("attributed_orders", ["visitor_id", "customer_id"]),
    ]
    sql = " ".join(e.mutation_sql("db") for e in erasures)
    assert "commission_facts" not in sql
    assert not re.search(r"\b(total|commission|amount|discount_amount)\s*=", sql)
    gone = tombstone("cust-1", KEY)
    assert f"'asked {gone}, and {gone} agreed'" in sql
    assert tombstone("v2", KEY) in sql and tombstone("s2", KEY) in sql


def test_no_raw_identifier_is_ever_in_the_sql_of_a_mutation() -> None:
    """ClickHouse keeps mutation commands on disk (system.mutations): they select rows by their
    sorting key and carry only tombstones."""
    sql = " ".join(e.mutation_sql("db") for e in plan_erasures(SUBJECT, KEY))
    for identifier in ("cust-1", "cust-10", "'v1'", "'v2'", "'s1'", "'s2'"):
        assert identifier not in sql
    assert "'v9'" not in sql and "'c9'" in sql  # another visitor's click in a session of theirs


def test_a_long_subject_is_split_into_mutations_that_fit_clickhouse_max_query_size() -> None:
    visitors = tuple(f"visitor-{i:04d}-" + "x" * 200 for i in range(2000))
    subject = Subject("cust-1", visitors,
                      orders=tuple(OrderRow(f"order-{i}-" + "y" * 200, v, "cust-1")
                                   for i, v in enumerate(visitors)))
    erasures = plan_erasures(subject, KEY)
    assert len(erasures) > 1
    assert all(len(e.mutation_sql("db").encode()) < 256 * 1024 for e in erasures)
    keyed = " ".join(e.where for e in erasures)
    assert all(f"'order-{i}-" in keyed for i in range(2000))


def test_an_empty_subject_plans_nothing() -> None:
    assert plan_erasures(Subject("cust-1"), KEY) == []


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
    """Just enough ClickHouse for one run: what it finds, and every statement and row it gets."""

    def __init__(self) -> None:
        self.statements: list[str] = []
        self.inserted: dict[str, list[tuple[object, ...]]] = {}

    def execute(self, sql: str, rows: Any = None) -> list[tuple[object, ...]]:
        self.statements.append(sql)
        if rows is not None:
            self.inserted.setdefault(sql.split()[2], []).extend(rows)
            return []
        if "system.tables" in sql:
            return [(t,) for t in ALL_TABLES]
        if sql.startswith("SELECT DISTINCT visitor_id"):
            return [("v1",)]
        if sql.startswith("SELECT DISTINCT order_id, visitor_id, customer_id"):
            return [("o1", "v1", "cust-1")]
        if sql.startswith("SELECT DISTINCT event_id"):
            return [("c1", "v1", "s1")]
        if sql.startswith("SELECT DISTINCT order_id, reason, detail"):
            return [("o1", "self_referral", "customer cust-1 is sally's own")]
        if "system.mutations" in sql:
            return [(0, 0)]
        if sql.startswith("SELECT count()"):
            return [(1,)]
        return []


def test_a_run_never_writes_a_raw_id_into_sql_and_audits_its_keyed_hash() -> None:
    server = FakeServer()
    told: list[tuple[str, ...]] = []

    def forget_state(visitors: tuple[str, ...]) -> int:
        told.append(visitors)
        return 0

    forget_customer(server.execute, "db", "cust-1", KEY, requested_by="dpo",
                    forget_state=forget_state, timeout=5)
    assert told == [("v1",)]
    text = "\n".join(server.statements)
    for identifier in ("cust-1", "'v1'", "'s1'"):
        assert identifier not in text
    assert [s.split(" UPDATE")[0] for s in server.statements if s.startswith("ALTER")] == [
        "ALTER TABLE db.clicks", "ALTER TABLE db.abuse_flags", "ALTER TABLE db.attributed_orders"]
    assert server.inserted["forget_ids"] == [("customer", "cust-1"), ("visitor", "v1"),
                                             ("session", "s1")]
    [audit] = server.inserted["db.privacy_audit"]
    assert audit[2:4] == ("forget", keyed_hash("cust-1", KEY))
    assert "cust-1" not in repr(audit)


def test_when_the_broker_does_not_take_the_forget_records_nothing_is_erased_and_that_is_audited() -> None:
    server = FakeServer()
    with pytest.raises(ForgetError, match="not acknowledged"):
        forget_customer(server.execute, "db", "cust-1", KEY, requested_by="dpo",
                        forget_state=lambda visitors: len(visitors), timeout=5)
    assert not any(s.startswith("ALTER") for s in server.statements)
    [audit] = server.inserted["db.privacy_audit"]
    assert audit[2:4] == ("forget", keyed_hash("cust-1", KEY))
    assert audit[-2:] == ("dpo", "incomplete")
