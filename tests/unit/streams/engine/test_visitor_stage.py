"""The visitor stage (`streams.engine.stages.VisitorStage`): clicks remembered as touches, orders
decided against them and forwarded to the code stage or the ledger (contract §4)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import orjson
from hypothesis import given
from hypothesis import strategies as st

from streams.engine.effects import CODE, LEDGER, Effects
from streams.engine.stages import VisitorStage
from streams.rules.attribution import touch_horizon
from streams.engine.state import MemoryStore, Staged

from engine_builders import REF, T0, at, click, forwarded, order


def _batch(store: MemoryStore) -> tuple[VisitorStage, Staged, Effects]:
    staged = Staged(store)
    return VisitorStage(staged, touch_horizon(REF)), staged, Effects()


def _commit(stage: VisitorStage, staged: Staged, store: MemoryStore) -> None:
    stage.finish()
    store.write(staged.writes)


# clicks

def test_a_click_is_remembered_once_and_its_duplicate_writes_no_second_row() -> None:
    stage, _, effects = _batch(MemoryStore())
    assert stage.click(click("c-1", at(hours=-2)), REF, effects) is True
    assert stage.click(click("c-1", at(hours=-2)), REF, effects) is False
    assert [t.event_id for t in stage.touches_of("v-1")] == ["c-1"]
    assert [row[0] for row in effects.rows["clicks"]] == ["c-1"]


def test_a_click_remembered_by_an_earlier_batch_is_a_duplicate_in_the_next() -> None:
    store = MemoryStore()
    stage, staged, effects = _batch(store)
    stage.click(click("c-1", at(hours=-2)), REF, effects)
    _commit(stage, staged, store)

    stage, _, effects = _batch(store)
    assert stage.click(click("c-1", at(hours=-2)), REF, effects) is False
    assert effects.rows == {}


def test_touches_are_staged_only_by_finish() -> None:
    store = MemoryStore()
    stage, staged, effects = _batch(store)
    stage.click(click("c-1", at(hours=-2)), REF, effects)
    assert staged.writes == {}
    stage.finish()
    assert set(staged.writes) == {b"v-1"}
    assert store.data == {}  # the runner makes the state, not the stage


def test_touches_persist_through_finish_and_a_new_stage_reads_them_back() -> None:
    store = MemoryStore()
    stage, staged, effects = _batch(store)
    stage.click(click("c-1", at(hours=-3, microseconds=123_457), channel="youtube",
                      referrer="https://WWW.RetailMeNot.com/sally",
                      landing_url="https://shop.example/?gclid=abc"), REF, effects)
    stage.click(click("c-2", at(hours=-1), affiliate_id="bob"), REF, effects)
    stage.click(click("c-9", at(hours=-1), visitor_id="v-2"), REF, effects)
    remembered = {v: stage.touches_of(v) for v in ("v-1", "v-2")}
    _commit(stage, staged, store)

    again, _, _ = _batch(store)
    assert {v: again.touches_of(v) for v in ("v-1", "v-2")} == remembered
    first = again.touches_of("v-1")[0]
    assert (first.ts, first.channel, first.referrer_host, first.paid_click_id) == (
        at(hours=-3, microseconds=123_457), "youtube", "www.retailmenot.com", "gclid")


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                    timezones=st.just(timezone.utc)))
def test_a_touch_read_back_from_the_store_has_its_click_time_to_the_microsecond(ts: datetime) -> None:
    store = MemoryStore()
    stage, staged, effects = _batch(store)
    stage.click(click("c-1", ts), REF, effects)
    _commit(stage, staged, store)
    again, _, _ = _batch(store)
    assert again.touches_of("v-1")[0].ts == ts


# orders

def test_an_order_with_touches_is_decided_last_click_and_sent_to_the_ledger_by_order_id() -> None:
    stage, _, effects = _batch(MemoryStore())
    stage.click(click("c-1", at(hours=-2), channel="tiktok"), REF, effects)
    decided = stage.order(order(), REF, effects, {0: 7, 1: 3}, timestamp_ms=1_234)

    assert (decided.affiliate_id, decided.method, decided.click_event_id) == ("sally", "last_click", "c-1")
    [sent] = effects.forwards
    assert (sent.topic, sent.key, sent.timestamp_ms, sent.partition) == (LEDGER, b"o-1", 1_234, None)
    item = orjson.loads(sent.item)
    assert (item["type"], item["order_id"], item["method"], item["channel"]) == (
        "decided_order", "o-1", "last_click", "tiktok")
    assert "orders_end" not in item  # only the code stage waits for other partitions


def test_an_order_sees_the_clicks_remembered_earlier_in_its_own_batch() -> None:
    store = MemoryStore()
    stage, _, effects = _batch(store)
    stage.click(click("c-1", at(minutes=-30)), REF, effects)
    assert stage.order(order(), REF, effects, None, None).method == "last_click"


def test_an_order_sees_the_clicks_of_earlier_batches() -> None:
    store = MemoryStore()
    stage, staged, effects = _batch(store)
    stage.click(click("c-1", at(minutes=-30), affiliate_id="bob"), REF, effects)
    _commit(stage, staged, store)

    stage, _, effects = _batch(store)
    decided = stage.order(order(), REF, effects, None, None)
    assert (decided.affiliate_id, decided.method) == ("bob", "last_click")


def test_a_coded_order_goes_to_the_code_stage_keyed_by_the_normalised_code_with_its_orders_ends() -> None:
    stage, _, effects = _batch(MemoryStore())
    decided = stage.order(order(discount_code="  sally20 "), REF, effects, {0: 7, 1: 3}, 99)

    assert (decided.affiliate_id, decided.method) == ("sally", "code")
    assert forwarded(effects, LEDGER) == []
    [sent] = forwarded(effects, CODE)
    assert (sent.key, sent.timestamp_ms) == (b"SALLY20", 99)
    item = orjson.loads(sent.item)
    assert item["orders_end"] == {"0": 7, "1": 3}
    assert (item["order_id"], item["discount_code"], item["method"]) == ("o-1", "  sally20 ", "code")


def test_a_code_nobody_owns_still_goes_to_the_code_stage() -> None:
    stage, _, effects = _batch(MemoryStore())
    stage.click(click("c-1", at(hours=-2)), REF, effects)
    decided = stage.order(order(discount_code="NOBODY10"), REF, effects, {0: 1}, None)
    assert decided.method == "last_click"
    assert [f.key for f in effects.forwards] == [b"NOBODY10"]


def test_a_coded_order_read_without_orders_ends_carries_none() -> None:
    stage, _, effects = _batch(MemoryStore())
    stage.order(order(discount_code="SALLY20"), REF, effects, None, None)
    assert "orders_end" not in orjson.loads(effects.forwards[0].item)


def test_an_unattributed_order_is_still_sent_to_the_ledger() -> None:
    stage, _, effects = _batch(MemoryStore())
    stage.click(click("c-old", at(days=-31)), REF, effects)  # outside the 30-day window
    decided = stage.order(order(), REF, effects, {0: 1}, None)

    assert (decided.affiliate_id, decided.method, decided.ledger) == ("", "none", None)
    [sent] = effects.forwards
    assert (sent.topic, sent.key) == (LEDGER, b"o-1")
    assert orjson.loads(sent.item)["method"] == "none"


def test_deciding_an_order_changes_no_touches() -> None:
    store = MemoryStore()
    stage, staged, effects = _batch(store)
    stage.order(order(), REF, effects, None, None)
    stage.finish()
    assert staged.writes == {}
    assert "clicks" not in effects.rows


def test_clicks_beyond_the_touch_horizon_of_the_newest_are_forgotten() -> None:
    stage, _, effects = _batch(MemoryStore())
    stage.click(click("c-old", T0 - timedelta(days=40)), REF, effects)
    stage.click(click("c-new", T0), REF, effects)
    assert [t.event_id for t in stage.touches_of("v-1")] == ["c-new"]
