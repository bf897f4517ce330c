"""Crash and outage: kill -9 of the worker, ClickHouse down for 60 s. Nothing lost, nothing doubled."""

from __future__ import annotations

import threading
import time

import orjson
import pytest

from loadtests.generator import TrafficProfile, generate, sample_reference
from schemas.validation import parse_reference_document
from streams.publish import produce_lines, publish_reference

pytestmark = pytest.mark.integration

#: Tables and the columns that make up each logical row (inserted_at differs between runs).
SNAPSHOT_QUERIES = {
    "clicks": "SELECT event_id, ts, visitor_id, affiliate_id, channel, referrer_host"
              " FROM {db}.clicks FINAL ORDER BY event_id",
    "shares": "SELECT event_id, ts, affiliate_id, share_id FROM {db}.shares FINAL ORDER BY event_id",
    "attributed_orders": "SELECT order_id, ts, affiliate_id, program_id, method, click_event_id,"
                         " channel, total, commission, flags, status"
                         " FROM {db}.attributed_orders FINAL ORDER BY order_id",
    "commission_facts": "SELECT fact_id, kind, amount, status, ts"
                        " FROM {db}.commission_facts FINAL ORDER BY fact_id",
    "abuse_flags": "SELECT order_id, reason, severity, detail FROM {db}.abuse_flags FINAL"
                   " ORDER BY order_id, reason",
}


def traffic(visitors: int) -> tuple[dict, list[bytes]]:
    reference = sample_reference(n_affiliates=20)
    events = [orjson.dumps(e) for e in generate(reference, TrafficProfile(visitors=visitors, seed=11))]
    return reference, events


def publish(isolated, reference: dict, events: list[bytes]) -> None:
    publish_reference(isolated.config, *parse_reference_document(orjson.dumps(reference)))
    produce_lines(isolated.config, events)


def snapshot(isolated) -> dict[str, list]:
    return {table: isolated.query(sql) for table, sql in SNAPSHOT_QUERIES.items()}


def counts(isolated) -> dict[str, int]:
    return {t: isolated.query(f"SELECT count() FROM {{db}}.{t} FINAL")[0][0] for t in SNAPSHOT_QUERIES}


def wait_for_counts(isolated, expected: dict[str, int], timeout: float = 240.0,
                    fail_on_stall: float | None = None) -> None:
    """Wait until the counts equal `expected`.

    With `fail_on_stall`, a worker that makes no progress at all for that long fails the test at
    once, with the worker's log and a dump of every task's stack (a stalled worker is a defect,
    whatever the counts).
    """
    deadline = time.monotonic() + timeout
    seen: dict[str, int] = {}
    last_change, last_seen = time.monotonic(), None
    while time.monotonic() < deadline:
        try:
            seen = counts(isolated)
        except Exception:  # ClickHouse may be the thing that is down
            seen = {}
        if seen == expected:
            return
        if seen != last_seen:
            last_change, last_seen = time.monotonic(), seen
        elif fail_on_stall and seen and time.monotonic() - last_change > fail_on_stall:
            for worker in isolated.workers:
                worker.dump_stacks()  # mode's SIGUSR1 handler logs every thread and task stack
            time.sleep(3)
            logs = "\n".join(w.log_path.read_text(errors="replace")[-12000:] for w in isolated.workers)
            raise AssertionError(f"worker stalled at {seen} (expected {expected}):\n{logs}")
        for worker in isolated.workers:
            worker.assert_alive_or_expected()
        time.sleep(1)
    logs = "\n".join(w.log_path.read_text(errors="replace")[-4000:] for w in isolated.workers)
    raise AssertionError(f"counts {seen} never reached {expected}; worker log tail:\n{logs}")


def undisturbed_run(isolated_factory, reference, events) -> tuple[dict[str, int], dict[str, list]]:
    baseline = isolated_factory()
    publish(baseline, reference, events)
    worker = baseline.worker().start()
    # settled: the same counts twice, 5 s apart, after everything was consumed
    previous: dict[str, int] = {}
    for _ in range(120):
        time.sleep(5)
        current = counts(baseline)
        if current == previous and current["attributed_orders"] > 0:
            break
        previous = current
    worker.stop()
    return current, snapshot(baseline)


def test_kill_9_in_mid_stream_then_restart_gives_the_same_rows_as_an_undisturbed_run(isolated_factory):
    reference, events = traffic(visitors=6000)
    expected_counts, expected_rows = undisturbed_run(isolated_factory, reference, events)
    assert expected_counts["commission_facts"] > 50

    crashed = isolated_factory()
    publish(crashed, reference, events)
    # small batches: many commits, so the kill lands between some and before others
    worker = crashed.worker(ATTRIBUTION_BATCH_SIZE="100").start()
    crashed.wait_for("SELECT count() FROM {db}.clicks FINAL", lambda n: n >= 1000, timeout=120)
    worker.kill9()
    assert counts(crashed) != expected_counts, "the kill came too late to test anything"
    worker.start()

    wait_for_counts(crashed, expected_counts, fail_on_stall=120)
    assert snapshot(crashed) == expected_rows


def test_clickhouse_down_for_a_minute_delays_rows_but_loses_and_doubles_none(isolated_factory, stack):
    reference, events = traffic(visitors=1500)
    expected_counts, expected_rows = undisturbed_run(isolated_factory, reference, events)

    run = isolated_factory()
    publish_reference(run.config, *parse_reference_document(orjson.dumps(reference)))
    worker = run.worker().start()
    first, rest = events[: len(events) // 4], events[len(events) // 4:]
    produce_lines(run.config, first)
    run.wait_for("SELECT count() FROM {db}.clicks FINAL", lambda n: n > 0)

    stack.stop_clickhouse()
    try:
        sender = threading.Thread(target=produce_lines, args=(run.config, rest))
        sender.start()  # events keep flowing while ClickHouse is down
        time.sleep(60)
        sender.join()
        assert worker.alive(), "the worker must wait out the outage, not exit"
    finally:
        stack.start_clickhouse()

    wait_for_counts(run, expected_counts)
    assert worker.alive()
    assert snapshot(run) == expected_rows
