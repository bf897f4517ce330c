"""The ledger stage (`streams.engine.stages.LedgerStage`) and the worker's approvals index
(`Approvals`): first decision per order wins, refunds and reviews (waiting for their order when
they come first), approvals by the worker's event time (contract §5)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import orjson
import pytest

from schemas.events import Order
from streams.engine.effects import CODE, LEDGER, Effects
from streams.engine.stages import (
    MAX_LATER_PER_ORDER,
    Approvals,
    CodeStage,
    Entry,
    LedgerStage,
    VisitorStage,
)
from streams.engine.state import MemoryStore, Staged
from streams.rules.attribution import touch_horizon

from engine_builders import (
    LOCK_END,
    REF,
    T0,
    FakeMetrics,
    at,
    click,
    facts,
    held,
    ledger_batch,
    order,
    pending,
    refund_item,
    review_item,
    unattributed,
)


def _entry(store: MemoryStore, order_id: str = "o-1") -> Entry:
    return Entry.load(store.data.get(order_id.encode()))


# first decision wins

def test_an_order_writes_its_row_its_accrual_and_its_ledger_entry() -> None:
    store, metrics = MemoryStore(), FakeMetrics()
    effects = ledger_batch(store, Approvals(), [pending().to_json()], metrics)
    assert [row[0] for row in effects.rows["attributed_orders"]] == ["o-1"]
    assert facts(effects) == [("o-1:accrual", "accrual", "10.00", "pending")]
    entry = _entry(store)
    assert entry.decided and entry.ledger == pending().ledger and entry.channel == "instagram"
    assert metrics.counts[("orders_attributed", "last_click")] == 1


def test_the_first_decision_for_an_order_wins_in_one_batch() -> None:
    store, metrics = MemoryStore(), FakeMetrics()
    effects = ledger_batch(store, Approvals(), [pending().to_json(), held().to_json()], metrics)
    assert len(effects.rows["attributed_orders"]) == 1
    assert facts(effects) == [("o-1:accrual", "accrual", "10.00", "pending")]
    assert "abuse_flags" not in effects.rows and effects.flags == []
    assert metrics.counts[("events_duplicate", "orders")] == 1
    assert _entry(store).ledger == pending().ledger


def test_a_later_decision_for_a_decided_order_is_a_duplicate() -> None:
    store, metrics = MemoryStore(), FakeMetrics()
    ledger_batch(store, Approvals(), [unattributed().to_json()])
    effects = ledger_batch(store, Approvals(), [pending().to_json()], metrics)
    assert effects.rows == {}
    assert metrics.counts[("events_duplicate", "orders")] == 1
    assert _entry(store).ledger is None


def test_a_flagged_order_writes_its_flags_and_flag_messages() -> None:
    effects = ledger_batch(MemoryStore(), Approvals(), [held().to_json()])
    assert [row[4] for row in effects.rows["abuse_flags"]] == ["fast_conversion"]
    assert [key for key, _ in effects.flags] == [b"o-1"]
    assert orjson.loads(effects.flags[0][1])["status"] == "held"
    assert facts(effects) == [("o-1:accrual", "accrual", "10.00", "held")]


def test_an_unattributed_order_writes_its_row_and_no_fact() -> None:
    effects = ledger_batch(MemoryStore(), Approvals(), [unattributed().to_json()])
    assert [row[6] for row in effects.rows["attributed_orders"]] == ["none"]
    assert facts(effects) == []


# refunds

def test_a_refund_before_lock_end_reverses_its_share_of_the_commission() -> None:
    store = MemoryStore()
    ledger_batch(store, Approvals(), [pending().to_json()])
    effects = ledger_batch(store, Approvals(), [refund_item("r-1", "25.00", at(days=2))])
    assert facts(effects) == [("o-1:reversal:r-1", "reversal", "-2.50", "reversed")]
    assert _entry(store).ledger.reversed_total == Decimal("2.50")  # type: ignore[union-attr]


def test_a_refund_after_lock_end_is_a_clawback() -> None:
    store = MemoryStore()
    effects = ledger_batch(store, Approvals(), [pending().to_json(),
                                                refund_item("r-1", "100", LOCK_END)])
    assert facts(effects) == [
        ("o-1:accrual", "accrual", "10.00", "pending"),
        ("o-1:reversal:r-1", "reversal", "-10.00", "clawback"),
        ("o-1:approval", "approval", "0.00", "approved"),
    ]


def test_a_refund_before_its_order_waits_and_is_applied_when_the_order_arrives() -> None:
    store, metrics = MemoryStore(), FakeMetrics()
    early = ledger_batch(store, Approvals(), [refund_item("r-1", "25.00", at(days=1))], metrics)
    assert early.rows == {}
    assert [orjson.loads(w)["event_id"] for w in _entry(store).waiting] == ["r-1"]

    effects = ledger_batch(store, Approvals(), [pending().to_json()], metrics)
    assert facts(effects) == [("o-1:accrual", "accrual", "10.00", "pending"),
                              ("o-1:reversal:r-1", "reversal", "-2.50", "reversed")]
    entry = _entry(store)
    assert (entry.waiting, entry.refunds) == ([], ["r-1"])
    assert metrics.counts[("facts_written", "reversal")] == 1


def test_waiting_refunds_are_applied_in_time_order() -> None:
    store = MemoryStore()
    ledger_batch(store, Approvals(), [refund_item("r-b", "80", at(days=3)),
                                      refund_item("r-a", "80", at(days=2))])
    effects = ledger_batch(store, Approvals(), [pending().to_json()])
    assert facts(effects)[1:] == [("o-1:reversal:r-a", "reversal", "-8.00", "reversed"),
                                  ("o-1:reversal:r-b", "reversal", "-2.00", "reversed")]


def test_a_repeated_refund_reverses_once_whether_applied_or_waiting() -> None:
    store, metrics = MemoryStore(), FakeMetrics()
    ledger_batch(store, Approvals(), [refund_item("r-1", "10", at(days=1)),
                                      refund_item("r-1", "10", at(days=1))], metrics)
    effects = ledger_batch(store, Approvals(), [pending().to_json(),
                                                refund_item("r-1", "10", at(days=1))], metrics)
    assert [f[0] for f in facts(effects)] == ["o-1:accrual", "o-1:reversal:r-1"]
    assert metrics.counts[("events_duplicate", "refunds")] == 2


def test_a_refund_of_an_unattributed_order_reverses_nothing() -> None:
    store = MemoryStore()
    effects = ledger_batch(store, Approvals(), [unattributed().to_json(),
                                                refund_item("r-1", "10", at(days=1))])
    assert facts(effects) == []
    assert _entry(store).refunds == ["r-1"]


def test_refunds_never_reverse_more_than_the_accrual() -> None:
    store = MemoryStore()
    effects = ledger_batch(store, Approvals(), [pending().to_json(),
                                                refund_item("r-1", "70", at(days=1)),
                                                refund_item("r-2", "70", at(days=2))])
    assert [f[2] for f in facts(effects)] == ["10.00", "-7.00", "-3.00"]


def test_a_full_refund_in_three_parts_reverses_exactly_the_accrual() -> None:
    store = MemoryStore()
    effects = ledger_batch(store, Approvals(), [
        pending(total="3.00", commission="10.00").to_json(),
        refund_item("r-1", "1", at(days=1)),
        refund_item("r-2", "1", at(days=2)),
        refund_item("r-3", "1", at(days=3)),
    ])
    assert [f[2] for f in facts(effects)] == ["10.00", "-3.33", "-3.34", "-3.33"]


def test_a_refund_in_another_currency_reverses_nothing() -> None:
    effects = ledger_batch(MemoryStore(), Approvals(), [
        pending(currency="EUR").to_json(),
        refund_item("r-1", "50", at(days=1), currency="USD"),
    ])
    assert [f[1] for f in facts(effects)] == ["accrual"]
    assert [(d.reason, d.source_topic) for d in effects.dead_letters] == [
        ("currency_mismatch", "ledger-events")]


def test_a_refund_in_another_currency_waiting_for_its_order_is_refused_when_it_comes() -> None:
    store = MemoryStore()
    ledger_batch(store, Approvals(), [refund_item("r-1", "50", at(days=1), currency="JPY")])
    effects = ledger_batch(store, Approvals(), [pending(currency="EUR").to_json()])
    assert [f[1] for f in facts(effects)] == ["accrual"]
    assert [d.reason for d in effects.dead_letters] == ["currency_mismatch"]


def test_a_refund_without_a_currency_is_in_its_orders() -> None:
    effects = ledger_batch(MemoryStore(), Approvals(), [
        pending(currency="EUR").to_json(), refund_item("r-1", "50", at(days=1))])
    assert [f[1] for f in facts(effects)] == ["accrual", "reversal"]
    assert effects.dead_letters == []


# reviews

def test_a_review_before_its_order_waits_for_it() -> None:
    store = MemoryStore()
    assert ledger_batch(store, Approvals(), [review_item("v-1", "reject", at(days=1))]).rows == {}
    effects = ledger_batch(store, Approvals(), [held().to_json()])
    assert facts(effects) == [("o-1:accrual", "accrual", "10.00", "held"),
                              ("o-1:review:v-1", "reversal", "-10.00", "rejected")]
    assert [row[-1] for row in effects.rows["reviews"]] == ["rejected"]


def test_a_review_by_the_orders_own_affiliate_changes_nothing() -> None:
    store = MemoryStore()
    effects = ledger_batch(store, Approvals(), [
        held().to_json(), review_item("v-1", "release", at(days=1), reviewer="sally")])
    assert all(row[-1] != "released" for row in effects.rows.get("reviews", []))
    assert _entry(store).ledger.status == "held"  # type: ignore[union-attr]
    assert [d.reason for d in effects.dead_letters] == ["unauthorized_review"]


def test_a_review_by_someone_not_on_the_reviewers_list_changes_nothing() -> None:
    store = MemoryStore()
    effects = ledger_batch(store, Approvals(), [
        held().to_json(), review_item("v-1", "reject", at(days=1), reviewer="mallory")])
    assert facts(effects) == [("o-1:accrual", "accrual", "10.00", "held")]
    assert [(d.reason, d.detail) for d in effects.dead_letters] == [
        ("unauthorized_review", "reviewer 'mallory' is not in settings.reviewers")]
    assert [row[4] for row in effects.rows["reviews"]] == ["mallory"]  # who tried is kept
    # An authorized reviewer still decides afterwards.
    effects = ledger_batch(store, Approvals(), [review_item("v-2", "release", at(days=2))])
    assert [row[-1] for row in effects.rows["reviews"]] == ["released"]


def test_an_order_takes_only_so_many_refunds_the_rest_are_dead_lettered() -> None:
    store = MemoryStore()
    items = [refund_item(f"r-{i}", "0.01", at(days=1), order_id="o-404")
             for i in range(MAX_LATER_PER_ORDER + 3)]
    effects = ledger_batch(store, Approvals(), items)
    assert [d.reason for d in effects.dead_letters] == ["order_state_full"] * 3
    assert len(store.get(b"o-404") or b"") < 200_000


def test_a_review_does_not_move_the_event_time() -> None:
    approvals = Approvals()
    ledger_batch(MemoryStore(), approvals, [review_item("v-1", "release", at(days=90))])
    assert approvals.watermark < T0


# approvals

def test_a_pending_order_is_approved_once_the_event_time_reaches_its_lock_end() -> None:
    store, approvals = MemoryStore(), Approvals()
    ledger_batch(store, approvals, [pending().to_json()])
    before = ledger_batch(store, approvals, [pending("o-2", LOCK_END - timedelta(seconds=1)).to_json()])
    assert [f[0] for f in facts(before)] == ["o-2:accrual"]

    # Any order's or refund's ts is event time, whoever's it is.
    effects = ledger_batch(store, approvals, [refund_item("r-9", "1", LOCK_END, order_id="o-9")])
    assert facts(effects) == [("o-1:approval", "approval", "0.00", "approved")]
    assert effects.rows["commission_facts"][0][8] == LOCK_END.replace(tzinfo=None)
    assert _entry(store).ledger.approved  # type: ignore[union-attr]

    assert facts(ledger_batch(store, approvals, [pending("o-3", at(days=90)).to_json()])) == [
        ("o-3:accrual", "accrual", "10.00", "pending"),
        ("o-2:approval", "approval", "0.00", "approved"),
    ]  # o-1 is not approved twice


def test_an_order_decided_after_its_lock_end_passed_is_approved_in_the_same_batch() -> None:
    approvals = Approvals()
    approvals.advance(at(days=60))
    effects = ledger_batch(MemoryStore(), approvals, [pending().to_json()])
    assert [f[1] for f in facts(effects)] == ["accrual", "approval"]


def test_a_held_order_is_never_approved_by_the_event_time() -> None:
    store, approvals = MemoryStore(), Approvals()
    effects = ledger_batch(store, approvals, [held().to_json(),
                                              refund_item("r-9", "1", at(days=90), order_id="o-9")])
    assert approvals.watermark == at(days=90)
    assert facts(effects) == [("o-1:accrual", "accrual", "10.00", "held")]
    assert not _entry(store).ledger.approved  # type: ignore[union-attr]


def test_a_released_order_is_approved_at_its_lock_end_like_any_pending_one() -> None:
    store, approvals = MemoryStore(), Approvals()
    ledger_batch(store, approvals, [held().to_json(), review_item("v-1", "release", at(days=1))])
    effects = ledger_batch(store, approvals, [pending("o-2", LOCK_END).to_json()])
    assert [f[0] for f in facts(effects)] == ["o-2:accrual", "o-1:approval"]


def test_index_pending_finds_the_pending_orders_in_the_store_again() -> None:
    store, approvals = MemoryStore(), Approvals()
    ledger_batch(store, approvals, [
        pending("o-1").to_json(), pending("o-2", at(days=1)).to_json(), held("o-3").to_json(),
        unattributed("o-4").to_json(), refund_item("r-5", "1", at(days=2), order_id="o-5"),
        pending("o-6", at(days=-40)).to_json(),  # already approved (event time is past its lock end)
    ])

    restarted = Approvals()
    stage = LedgerStage(0, Staged(store), restarted)
    assert stage.index_pending() == 2
    restarted.advance(at(days=31))
    assert list(restarted.due({0})) == [("o-1", 0), ("o-2", 0)]


def test_an_approval_after_a_restart_is_written_once() -> None:
    store = MemoryStore()
    ledger_batch(store, Approvals(), [pending().to_json()])
    restarted = Approvals()
    LedgerStage(0, Staged(store), restarted).index_pending()
    first = ledger_batch(store, restarted, [pending("o-2", LOCK_END).to_json()])
    assert [f[0] for f in facts(first)] == ["o-2:accrual", "o-1:approval"]
    again = Approvals()
    assert LedgerStage(0, Staged(store), again).index_pending() == 1  # o-2 only


def test_due_yields_only_orders_of_owned_partitions() -> None:
    approvals = Approvals()
    approvals.add(at(days=30), "o-a", 0)
    approvals.add(at(days=31), "o-b", 1)
    approvals.add(at(days=32), "o-c", 2)
    approvals.add(at(days=60), "o-d", 0)
    approvals.advance(at(days=40))
    assert list(approvals.due({0, 2})) == [("o-a", 0), ("o-c", 2)]
    approvals.advance(at(days=60))
    assert list(approvals.due({0, 2})) == [("o-d", 0)]


def test_the_event_time_never_goes_back() -> None:
    approvals = Approvals()
    approvals.advance(at(days=5))
    approvals.advance(at(days=1))
    assert approvals.watermark == at(days=5)


def test_forget_drops_the_orders_of_revoked_partitions() -> None:
    approvals = Approvals()
    for i, p in enumerate([0, 1, 2, 1, 0]):
        approvals.add(at(days=30 + i), f"o-{i}", p)
    approvals.forget({1, 2})
    approvals.advance(at(days=90))
    assert list(approvals.due({0, 1, 2})) == [("o-0", 0), ("o-4", 0)]


# the whole way: two orders with one order_id

@pytest.mark.xfail(strict=True, reason=(
    "contract §2: orders are deduplicated by order_id, the first one wins. A coded order takes "
    "two hops (code-events, then ledger-events, after waiting for progress), an uncoded one "
    "goes straight to ledger-events: a later duplicate without the code reaches the ledger "
    "first and wins"))
def test_the_first_of_two_orders_with_one_order_id_wins_even_when_only_it_has_a_code() -> None:
    visitors, effects = VisitorStage(Staged(MemoryStore()), touch_horizon(REF)), Effects()
    visitors.click(click("c-1", at(hours=-2), affiliate_id="bob"), REF, effects)
    first: Order = order(event_id="e-1", discount_code="SALLY20")
    visitors.order(first, REF, effects, {0: 1}, None)
    visitors.order(order(event_id="e-2", ts=at(seconds=1)), REF, effects, {0: 2}, None)
    to_code = [orjson.loads(f.item) for f in effects.forwards if f.topic == CODE]
    to_ledger = [f.item for f in effects.forwards if f.topic == LEDGER]

    # Next batch: the code stage decides what code-events brought; the ledger reads what
    # ledger-events brought. The code stage's decision reaches the ledger one batch later.
    codes, hop = CodeStage(Staged(MemoryStore())), Effects()
    codes.receive({"type": "orders_progress", "partition": 0, "decided_below": 2}, 0, None)
    for i, item in enumerate(to_code, start=1):
        codes.receive(item, i, None)
    codes.decide_ready(REF, hop)
    store, approvals = MemoryStore(), Approvals()
    ledger_batch(store, approvals, to_ledger)
    ledger_batch(store, approvals, [f.item for f in hop.forwards])

    assert _entry(store).ledger is not None
    assert _entry(store).ledger.affiliate_id == "sally"  # type: ignore[union-attr]
