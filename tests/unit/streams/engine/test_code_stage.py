"""The code stage (`streams.engine.stages.CodeStage`): coded orders wait for every orders
partition's in-band progress, then get code velocity (contract §6) and go on to the ledger."""

from __future__ import annotations

from typing import Any

import orjson

from schemas.internal import DecidedOrder
from streams.engine.effects import LEDGER, Effects
from streams.engine.stages import PROGRESS_KEY, CodeStage, customer_token, progress_item
from streams.engine.state import MemoryStore, Staged

from engine_builders import MAX_CUSTOMERS, REF, at, code_item, coded, pending, progress


class Partition:
    """One code-events partition across batches, driven like `Engine.process` drives it: the
    stage lives as long as the assignment, each batch gives it a fresh `Staged` view."""

    def __init__(self, store: MemoryStore | None = None) -> None:
        self.store = store if store is not None else MemoryStore()
        self.stage = CodeStage(Staged(self.store))
        self.offset = 0

    def batch(self, *items: dict[str, Any]) -> list[DecidedOrder]:
        """Receive `items` (each one record), decide what is ready, make the state; returns the
        orders sent to the ledger, in order."""
        staged = Staged(self.store)
        self.stage.store = staged
        self.stage._uses.clear()  # as the runner does: uses are read again through this batch
        effects = Effects()
        for item in items:
            self.stage.receive(item, self.offset, None)
            self.offset += 1
        self.stage.decide_ready(REF, effects)
        self.stage.finish(REF)
        self.store.write(staged.writes)
        assert all(f.topic == LEDGER for f in effects.forwards)
        sent = [DecidedOrder.from_dict(orjson.loads(f.item)) for f in effects.forwards]
        assert [f.key for f in effects.forwards] == [d.order_id.encode() for d in sent]
        return sent


def _flags(sent: list[DecidedOrder]) -> dict[str, list[str]]:
    return {d.order_id: [f.reason for f in d.flags] for d in sent}


def _customers(n: int, first_minute: int = 1) -> list[dict[str, Any]]:
    """Orders with the code from n distinct customers, a minute apart, ready at once."""
    return [code_item(coded(f"o-{i}", f"cust-{i}", at(minutes=first_minute + i)), {0: 0})
            for i in range(n)]


# progress

def test_progress_only_ever_rises() -> None:
    part = Partition()
    part.batch(progress(0, 5), progress(1, 2), progress(0, 3), progress(1, 4))
    assert part.stage.progress == {0: 5, 1: 4}


def test_progress_item_is_what_the_stage_reads_as_progress() -> None:
    part = Partition()
    part.batch(orjson.loads(progress_item(3, 17)))
    assert part.stage.progress == {3: 17}


def test_progress_survives_a_new_stage_over_the_same_store() -> None:
    part = Partition()
    part.batch(progress(0, 5), progress(2, 9))
    assert orjson.loads(part.store.data[PROGRESS_KEY]) == {"0": 5, "2": 9}
    assert CodeStage(Staged(part.store)).progress == {0: 5, 2: 9}


def test_progress_is_staged_only_by_finish() -> None:
    store = MemoryStore()
    staged = Staged(store)
    stage = CodeStage(staged)
    stage.receive(progress(0, 5), 0, None)
    assert staged.writes == {}
    stage.finish(REF)
    assert staged.get(PROGRESS_KEY) == b'{"0":5}'


def test_an_unchanged_progress_writes_nothing() -> None:
    part = Partition()
    part.batch(progress(0, 5))
    staged = Staged(part.store)
    part.stage.store = staged
    part.stage.receive(progress(0, 5), 1, None)
    part.stage.finish(REF)
    assert staged.writes == {}


# waiting for every orders partition

def test_a_coded_order_waits_until_every_orders_partition_passed_its_end() -> None:
    part = Partition()
    assert part.batch(code_item(coded("o-1", "cust-1", at()), {0: 5, 1: 3})) == []
    assert part.stage.first_waiting_offset() == 0
    assert part.batch(progress(0, 5), progress(1, 2)) == []
    assert part.stage.first_waiting_offset() == 0

    [sent] = part.batch(progress(1, 3))
    assert (sent.order_id, sent.flags) == ("o-1", ())
    assert part.stage.first_waiting_offset() is None


def test_a_coded_order_whose_ends_were_passed_before_it_arrived_is_decided_at_once() -> None:
    part = Partition()
    part.batch(progress(0, 10), progress(1, 10))
    [sent] = part.batch(code_item(coded("o-1", "cust-1", at()), {0: 4, 1: 10}))
    assert sent.order_id == "o-1"


def test_a_coded_order_read_without_orders_ends_is_decided_at_once() -> None:
    [sent] = Partition().batch(code_item(coded("o-1", "cust-1", at())))
    assert sent.order_id == "o-1"


def test_a_ready_order_behind_a_waiting_one_waits_too_so_the_commit_never_passes_it() -> None:
    part = Partition()
    sent = part.batch(code_item(coded("o-1", "cust-1", at()), {0: 5}),
                      code_item(coded("o-2", "cust-2", at(minutes=1)), {0: 0}))
    assert sent == []
    assert part.stage.first_waiting_offset() == 0
    assert [d.order_id for d in part.batch(progress(0, 5))] == ["o-1", "o-2"]


def test_the_decision_is_forwarded_unchanged_but_for_velocity() -> None:
    decision = coded("o-1", "cust-1", at())
    [sent] = Partition().batch(code_item(decision, {0: 0}))
    assert sent == decision


# code velocity

def test_the_customer_after_max_customers_in_the_window_is_held_for_code_velocity() -> None:
    sent = Partition().batch(*_customers(MAX_CUSTOMERS + 2))
    assert _flags(sent) == {"o-0": [], "o-1": [], "o-2": [],
                            "o-3": ["code_velocity"], "o-4": ["code_velocity"]}
    held = sent[MAX_CUSTOMERS]
    assert held.flags[0].severity == "hold"
    assert held.status == "held"
    assert held.accrual is not None and held.accrual.status == "held"
    assert held.commission == held.accrual.amount  # held, not rejected: the amount stays


def test_uses_decided_in_earlier_batches_count() -> None:
    part = Partition()
    orders = _customers(MAX_CUSTOMERS + 1)
    assert _flags(part.batch(*orders[:MAX_CUSTOMERS])) == {"o-0": [], "o-1": [], "o-2": []}
    assert _flags(part.batch(orders[MAX_CUSTOMERS])) == {"o-3": ["code_velocity"]}


def test_uses_decided_before_a_restart_count() -> None:
    part = Partition()
    orders = _customers(MAX_CUSTOMERS + 1)
    part.batch(*orders[:MAX_CUSTOMERS])
    restarted = Partition(part.store)
    assert _flags(restarted.batch(orders[MAX_CUSTOMERS])) == {"o-3": ["code_velocity"]}


def test_one_customer_using_the_code_again_and_again_counts_once() -> None:
    items = [code_item(coded(f"o-{i}", "cust-1", at(minutes=i)), {0: 0}) for i in range(10)]
    assert all(flags == [] for flags in _flags(Partition().batch(*items)).values())


def test_uses_outside_the_window_do_not_count() -> None:
    early = _customers(MAX_CUSTOMERS)  # minutes 1..3
    late = code_item(coded("o-late", "cust-late", at(minutes=65)), {0: 0})  # window (5, 65]
    assert _flags(Partition().batch(*early, late))["o-late"] == []


def test_a_use_with_an_earlier_ts_read_ahead_before_the_order_is_decided_counts() -> None:
    # Customers 0 and 1 at minutes 1 and 2, customer 3 at minute 5; customer 2's order (minute
    # 3) comes later in the partition, while minute 5's order still waits for partition 1.
    part = Partition()
    first = [code_item(coded(f"o-{i}", f"cust-{i}", at(minutes=m)), {0: 0, 1: 1})
             for i, m in ((0, 1), (1, 2), (3, 5))]
    late_use = code_item(coded("o-2", "cust-2", at(minutes=3)), {0: 0, 1: 1})
    assert part.batch(*first) == []
    assert part.batch(late_use) == []
    sent = part.batch(progress(1, 1))
    # o-3 sees four customers in (minute -55, minute 5]; o-2 sees three in (-57, 3].
    assert _flags(sent) == {"o-0": [], "o-1": [], "o-3": ["code_velocity"], "o-2": []}


def test_a_use_decided_after_the_order_was_decided_does_not_change_it() -> None:
    part = Partition()
    part.batch(*[code_item(coded(f"o-{i}", f"cust-{i}", at(minutes=i)), {0: 0})
                 for i in (0, 1, 3)])
    sent = part.batch(code_item(coded("o-2", "cust-2", at(minutes=2)), {0: 0}))
    assert _flags(sent) == {"o-2": []}  # o-3 stays as it was decided; o-2 sees 3 customers


def test_replaying_the_same_items_counts_each_use_once() -> None:
    orders = _customers(MAX_CUSTOMERS)
    part = Partition()
    first = part.batch(*orders, *orders)  # a record read twice (e.g. re-sent) in one batch
    assert all(flags == [] for flags in _flags(first).values())
    again = part.batch(*orders)  # the same records re-read after a crash
    assert all(flags == [] for flags in _flags(again).values())
    uses = orjson.loads(part.store.data[b"SALLY20"])
    assert sorted(customer for _, customer in uses) == sorted(_tokens("cust-0", "cust-1", "cust-2"))


def test_a_replay_over_the_state_it_left_forwards_the_same_decisions() -> None:
    orders = _customers(MAX_CUSTOMERS + 2)
    part = Partition()
    first = part.batch(*orders)
    replayed = Partition(part.store).batch(*orders)
    assert replayed == first


def test_an_order_attributed_by_click_is_never_held_for_code_velocity() -> None:
    by_click = [code_item(pending(f"o-{i}", at(minutes=i)), {0: 0}) for i in range(MAX_CUSTOMERS + 2)]
    for item, i in zip(by_click, range(MAX_CUSTOMERS + 2)):
        item.update(customer_id=f"cust-{i}", discount_code="SALLY20")
    assert all(flags == [] for flags in _flags(Partition().batch(*by_click)).values())


def test_each_code_counts_its_own_customers() -> None:
    items = [code_item(coded(f"o-{i}", f"cust-{i}", at(minutes=i), code=code), {0: 0})
             for i, code in enumerate(["SALLY20", "sally20 ", "OTHER", "OTHER", "SALLY20"])]
    assert all(flags == [] for flags in _flags(Partition().batch(*items)).values())


def test_uses_no_order_to_come_can_count_are_forgotten() -> None:
    part = Partition()
    part.batch(code_item(coded("o-1", "cust-1", at()), {0: 0}))
    # Velocity horizon (60 min) plus the late-order allowance (6 h) later, the old use goes.
    part.batch(code_item(coded("o-2", "cust-2", at(hours=7, minutes=1)), {0: 0}))
    uses = orjson.loads(part.store.data[b"SALLY20"])
    assert [customer for _, customer in uses] == _tokens("cust-2")


def test_a_waiting_order_keeps_the_uses_around_its_own_ts() -> None:
    part = Partition()
    part.batch(code_item(coded("o-1", "cust-1", at()), {0: 0}))
    # o-2, eight hours on, is decided; o-wait (minute 30) still waits behind it for partition 0.
    part.batch(code_item(coded("o-2", "cust-2", at(hours=8)), {0: 0}),
               code_item(coded("o-wait", "cust-w", at(minutes=30)), {0: 5}))
    assert part.stage.first_waiting_offset() == 2
    stored = [c for _, c in orjson.loads(part.store.data[b"SALLY20"])]
    assert stored == _tokens("cust-1", "cust-2")  # cust-1 is inside o-wait's window: kept
    [sent] = part.batch(progress(0, 5))
    assert sent.order_id == "o-wait"


def _tokens(*customers: str) -> list[str]:
    return [customer_token(c) for c in customers]


def test_the_state_keeps_customer_tokens_and_reads_ids_stored_before_as_tokens() -> None:
    assert customer_token("cust-1") != customer_token("cust-2")
    assert customer_token("cust-1") == customer_token(customer_token("cust-1"))
    assert customer_token("cust-1", b"key") != customer_token("cust-1")
    part = Partition()
    part.store.data[b"SALLY20"] = orjson.dumps([[at(minutes=1).timestamp(), "cust-legacy"]])
    sent = part.batch(*_customers(1))
    assert sent
    stored = [c for _, c in orjson.loads(part.store.data[b"SALLY20"])]
    assert "cust-legacy" not in stored and customer_token("cust-legacy") in stored
    assert all(c.startswith("h:") for c in stored)
