"""Prometheus metrics of a worker (telemetry is an output too, so it lives with the sinks).

One registry-wide set of collectors, created once at import. `serve(port)` exposes `/metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram, start_http_server

#: Latency buckets (seconds) from 5 ms to 5 min: the p99 target is 2 s, a catch-up is minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


@dataclass(frozen=True)
class Metrics:
    events_consumed: Counter
    events_valid: Counter
    events_invalid: Counter
    events_duplicate: Counter
    dead_letters: Counter
    orders_attributed: Counter
    abuse_flags: Counter
    reviews: Counter
    facts_written: Counter
    clickhouse_insert_rows: Counter
    clickhouse_insert_batches: Counter
    clickhouse_insert_errors: Counter
    clickhouse_insert_seconds: Histogram
    end_to_end_latency: Histogram
    consumer_lag: Gauge
    orders_waiting_for_clicks: Gauge
    batches_dropped: Counter
    batch_phase_seconds: Histogram
    coded_orders_waiting: Gauge
    reference_loaded: Gauge
    orders_without_programs: Counter
    kafka_retries: Counter


def _build() -> Metrics:
    return Metrics(
        events_consumed=Counter(
            "attribution_events_consumed", "Input events read from Kafka", ["topic"]
        ),
        events_valid=Counter("attribution_events_valid", "Input events that validated", ["topic"]),
        events_invalid=Counter(
            "attribution_events_invalid", "Input events rejected to dead-letters", ["topic", "reason"]
        ),
        events_duplicate=Counter(
            "attribution_events_duplicate", "Events skipped as repeats of an earlier id", ["topic"]
        ),
        dead_letters=Counter("attribution_dead_letters", "Messages published to dead-letters"),
        orders_attributed=Counter(
            "attribution_orders_attributed", "Orders written, by attribution method", ["method"]
        ),
        abuse_flags=Counter("attribution_abuse_flags", "Abuse flags raised", ["reason"]),
        reviews=Counter(
            "attribution_reviews", "Reviewer decisions applied, by outcome", ["outcome"]
        ),
        facts_written=Counter("attribution_facts_written", "Ledger facts written", ["kind"]),
        clickhouse_insert_rows=Counter(
            "attribution_clickhouse_insert_rows", "Rows inserted into ClickHouse", ["table"]
        ),
        clickhouse_insert_batches=Counter(
            "attribution_clickhouse_insert_batches", "Successful ClickHouse inserts", ["table"]
        ),
        clickhouse_insert_errors=Counter(
            "attribution_clickhouse_insert_errors", "Failed ClickHouse insert attempts", ["table"]
        ),
        clickhouse_insert_seconds=Histogram(
            "attribution_clickhouse_insert_duration_seconds",
            "Duration of one successful ClickHouse insert",
            ["table"],
            buckets=LATENCY_BUCKETS,
        ),
        end_to_end_latency=Histogram(
            "attribution_end_to_end_latency_seconds",
            "From the Kafka record time of an input event to its row written in ClickHouse",
            ["table"],
            buckets=LATENCY_BUCKETS,
        ),
        consumer_lag=Gauge(
            "attribution_consumer_lag", "Messages behind the high watermark", ["topic", "partition"]
        ),
        orders_waiting_for_clicks=Gauge(
            "attribution_orders_waiting_for_clicks",
            "Orders held back until every earlier click has been read",
        ),
        batches_dropped=Counter(
            "attribution_batches_dropped",
            "Batches dropped without effects because a rebalance or shutdown began while they"
            " were in flight (the partitions' owner reads them again)",
            ["agent"],
        ),
        batch_phase_seconds=Histogram(
            "attribution_batch_phase_seconds",
            "Time one batch spends in each phase of the commit path: decide, effects (ClickHouse"
            " rows and records to Kafka, together), changelog, commit",
            ["phase"],
            buckets=LATENCY_BUCKETS,
        ),
        coded_orders_waiting=Gauge(
            "attribution_coded_orders_waiting",
            "Orders with a discount code waiting for every orders partition's progress (velocity)",
        ),
        reference_loaded=Gauge(
            "attribution_reference_loaded",
            "Reference records this worker holds: programs, affiliates, settings (0 or 1)",
            ["kind"],
        ),
        kafka_retries=Counter(
            "attribution_kafka_retries",
            "Sends, offset reads and commits the broker could not serve, tried again (an outage)",
        ),
        orders_without_programs=Counter(
            "attribution_orders_without_programs",
            "Orders decided while no program was loaded (every one of them is unattributed)",
        ),
    )


METRICS = _build()


def serve(port: int) -> None:
    """Expose `/metrics` on `port` (0 disables)."""
    if port:
        start_http_server(port)
