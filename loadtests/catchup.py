"""Quick measurement on the local stack: catch-up throughput and order->fact delay.

    python -m loadtests.catchup --visitors 40000 --probes 10

Publishes a generated backlog under a fresh topic prefix and database, starts one worker, times
until every order is in ClickHouse (events/s), then, with the worker idle, publishes single
click+order pairs and times until each order's accrual fact is readable (order->fact delay).
Not the full benchmark of the operations issue: no baseline consumer, no fixed-rate load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone

import orjson

from deploy.stack import Stack
from loadtests.generator import TrafficProfile, generate, sample_reference
from schemas.config import Config
from schemas.validation import parse_reference_document
from sinks.clickhouse import connect
from sinks.migrate import migrate_server
from streams.publish import make_producer, produce_lines, publish_reference
from streams.topics import ensure_topics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visitors", type=int, default=40_000)
    parser.add_argument("--probes", type=int, default=10)
    args = parser.parse_args()

    stack = Stack()
    stack.up(progress=lambda line: None)
    tag = uuid.uuid4().hex[:8]
    env = dict(os.environ, TOPIC_PREFIX=f"bench{tag}.", METRICS_PORT="0",
               CLICKHOUSE_URL=f"clickhouse://default@{stack.clickhouse_address}/bench_{tag}",
               ATTRIBUTION_STATE_DIR=str(stack.root / "bench-state" / tag))
    os.environ.update(env)
    config = Config.from_env()
    migrate_server(config.clickhouse)
    ensure_topics(config)
    reference = sample_reference()
    publish_reference(config, *parse_reference_document(orjson.dumps(reference)))
    events = [orjson.dumps(e) for e in generate(reference, TrafficProfile(visitors=args.visitors))]
    orders = len({orjson.loads(e)["order_id"] for e in events if b'"type":"order"' in e})
    produce_lines(config, events)
    print(f"backlog: {len(events)} events, {orders} orders")

    client = connect(config.clickhouse)
    db = config.clickhouse.database
    log = (stack.root / f"bench-{tag}.log").open("ab")
    worker = subprocess.Popen([sys.executable, "-m", "attribution", "worker", "--loglevel", "warn"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        first_row = None
        while client.execute(f"SELECT count() FROM {db}.attributed_orders FINAL")[0][0] < orders:
            if first_row is None and client.execute(f"SELECT count() FROM {db}.clicks")[0][0]:
                first_row = time.monotonic()
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        busy = elapsed - ((first_row or started) - started)
        print(f"catch-up: {elapsed:.1f} s from worker start ({len(events) / elapsed:,.0f} events/s); "
              f"{busy:.1f} s from the first row ({len(events) / busy:,.0f} events/s)")

        producer = make_producer(config)
        delays = []
        for n in range(args.probes):
            now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            visitor, order_id = f"probe-{tag}-{n}", f"probe-{tag}-{n}"
            producer.send(config.topic("clicks"), key=visitor.encode(), value=orjson.dumps({
                "event_id": f"pc-{n}", "type": "click", "ts": now, "visitor_id": visitor,
                "session_id": "s", "affiliate_id": "aff-001", "channel": "blog"}))
            producer.flush()
            sent = time.monotonic()
            producer.send(config.topic("orders"), key=visitor.encode(), value=orjson.dumps({
                "event_id": f"po-{n}", "type": "order", "ts": now, "order_id": order_id,
                "visitor_id": visitor, "customer_id": "c", "currency": "EUR", "total": "10.00"}))
            producer.flush()
            while not client.execute(
                f"SELECT count() FROM {db}.commission_facts WHERE fact_id = '{order_id}:accrual'"
            )[0][0]:
                time.sleep(0.02)
            delays.append(time.monotonic() - sent)
            time.sleep(0.5)
        producer.close()
        delays.sort()
        print(f"order->fact delay over {len(delays)} probes: median {statistics.median(delays):.2f} s, "
              f"max {delays[-1]:.2f} s")
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        client.execute(f"DROP DATABASE IF EXISTS {db}")
        client.disconnect()


if __name__ == "__main__":
    main()
