"""The commit ledger: what it admits, what it lets Faust commit, and how a rebalance fences a batch.

No Kafka here: the broker's answers come from `FakeSource`, Faust's consumer from `FakeConsumer`.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP
from hypothesis import given, settings
from hypothesis import strategies as st

from sinks.metrics import METRICS
from streams.offsets import OffsetLedger, Rebalanced, check_fence, install

CLICKS0 = TP("clicks", 0)
CLICKS1 = TP("clicks", 1)


def event(tp: tuple[str, int], offset: int) -> Any:
    return SimpleNamespace(message=SimpleNamespace(tp=tp, offset=offset, topic=tp[0], partition=tp[1]))


class FakeSource:
    """The broker: committed offsets, and which offsets hold records."""

    def __init__(self, committed: dict | None = None, holes: set[int] = frozenset()) -> None:
        self.committed = committed or {}
        self.holes = set(holes)  # offsets with no record (transaction markers)
        self.asked: list[Any] = []
        self.probes = 0

    async def starting_offsets(self, tps):
        self.asked.extend(tps)
        return {tp: self.committed.get(tp, 0) for tp in tps}

    async def first_offset_from(self, tp, offset):
        self.probes += 1
        while offset in self.holes:
            offset += 1
        return offset


class Seeks:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, int]] = []

    async def __call__(self, tp, offset):
        self.calls.append((tp, offset))


def run(coro):
    return asyncio.run(coro)


def admit(ledger: OffsetLedger, events, seek=None):
    fence = ledger.fence()
    admitted = run(ledger.admit(events, seek or Seeks(), fence))
    return admitted, fence


def offsets(events) -> list[int]:
    return [e.message.offset for e in events]


def test_a_partition_starts_at_the_groups_committed_offset_and_skips_what_was_done():
    ledger = OffsetLedger(FakeSource({CLICKS0: 5}))
    admitted, fence = admit(ledger, [event(CLICKS0, o) for o in range(3, 9)])
    assert offsets(admitted) == [5, 6, 7, 8]
    assert ledger.committable(CLICKS0) is None  # nothing is committable before it is done
    ledger.done(admitted, fence)
    assert ledger.committable(CLICKS0) == 9
    assert ledger.next_offset(CLICKS0) == 9


def test_records_that_were_never_delivered_are_read_again_not_committed_across():
    rereads_before = METRICS.partition_rereads.labels("clicks")._value.get()
    ledger = OffsetLedger(FakeSource({CLICKS0: 0, CLICKS1: 0}))
    seeks = Seeks()
    batch = [event(CLICKS0, 4), event(CLICKS0, 5), event(CLICKS1, 0), event(CLICKS1, 1)]
    admitted, fence = admit(ledger, batch, seeks)
    assert [(e.message.tp, e.message.offset) for e in admitted] == [(CLICKS1, 0), (CLICKS1, 1)]
    assert seeks.calls == [(CLICKS0, 0)]
    ledger.done(admitted, fence)
    assert ledger.committable(CLICKS0) is None
    assert ledger.committable(CLICKS1) == 2
    assert METRICS.partition_rereads.labels("clicks")._value.get() == rereads_before + 1


def test_records_fetched_before_the_seek_do_not_send_the_consumer_back_again():
    source = FakeSource({CLICKS0: 0})
    ledger = OffsetLedger(source)
    seeks = Seeks()
    admit(ledger, [event(CLICKS0, 4)], seeks)
    admit(ledger, [event(CLICKS0, 5)], seeks)  # still draining what was fetched before the seek
    assert seeks.calls == [(CLICKS0, 0)]
    assert source.probes == 1  # the broker is asked once per gap, not once per stale record
    admitted, _ = admit(ledger, [event(CLICKS0, 0), event(CLICKS0, 1)], seeks)
    assert offsets(admitted) == [0, 1]


def test_a_partition_whose_re_read_never_began_is_sent_back_again(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("streams.offsets.time.monotonic", lambda: clock[0])
    ledger = OffsetLedger(FakeSource({CLICKS0: 0, CLICKS1: 0}))
    seeks = Seeks()
    admit(ledger, [event(CLICKS0, 4), event(CLICKS1, 3)], seeks)
    admitted, fence = admit(ledger, [event(CLICKS1, 0)], seeks)  # CLICKS1 is being re-read
    ledger.done(admitted, fence)
    clock[0] += 1
    run(ledger.reseek_stalled(seeks))
    assert seeks.calls == [(CLICKS0, 0), (CLICKS1, 0)]  # too soon for a second seek
    clock[0] += 5
    run(ledger.reseek_stalled(seeks))
    assert seeks.calls[2:] == [(CLICKS0, 0)]  # CLICKS1 began its re-read: left alone


def test_offsets_without_records_are_crossed_once_the_broker_confirms_them():
    ledger = OffsetLedger(FakeSource({CLICKS0: 10}, holes={10, 11}))
    seeks = Seeks()
    admitted, fence = admit(ledger, [event(CLICKS0, 12), event(CLICKS0, 13)], seeks)
    assert offsets(admitted) == [12, 13]
    assert seeks.calls == []
    ledger.done(admitted, fence)
    assert ledger.committable(CLICKS0) == 14


def test_a_batch_that_began_before_a_rebalance_is_fenced_and_commits_nothing():
    ledger = OffsetLedger(FakeSource({CLICKS0: 0}))
    admitted, fence = admit(ledger, [event(CLICKS0, 0), event(CLICKS0, 1)])
    ledger.revoked([CLICKS0])
    with pytest.raises(Rebalanced):
        ledger.done(admitted, fence)
    assert ledger.committable(CLICKS0) is None


def test_records_of_partitions_another_worker_owns_now_are_never_admitted():
    source = FakeSource({CLICKS0: 0, CLICKS1: 0})
    ledger = OffsetLedger(source, owned=lambda: {CLICKS1})
    admitted, _ = admit(ledger, [event(CLICKS0, 0), event(CLICKS1, 0)])
    assert [e.message.tp for e in admitted] == [CLICKS1]
    assert source.asked == [CLICKS1]  # not even its start is looked up


def test_while_the_app_rebalances_every_effect_is_fenced():
    rebalancing = False
    ledger = OffsetLedger(FakeSource(), interrupted=lambda: rebalancing)
    fence = ledger.fence()
    token = ledger.enter(fence)
    try:
        check_fence()  # no rebalance: effects may go ahead
        rebalancing = True
        with pytest.raises(Rebalanced):
            check_fence()
    finally:
        ledger.leave(token)
    check_fence()  # outside a batch nothing is fenced


def test_after_a_revocation_the_partition_starts_again_from_what_the_group_committed():
    source = FakeSource({CLICKS0: 0})
    ledger = OffsetLedger(source)
    admitted, fence = admit(ledger, [event(CLICKS0, 0), event(CLICKS0, 1)])
    ledger.done(admitted, fence)
    ledger.revoked([CLICKS0])
    source.committed[CLICKS0] = 7  # another worker got on meanwhile
    admitted, _ = admit(ledger, [event(CLICKS0, 2), event(CLICKS0, 7)])
    assert offsets(admitted) == [7]
    assert source.asked == [CLICKS0, CLICKS0]


class FakeConsumer:
    """Just the parts of Faust's consumer that `install` replaces or reads."""

    def __init__(self) -> None:
        self._acked: dict = defaultdict(list)
        self._acked_index: dict = defaultdict(set)
        self._gap: dict = {}
        self._committed_offset: dict = defaultdict(lambda: None)
        self.events: list = []
        self.assigned: set = set()

    def _new_offset(self, tp):  # Faust's rule: the first run of acked offsets
        acked = sorted(self._acked[tp])
        return acked[-1] + 1 if acked else None

    def _filter_tps_with_pending_acks(self, topics=None):
        return iter(list(self._acked))

    async def perform_seek(self):  # Faust's: to the committed offsets, where there are any
        self.events.append("faust seek")

    async def seek_wait(self, offsets):
        self.events.append(("seek", dict(offsets)))

    def assignment(self):
        return self.assigned

    def _filter_committable_offsets(self, tps):  # Faust's rule, which install replaces
        return {tp: self._new_offset(tp) for tp in tps}

    def _should_commit(self, tp, offset):
        committed = self._committed_offset[tp]
        return committed is None or offset > committed


def test_an_unsupported_faust_version_refuses_to_start_rather_than_commit_its_acks(monkeypatch):
    import faust

    monkeypatch.setattr(faust, "__version__", "0.16.0")
    with pytest.raises(RuntimeError, match="not supported"):
        install(FakeConsumer(), OffsetLedger(FakeSource()), {"clicks"})


def test_after_a_rebalance_every_stream_partition_starts_where_the_ledger_starts_it():
    consumer = FakeConsumer()
    consumer.assigned = {CLICKS0, CLICKS1, TP("changelog", 0)}
    install(consumer, OffsetLedger(FakeSource({CLICKS0: 7})), {"clicks"})
    run(consumer.perform_seek())
    assert consumer.events == ["faust seek", ("seek", {CLICKS0: 7, CLICKS1: 0})]


def test_faust_commits_what_the_ledger_allows_not_what_its_streams_acked():
    consumer = FakeConsumer()
    ledger = OffsetLedger(FakeSource({CLICKS0: 0}))
    install(consumer, ledger, {"clicks"})
    admitted, fence = admit(ledger, [event(CLICKS0, 0), event(CLICKS0, 1)])
    ledger.done(admitted, fence)
    consumer._acked[CLICKS0].extend([0, 1, 4, 5, 6])  # Faust also saw acks for undelivered offsets
    consumer._acked[TP("other", 0)].extend([0, 1, 2])
    pending = list(consumer._filter_tps_with_pending_acks())
    assert consumer._filter_committable_offsets(pending) == {CLICKS0: 2, TP("other", 0): 3}
    assert consumer._acked[CLICKS0] == []  # Faust's ack list of our topics does not grow


@settings(max_examples=200, deadline=None)
@given(
    start=st.integers(0, 20),
    deliveries=st.lists(st.integers(0, 40), min_size=1, max_size=30),
)
def test_the_committable_offset_never_passes_a_record_no_batch_processed(start, deliveries):
    """Whatever order and duplicates records are delivered in, the ledger only ever allows
    committing an offset below which every record was admitted to a finished batch."""
    ledger = OffsetLedger(FakeSource({CLICKS0: start}))
    processed: set[int] = set()
    for offset in deliveries:
        admitted, fence = admit(ledger, [event(CLICKS0, offset)])
        ledger.done(admitted, fence)
        processed.update(offsets(admitted))
        committable = ledger.committable(CLICKS0)
        if committable is not None:
            assert set(range(start, committable)) <= processed
