"""Replaying the ledger stage's input never changes its output (`streams.engine.stages`).

After a crash the runner reads a batch again over state that is either the one the batch left
(the crash came after RocksDB was written, before the offsets were committed) or the one before
it (the crash came earlier). Either way no fact may get a new id, and no fact id a new content.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.internal import DecidedOrder
from streams.engine.stages import Approvals, LedgerStage
from streams.engine.state import MemoryStore, Staged

from engine_builders import at, held, ledger_batch, pending, refund_item, review_item, unattributed

ORDER_IDS = ("o-1", "o-2", "o-3")
DECISIONS: tuple[Callable[[str, datetime], DecidedOrder], ...] = (pending, held, unattributed)

_decisions = st.builds(
    lambda decide, order_id, day: decide(order_id, at(days=day)).to_json(),
    st.sampled_from(DECISIONS), st.sampled_from(ORDER_IDS), st.integers(0, 40),
)
_refunds = st.builds(
    lambda n, order_id, amount, day: refund_item(f"r-{n}", amount, at(days=day), order_id),
    st.integers(0, 4), st.sampled_from(ORDER_IDS),
    st.decimals("0.01", "120.00", places=2).map(str), st.integers(0, 80),
)
_reviews = st.builds(
    lambda n, order_id, decision, day: review_item(f"v-{n}", decision, at(days=day), order_id),
    st.integers(0, 2), st.sampled_from(ORDER_IDS), st.sampled_from(["release", "reject"]),
    st.integers(0, 80),
)
#: Ledger input: decisions (several per order: the first wins), refunds and reviews before or
#: after their order, repeated ids, in batches.
_batches = st.lists(st.lists(st.one_of(_decisions, _refunds, _reviews), max_size=8),
                    min_size=1, max_size=5)


def _rows(store: MemoryStore, approvals: Approvals, batches: list[list[bytes]]) -> list[Any]:
    return [row for batch in batches
            for row in ledger_batch(store, approvals, batch).rows.get("commission_facts", [])]


def _restarted(store: MemoryStore) -> Approvals:
    """A new process's approvals index: the pending orders of the store, no event time yet."""
    approvals = Approvals()
    LedgerStage(0, Staged(store), approvals).index_pending()
    return approvals


@settings(max_examples=150, deadline=None)
@given(_batches, st.booleans())
def test_replaying_the_input_over_the_state_it_left_writes_no_new_fact_and_changes_no_entry(
        batches: list[list[bytes]], restart: bool) -> None:
    store, approvals = MemoryStore(), Approvals()
    first = _rows(store, approvals, batches)
    entries = dict(store.data)

    if restart:
        approvals = _restarted(store)
    replayed = [ledger_batch(store, approvals, batch) for batch in batches]

    assert {row[0] for e in replayed for row in e.rows.get("commission_facts", [])} <= {
        row[0] for row in first}
    assert all(e.rows == {} and e.flags == [] for e in replayed)  # nothing at all, in fact
    assert store.data == entries


@settings(max_examples=150, deadline=None)
@given(_batches)
def test_replaying_a_batch_over_the_state_before_it_writes_the_same_facts(
        batches: list[list[bytes]]) -> None:
    store, approvals = MemoryStore(), Approvals()
    _rows(store, approvals, batches[:-1])
    before = MemoryStore(store.data)
    original = _rows(store, approvals, batches[-1:])

    replayed = _rows(before, _restarted(before), batches[-1:])  # the crash lost the event time

    def money(rows: list[Any]) -> list[Any]:
        return [row for row in rows if row[4] != "approval"]

    assert money(replayed) == money(original)
    # Approvals wait for event time the new process has not seen yet; none is new.
    assert all(row in original for row in replayed)
