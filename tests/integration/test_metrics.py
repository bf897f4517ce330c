"""The worker's Prometheus metrics: a real worker is scraped after real traffic, and the consumer lag
reporter (streams/lag.py) is run in-process against the same broker and consumer group."""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from schemas.validation import parse_reference_document
from sinks.metrics import METRICS
from streams.lag import LagReporter, run_lag_reporter
from streams.publish import produce_lines, publish_reference
from tests_support import REFERENCE_FILE_TEXT

from deploy.processes import free_port

pytestmark = pytest.mark.integration

#: Every metric family sinks/metrics.py documents (exposition names: counters without `_total`).
DOCUMENTED_FAMILIES = {
    "attribution_events_consumed", "attribution_events_valid", "attribution_events_invalid",
    "attribution_events_duplicate", "attribution_dead_letters", "attribution_orders_attributed",
    "attribution_abuse_flags", "attribution_facts_written", "attribution_clickhouse_insert_rows",
    "attribution_clickhouse_insert_batches", "attribution_clickhouse_insert_errors",
    "attribution_clickhouse_insert_duration_seconds", "attribution_end_to_end_latency_seconds",
    "attribution_consumer_lag", "attribution_orders_waiting_for_clicks",
    "attribution_reference_loaded", "attribution_orders_without_programs",
}
CONSUMED_TOPICS = ("clicks", "shares", "orders", "refunds", "visitor-events", "ledger-events")


def click(n: int) -> dict[str, object]:
    return {"event_id": f"c{n}", "type": "click", "ts": "2026-11-02T10:00:00Z",
            "visitor_id": f"v{n}", "session_id": f"s{n}", "affiliate_id": "sally",
            "channel": "instagram"}


ORDER = {"event_id": "o1", "type": "order", "ts": "2026-11-02T10:05:00Z", "order_id": "o1",
         "visitor_id": "v1", "customer_id": "cust-1", "currency": "EUR", "total": "100.00",
         "discount_code": "SALLY20"}
SHARE = {"event_id": "sh1", "type": "share", "ts": "2026-11-02T09:00:00Z", "affiliate_id": "sally",
         "share_id": "share-1", "channel": "tiktok"}
#: Routable (it has a visitor_id), so `produce` sends it and the worker dead-letters it.
INVALID_CLICK = dict(click(99), ts="yesterday")


class Scrape:
    """One `/metrics` page: family names and sample values, summed over matching samples."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def scrape_until(port: int, ready: Callable[[Scrape], bool], timeout: float = 30.0) -> Scrape:
    """Counters move just after the rows they count are written: poll until `ready`."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            page = Scrape(response.read().decode())
        if ready(page) or time.monotonic() > deadline:
            return page
        time.sleep(0.5)


def lag_sample(topic: str, partition: int) -> float | None:
    return REGISTRY.get_sample_value(
        "attribution_consumer_lag", {"topic": topic, "partition": str(partition)}
    )


def test_worker_exports_throughput_inserts_latency_and_dead_letters_and_the_lag_reporter_measures_the_backlog(isolated: Any) -> None:
    config = isolated.config
    publish_reference(config, *parse_reference_document(REFERENCE_FILE_TEXT.encode()))
    produce_lines(config, [orjson.dumps(e) for e in [*(click(n) for n in range(1, 6)), SHARE,
                                                     INVALID_CLICK]])
    produce_lines(config, [orjson.dumps(ORDER)])
    port = free_port()
    worker = isolated.worker(METRICS_PORT=str(port)).start()

    isolated.wait_for("SELECT count() FROM {db}.clicks FINAL", lambda n: n == 5)
    isolated.wait_for("SELECT count() FROM {db}.shares FINAL", lambda n: n == 1)
    isolated.wait_for("SELECT count() FROM {db}.attributed_orders FINAL", lambda n: n == 1)
    isolated.wait_for("SELECT count() FROM {db}.commission_facts FINAL", lambda n: n == 1)

    metrics = scrape_until(port, lambda m: (
        m.value("attribution_facts_written_total", kind="accrual") >= 1
        and m.value("attribution_end_to_end_latency_seconds_count", table="clicks") >= 5
        and m.value("attribution_clickhouse_insert_rows_total", table="commission_facts") >= 1
    ))
    assert DOCUMENTED_FAMILIES <= set(metrics.families), DOCUMENTED_FAMILIES - set(metrics.families)
    assert metrics.value("attribution_events_consumed_total", topic="clicks") >= 6
    assert metrics.value("attribution_events_consumed_total", topic="orders") >= 1
    assert metrics.value("attribution_events_consumed_total", topic="shares") >= 1
    assert metrics.value("attribution_events_valid_total", topic="clicks") >= 5
    assert metrics.value("attribution_events_invalid_total", topic="clicks", reason="bad_timestamp") == 1
    assert metrics.value("attribution_dead_letters_total") == 1
    assert metrics.value("attribution_orders_attributed_total", method="code+click") == 1
    assert metrics.value("attribution_facts_written_total", kind="accrual") == 1
    for table in ("clicks", "shares", "attributed_orders", "commission_facts"):
        assert metrics.value("attribution_clickhouse_insert_rows_total", table=table) >= 1, table
        assert metrics.value("attribution_clickhouse_insert_duration_seconds_count", table=table) >= 1
    assert metrics.value("attribution_clickhouse_insert_rows_total", table="clicks") >= 5
    assert metrics.value("attribution_clickhouse_insert_errors_total") == 0
    reference = parse_reference_document(REFERENCE_FILE_TEXT.encode())
    assert metrics.value("attribution_reference_loaded", kind="programs") == len(reference[0])
    assert metrics.value("attribution_reference_loaded", kind="affiliates") == len(reference[1])
    assert metrics.value("attribution_reference_loaded", kind="settings") == (reference[2] is not None)
    assert metrics.value("attribution_orders_without_programs_total") == 0
    latency_count = metrics.value("attribution_end_to_end_latency_seconds_count", table="clicks")
    assert latency_count >= 5
    # Every observation is below the largest finite bucket (5 min): nothing absurd was measured.
    assert metrics.value("attribution_end_to_end_latency_seconds_bucket", table="clicks",
                         le="300.0") == latency_count

    topics = [config.topic(t) for t in CONSUMED_TOPICS]

    async def caught_up() -> dict[Any, int]:
        """Once the worker has committed everything, every partition's lag is 0."""
        reporter = LagReporter(config, config.app_id, topics)
        try:
            deadline = time.monotonic() + 30
            while True:
                lags = await reporter.report()
                if not any(lags.values()) or time.monotonic() > deadline:
                    return lags
                await asyncio.sleep(0.5)
        finally:
            await reporter.stop()

    lags = asyncio.run(caught_up())
    assert lags and set(lags.values()) == {0}, lags
    assert {tp.topic for tp in lags} == set(topics)
    assert len(lags) == len(topics) * config.partitions

    # With the worker stopped, three more clicks are exactly the group's backlog.
    worker.stop()
    produce_lines(config, [orjson.dumps(click(n)) for n in range(10, 13)])
    METRICS.consumer_lag.clear()

    async def one_round_of_the_reporter() -> None:
        task = asyncio.create_task(run_lag_reporter(config, topics, interval=0.2))
        deadline = time.monotonic() + 30
        while lag_sample(config.topic("clicks"), 0) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(one_round_of_the_reporter())
    clicks_lag = [lag_sample(config.topic("clicks"), p) for p in range(config.partitions)]
    assert None not in clicks_lag, clicks_lag
    assert sum(v for v in clicks_lag if v is not None) == 3
    for topic in ("orders", "shares", "visitor-events", "ledger-events"):
        assert [lag_sample(config.topic(topic), p) for p in range(config.partitions)] == \
            [0.0] * config.partitions, topic


def test_lag_reporter_logs_and_keeps_going_when_a_topic_is_missing(
    isolated: Any, caplog: pytest.LogCaptureFixture
) -> None:
    config = isolated.config

    async def run_for_a_while() -> bool:
        task = asyncio.create_task(
            run_lag_reporter(config, [config.topic("no-such-topic")], interval=0.1)
        )
        await asyncio.sleep(2.0)  # many rounds, every one failing
        still_running = not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return still_running

    with caplog.at_level(logging.DEBUG, logger="streams.lag"):
        assert asyncio.run(run_for_a_while())
    warnings = [r for r in caplog.records if r.name == "streams.lag" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]  # one line per outage
    assert "no-such-topic" in warnings[0].getMessage()


def test_orders_decided_with_no_program_loaded_are_counted_and_logged(isolated: Any) -> None:
    """Issue 12: reference data that never arrived made every order unattributed, silently."""
    config = isolated.config
    produce_lines(config, [orjson.dumps(e) for e in [click(1), ORDER]])
    port = free_port()
    worker = isolated.worker(METRICS_PORT=str(port)).start()
    isolated.wait_for("SELECT count() FROM {db}.attributed_orders FINAL", lambda n: n == 1)
    metrics = scrape_until(
        port, lambda m: m.value("attribution_orders_without_programs_total") >= 1)
    assert metrics.value("attribution_orders_without_programs_total") == 1
    assert metrics.value("attribution_reference_loaded", kind="programs") == 0
    worker.stop()
    log = worker.log_path.read_text()
    assert "no program is loaded" in log
    assert "orders decided while no program is loaded" in log
