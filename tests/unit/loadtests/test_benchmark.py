"""The pure parts of the benchmark (`loadtests.benchmark`) and the generator's pacing: percentiles,
the rows a published stream must become, and the fixed-rate schedule. No Kafka, no ClickHouse."""

from __future__ import annotations

import itertools
import math
import os
import time
from typing import Any

import orjson
import pytest
from rich.console import Console

from loadtests.benchmark import (
    LATENCY_BATCH_MAX,
    BenchmarkError,
    CpuMeter,
    ExpectedRows,
    backlog_of_at_least,
    bare_faust_summary,
    decoded_counts,
    describe_code,
    expected_rows,
    latency_batch,
    main,
    median_by_thirds,
    order_ids,
    percentile,
    results_table,
    summarise_latency,
    visitors_for,
    worker_cores,
)
from loadtests.generator import TrafficProfile, generate, pace, sample_reference, seconds_until_due
from schemas.validation import encode_json

TS = "2026-11-02T10:00:00Z"


def click(event_id: str, visitor: str = "v-1") -> bytes:
    return orjson.dumps({"event_id": event_id, "type": "click", "ts": TS, "visitor_id": visitor,
                         "session_id": "s-1", "affiliate_id": "aff-001", "channel": "blog"})


def order(event_id: str, order_id: str, total: str = "10.00") -> bytes:
    return orjson.dumps({"event_id": event_id, "type": "order", "ts": TS, "order_id": order_id,
                         "visitor_id": "v-1", "customer_id": "c-1", "currency": "USD",
                         "total": total})


def share(event_id: str) -> bytes:
    return orjson.dumps({"event_id": event_id, "type": "share", "ts": TS,
                         "affiliate_id": "aff-001", "share_id": "sh-1", "channel": "blog"})


# --- percentiles ---


def test_percentile_interpolates_between_ranks_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 95) == pytest.approx(3.85)


def test_percentile_does_not_depend_on_input_order() -> None:
    values = [float(n) for n in range(1, 101)]
    assert percentile(list(reversed(values)), 99) == pytest.approx(99.01)
    assert percentile(values, 50) == 50.5


def test_percentile_of_one_value_is_that_value() -> None:
    assert percentile([0.7], 99) == 0.7


def test_percentile_rejects_no_values_and_bad_q() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_summary_counts_unseen_orders_and_has_no_percentiles_without_samples() -> None:
    empty = summarise_latency([], unseen=3)
    assert (empty.samples, empty.unseen, empty.p50_s, empty.max_s) == (0, 3, None, None)
    summary = summarise_latency([0.5, 1.5, 1.0], unseen=0)
    assert (summary.samples, summary.p50_s, summary.max_s) == (3, 1.0, 1.5)


def test_medians_by_third_show_a_growing_delay() -> None:
    samples = [(0.0, 1.0), (1.0, 1.2), (4.0, 2.0), (5.0, 2.2), (8.0, 5.0), (9.0, 6.0)]
    assert median_by_thirds(samples) == [1.1, 2.1, 5.5]


def test_medians_by_third_of_nothing_or_one_instant() -> None:
    assert median_by_thirds([]) == [None, None, None]
    assert median_by_thirds([(3.0, 0.5), (3.0, 0.7)]) == [0.6, None, None]


# --- what the worker must write ---


def test_expected_rows_count_distinct_valid_ids_per_table() -> None:
    lines = [
        click("e1"), click("e1"),  # a producer retry: one row
        click("e2"),
        share("e3"),
        order("e4", "o-1"), order("e5", "o-1"),  # the same order twice: the first wins
        order("e6", "o-2"),
    ]
    assert expected_rows(lines) == ExpectedRows(
        lines=7, unroutable=0, invalid=0, duplicates=2,
        clicks=2, shares=1, orders=2, refunds=0,
    )


def test_expected_rows_leave_out_invalid_and_unroutable_lines() -> None:
    lines = [
        order("e1", "o-1", total="-5.00"),  # routable, dead-lettered by the worker
        b"not json",  # never sent
        orjson.dumps({"type": "click", "event_id": "e2"}),  # no visitor_id: never sent
        click("e3"),
    ]
    expected = expected_rows(lines)
    assert (expected.invalid, expected.unroutable) == (1, 2)
    assert (expected.clicks, expected.orders, expected.rows) == (1, 0, 1)


def test_expected_rows_of_a_generated_day_match_its_distinct_ids() -> None:
    events = list(generate(sample_reference(), TrafficProfile(visitors=500, duplicate_rate=0.05)))
    expected = expected_rows([encode_json(event) for event in events])
    by_type = {kind: {e["order_id"] if kind == "order" else e["event_id"]
                      for e in events if e["type"] == kind}
               for kind in ("click", "share", "order", "refund")}
    assert expected.lines == len(events)
    assert (expected.clicks, expected.shares, expected.orders, expected.refunds) == tuple(
        len(by_type[kind]) for kind in ("click", "share", "order", "refund"))
    assert expected.duplicates > 0 and expected.invalid == 0


def test_order_ids_name_the_order_of_each_valid_order_line_only() -> None:
    lines = [click("e1"), order("e2", "o-1"), order("e3", "o-2", total="oops"), b"{"]
    assert order_ids(lines) == [None, "o-1", None, None]


def test_visitors_for_leaves_head_room_and_never_asks_for_none() -> None:
    assert visitors_for(300_000, 2.0) == math.ceil(150_000 * 1.02)
    assert visitors_for(0, 2.0) == 1
    with pytest.raises(ValueError):
        visitors_for(10, 0.0)


# --- pacing ---


def test_item_n_is_due_n_over_rate_seconds_after_the_first() -> None:
    assert seconds_until_due(0, 100.0, 0.0) == 0.0
    assert seconds_until_due(50, 100.0, 0.3) == pytest.approx(0.2)
    assert seconds_until_due(750, 750.0, 0.25) == pytest.approx(0.75)


def test_a_late_item_goes_at_once_and_the_schedule_does_not_slide() -> None:
    assert seconds_until_due(10, 100.0, 0.5) == 0.0  # due at 0.1 s, it is 0.5 s
    # after the pause the next items keep their own slots: item 60 is still due at 0.6 s
    assert seconds_until_due(60, 100.0, 0.5) == pytest.approx(0.1)


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError):
        seconds_until_due(1, 0.0, 0.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_pace_hands_out_items_at_the_rate() -> None:
    clock = FakeClock()
    handed: list[tuple[str, float]] = []
    for item in pace(["a", "b", "c", "d"], 4.0, clock=clock, sleep=clock.sleep):
        handed.append((item, clock.now - 100.0))
    assert handed == [("a", 0.0), ("b", 0.25), ("c", 0.5), ("d", 0.75)]


def test_pace_makes_up_a_pause_without_sleeping() -> None:
    clock = FakeClock()
    handed: list[float] = []
    for item in pace(range(5), 10.0, clock=clock, sleep=clock.sleep):
        handed.append(round(clock.now - 100.0, 6))
        if item == 1:
            clock.now += 0.25  # a slow send: items 2 and 3 are already due
    assert handed == [0.0, 0.1, 0.35, 0.35, 0.4]


def test_worker_cores_add_up_every_worker_and_nothing_else() -> None:
    assert worker_cores({"worker": 0.9, "kafka": 0.1, "benchmark": 0.05, "others": 0.02}) == 0.9
    assert worker_cores({"worker-1": 0.8, "worker-2": 0.7, "kafka": 0.2, "clickhouse": 0.1}) == 1.5


# --- the backlog ---


def test_the_backlog_has_at_least_the_events_asked_for_and_the_generators_default_mix() -> None:
    profile, lines = backlog_of_at_least(6000, seed=3)
    assert len(lines) >= 6000
    assert profile.conversion_rate == TrafficProfile().conversion_rate
    types = [orjson.loads(line)["type"] for line in lines]
    assert types.count("order") / len(types) < 0.03
    assert len(list(itertools.groupby(types))) > 100  # interleaved


def test_an_order_heavy_topic_by_topic_backlog() -> None:
    profile, lines = backlog_of_at_least(6000, seed=3, order_share=0.2, shape="topic-by-topic")
    assert len(lines) >= 6000
    types = [orjson.loads(line)["type"] for line in lines]
    assert 0.18 <= types.count("order") / len(types) <= 0.22
    groups = {"click": "clicks+shares", "share": "clicks+shares", "order": "orders",
              "refund": "refunds"}
    assert [key for key, _ in itertools.groupby(types, groups.__getitem__)] == [
        "clicks+shares", "orders", "refunds"
    ]


def test_an_unreachable_order_share_is_a_benchmark_error() -> None:
    with pytest.raises(BenchmarkError, match="order_share"):
        backlog_of_at_least(6000, seed=3, order_share=0.9)


# --- batched records, the bare Faust agent, the report ---


def test_decoded_counts_count_the_events_of_a_record_as_the_worker_decodes_them() -> None:
    assert decoded_counts(click("e-1"), "click") == (1, 0)
    batched = b"[" + b",".join([click("e-1"), click("e-2"), order("e-3", "o-1")]) + b"]"
    assert decoded_counts(batched, "click") == (3, 1)  # an order on the clicks topic
    assert decoded_counts(b"[]", "click") == (0, 0)
    assert decoded_counts(b"not json", "click") == (1, 1)


def test_the_latency_phase_batches_only_with_batch_and_at_most_a_few_events() -> None:
    assert latency_batch(0) is None
    assert latency_batch(5) == 5
    assert latency_batch(100) == LATENCY_BATCH_MAX == 20


def test_bare_faust_summary_of_single_event_records() -> None:
    summary = bare_faust_summary(8000.0, records=300_000, events=300_000,
                                 pipeline_events_per_s=6000.0,
                                 pipeline_events_per_s_from_first_row=7000.0)
    assert summary == {"records_per_s": 8000, "events_per_record": 1.0, "events_per_s": 8000,
                       "ratio_pipeline_to_bare_faust": 0.75,
                       "ratio_pipeline_from_first_row_to_bare_faust": 0.875}


def test_bare_faust_summary_of_batched_records_is_the_same_share_in_events_and_records() -> None:
    records, events, seconds = 5000, 300_000, 20.0
    summary = bare_faust_summary(2500.0, records=records, events=events,
                                 pipeline_events_per_s=events / seconds,
                                 pipeline_events_per_s_from_first_row=events / seconds)
    assert summary["events_per_record"] == 60.0
    assert summary["events_per_s"] == 150_000
    share = summary["ratio_pipeline_to_bare_faust"]
    assert share == pytest.approx((records / seconds) / 2500.0) == pytest.approx(0.1)


def test_bare_faust_summary_without_records_has_no_share() -> None:
    summary = bare_faust_summary(0.0, records=0, events=0, pipeline_events_per_s=10.0,
                                 pipeline_events_per_s_from_first_row=10.0)
    assert summary["ratio_pipeline_to_bare_faust"] is None


def test_a_process_that_ended_in_the_phase_counts_as_its_own_not_as_others() -> None:
    meter = CpuMeter({})
    time.sleep(0.05)
    meter.add_finished("bare_faust", 0.5)
    cores = meter.cores()
    assert cores["bare_faust"] > 0
    assert "benchmark" in cores and "others" in cores
    assert os.getpid() == meter.pids["benchmark"]


@pytest.mark.parametrize("argv", [["--batch", "-1"], ["--batch", "10001"]])
def test_batch_out_of_range_is_a_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2


def _result(batch: int, bare: dict[str, Any] | None) -> dict[str, Any]:
    expected = {"clicks": 240_000, "shares": 50_000, "orders": 4_500, "refunds": 300}
    return {
        "tag": "t", "code": {"commit": "abc"},
        "settings": {"workers": 1, "batch": batch},
        "machine": {"nproc": 2, "ram_gib": 8, "cpu_model": "cpu", "python": "3.11",
                    "kafka": "4.1.1", "clickhouse": "18.16"},
        "backlog": {"events": 300_000, "expected": expected, "shape": "interleaved",
                    "publish": {"records": 5_000 if batch else 300_000}},
        "catch_up": {"events_per_s": 6_000, "seconds": 50.0, "cpu_cores": {"worker": 1.0},
                     "events_per_s_from_first_row": 7_000, "first_row_after_s": 7.1},
        "baseline": {"events_per_s": 60_000, "seconds": 5.0, "client": "aiokafka",
                     "records_per_s": 1_000},
        "ratio_pipeline_to_baseline": 0.1, "latency": None, "memory": {"peak_rss_mb": 300},
        "disturbances": [], "bare_faust": bare,
    }


def _text(result: dict[str, Any]) -> str:
    console = Console(width=250, record=True)
    console.print(results_table(result))
    return console.export_text()


def test_the_table_shows_the_bare_agent_and_the_share_of_it() -> None:
    bare = bare_faust_summary(8000.0, 300_000, 300_000, 6000.0, 7000.0)
    bare.update(timed_records=295_000, timed_seconds=36.9, timed_from="first-batch")
    text = _text(_result(0, bare))
    assert "bare Faust agent" in text and "8,000 records/s" in text
    assert "pipeline / bare Faust agent" in text and "75.0%" in text and "87.5%" in text


def test_the_table_of_a_batched_run_shows_records_and_events() -> None:
    bare = bare_faust_summary(2500.0, 5_000, 300_000, 6000.0, 7000.0)
    bare.update(timed_records=4_000, timed_seconds=1.6, timed_from="first-batch")
    text = _text(_result(100, bare))
    assert "300,000 events in 5,000 records" in text
    assert "2,500 records/s" in text and "150,000 events/s at 60.0 events per record" in text
    assert "1,000 records/s" in text  # the baseline's


def test_the_table_says_when_the_bare_agent_failed_and_runs_without_it() -> None:
    assert "failed" in _text(_result(0, {"error": "the reader printed no rate\n..."}))
    assert "bare Faust agent" not in _text(_result(0, None))


def test_describe_code_names_the_commit_and_what_differs_from_it() -> None:
    assert describe_code({"commit": "abc", "uncommitted_pipeline_files": []}) == "abc"
    assert describe_code({"commit": "abc", "uncommitted_pipeline_files": ["a.py", "b.py"]}) \
        == "abc + uncommitted a.py, b.py"
