"""Backlog shapes and order-heavy profiles of the traffic generator (`loadtests.generator`):
pure, no Kafka."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import pytest
from kafka.partitioner.default import DefaultPartitioner

from loadtests.generator import (
    DEFAULT_PARTITIONS,
    HOT_PARTITION,
    HOT_SHARE,
    SHAPES,
    TrafficProfile,
    arrange,
    count_by_type,
    generate,
    hot_visitor_id,
    kafka_partition,
    plan_profile,
    sample_reference,
)

Events = list[dict[str, Any]]


@pytest.fixture(scope="module")
def day() -> Events:
    return list(generate(sample_reference(), TrafficProfile(visitors=3000, conversion_rate=0.3)))


def shaped(events: Events, shape: str, **options: Any) -> Events:
    return list(arrange([dict(e) for e in events], shape, **options))


def runs_of_types(events: Events) -> list[str]:
    """The sequence of type groups, one entry per run: clicks and shares count as one group."""
    group = {"click": "clicks+shares", "share": "clicks+shares", "order": "orders",
             "refund": "refunds"}
    return [key for key, _ in itertools.groupby(events, lambda e: group[e["type"]])]


def key_of(event: dict[str, Any]) -> bytes:
    field = {"click": "visitor_id", "order": "visitor_id", "refund": "order_id",
             "share": "affiliate_id"}[event["type"]]
    return str(event[field]).encode()


class _Cluster:
    """Just enough cluster metadata for kafka-python's DefaultPartitioner."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions

    def topics(self) -> set[str]:
        return {"clicks"}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(self.partitions))

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(self.partitions))


def test_the_shapes_are_the_four_the_benchmark_offers() -> None:
    assert SHAPES == ("interleaved", "topic-by-topic", "orders-first", "hot-partition")
    with pytest.raises(ValueError, match="unknown shape"):
        list(arrange([], "sideways"))


def test_interleaved_is_the_generated_stream_untouched(day: Events) -> None:
    assert shaped(day, "interleaved") == day
    assert len(runs_of_types(day)) > 100  # the types really are interleaved


def test_topic_by_topic_sends_clicks_and_shares_then_orders_then_refunds(day: Events) -> None:
    events = shaped(day, "topic-by-topic")
    assert runs_of_types(events) == ["clicks+shares", "orders", "refunds"]
    # the same events, and within each group the generated (time) order
    assert sorted(map(repr, events)) == sorted(map(repr, day))
    for kinds in (("click", "share"), ("order",), ("refund",)):
        assert [e for e in events if e["type"] in kinds] == [e for e in day if e["type"] in kinds]


def test_orders_first_sends_orders_then_clicks_and_shares_then_refunds(day: Events) -> None:
    events = shaped(day, "orders-first")
    assert runs_of_types(events) == ["orders", "clicks+shares", "refunds"]
    assert Counter(map(repr, events)) == Counter(map(repr, day))
    assert [e for e in events if e["type"] == "order"] == [e for e in day if e["type"] == "order"]


def test_kafka_partition_is_kafka_pythons_default_partitioner() -> None:
    partitioner = DefaultPartitioner()
    for partitions in (1, 4, 8, 32):
        for n in range(300):
            key = f"v-42-{n:06d}".encode()
            expected = partitioner.partition("clicks", key, key, b"", b"", _Cluster(partitions))
            assert kafka_partition(key, partitions) == expected
    # Java's Utils.murmur2 test vectors, as positive ints mod a partition count
    assert kafka_partition(b"21", 2**31 - 1) == (-973932308 & 0x7FFFFFFF) % (2**31 - 1)


@pytest.mark.parametrize("partitions", [4, DEFAULT_PARTITIONS])
def test_hot_partition_puts_most_visitors_events_on_partition_0(
    day: Events, partitions: int
) -> None:
    events = shaped(day, "hot-partition", partitions=partitions)
    keyed_by_visitor = [e for e in events if e["type"] in ("click", "order")]
    on = Counter(kafka_partition(key_of(e), partitions) for e in keyed_by_visitor)
    hot = on[HOT_PARTITION] / len(keyed_by_visitor)
    assert HOT_SHARE - 0.05 <= hot <= HOT_SHARE + 0.05
    # the rest spread over every other partition
    assert set(on) == set(range(partitions))
    # before: about 1 / partitions on each
    before = Counter(kafka_partition(key_of(e), partitions) for e in day
                     if e["type"] in ("click", "order"))
    assert before[HOT_PARTITION] / len(keyed_by_visitor) < 0.5


def test_hot_partition_renames_visitors_consistently_and_changes_nothing_else(
    day: Events,
) -> None:
    events = shaped(day, "hot-partition", partitions=4)
    assert len(events) == len(day)
    renamed: dict[str, str] = {}
    for before, after in zip(day, events, strict=True):
        if "visitor_id" in before:
            old, new = before["visitor_id"], after["visitor_id"]
            assert renamed.setdefault(old, new) == new  # one visitor, one new id
            assert new == old or new.startswith(f"{old}-k")
            assert {k: v for k, v in after.items() if k != "visitor_id"} == {
                k: v for k, v in before.items() if k != "visitor_id"
            }
        else:
            assert after == before
    # distinct visitors stay distinct; some really were moved
    assert len(set(renamed.values())) == len(renamed)
    assert sum(old != new for old, new in renamed.items()) > len(renamed) / 2
    # the input events are not modified in place
    copies = [dict(e) for e in day]
    list(arrange(day, "hot-partition", partitions=4))
    assert day == copies


def test_hot_visitor_id_is_deterministic_and_lands_where_the_visitor_belongs() -> None:
    ids = [hot_visitor_id(f"v-7-{n:06d}", 8) for n in range(500)]
    assert ids == [hot_visitor_id(f"v-7-{n:06d}", 8) for n in range(500)]
    hot = sum(kafka_partition(i.encode(), 8) == HOT_PARTITION for i in ids)
    assert 0.7 * 500 <= hot <= 0.9 * 500
    assert hot_visitor_id("v-7-000001", 1) == "v-7-000001"


def test_shapes_change_no_event_count(day: Events) -> None:
    for shape in SHAPES:
        assert count_by_type(shaped(day, shape)) == count_by_type(day)


# --- order-heavy profiles ------------------------------------------------------------------------


@pytest.mark.parametrize("share", [0.05, 0.2])
def test_plan_profile_by_events_hits_the_order_share_and_size(share: float) -> None:
    reference = sample_reference()
    profile = plan_profile(reference, events=30_000, order_share=share, seed=5)
    counts = count_by_type(generate(reference, profile))
    total = sum(counts.values())
    assert 0.95 * 30_000 <= total <= 1.05 * 30_000
    assert share - 0.01 <= counts["order"] / total <= share + 0.01
    assert profile.seed == 5


def test_plan_profile_by_visitors_keeps_them_and_sets_the_conversion_rate() -> None:
    reference = sample_reference()
    profile = plan_profile(reference, visitors=8000, order_share=0.15)
    assert profile.visitors == 8000
    counts = count_by_type(generate(reference, profile))
    assert 0.14 <= counts["order"] / sum(counts.values()) <= 0.16


def test_plan_profile_without_a_share_keeps_the_conversion_rate() -> None:
    reference = sample_reference()
    profile = plan_profile(reference, events=20_000)
    assert profile.conversion_rate == TrafficProfile().conversion_rate
    total = sum(count_by_type(generate(reference, profile)).values())
    assert 0.95 * 20_000 <= total <= 1.05 * 20_000


@pytest.mark.parametrize(
    "bad",
    [
        {"events": 10_000, "order_share": 0.6},  # more than every visitor buying gives
        {"events": 10_000, "order_share": 0.0},
        {"events": 100, "order_share": 0.001},  # fewer than the planted orders
        {"events": 10_000, "visitors": 10},
        {},
    ],
)
def test_plan_profile_rejects_what_it_cannot_make(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        plan_profile(sample_reference(), **bad)
