"""What Faust's per-record machinery costs: a bare agent with Faust's fetch loop and with ours.

    python -m loadtests.fetch_loop [--records 200000] [--rounds 2]

On the local stack: publishes `--records` small click-like records to a fresh 4-partition topic,
then, alternately, reads them all with a Faust app whose only agent takes batches
(`take_events(5000, 0.2)`) and does nothing else — once with Faust's own fetch loop and once
with `streams.fastpath` — each in its own process. Prints records/s per round and the ratio of
the medians; deletes the topic afterwards. The figures bound what any Faust agent can read here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence

from deploy.stack import Stack

RECORD = (b'{"event_id":"e0000001","type":"click","ts":"2026-11-02T10:15:00Z","visitor_id":"v1234",'
          b'"session_id":"s1","affiliate_id":"aff001","channel":"facebook"}')


def publish(bootstrap: str, topic: str, records: int) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, 4, 1)])
    finally:
        admin.close()

    async def send() -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20,
                                    max_batch_size=512 * 1024)
        await producer.start()
        try:
            for i in range(records):
                await producer.send(topic, RECORD, key=str(i).encode())
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(send())


def read_all(bootstrap: str, topic: str, records: int, fast: bool) -> None:
    """Runs in a child process: reads `records` records, prints 'RATE <records/s>', exits."""
    import tempfile

    import faust

    from streams import fastpath

    app = faust.App(
        f"fetch-loop-{uuid.uuid4().hex[:8]}", broker=f"kafka://{bootstrap}", store="memory://",
        datadir=tempfile.mkdtemp(prefix="fetch-loop-"),
        web_enabled=False, autodiscover=False, consumer_auto_offset_reset="earliest",
        broker_max_poll_records=500, stream_buffer_maxsize=10_000,
    )
    source = app.topic(topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw")
    seen = 0
    started: float | None = None

    @app.agent(source)
    async def count(stream):  # type: ignore[no-untyped-def]
        nonlocal seen, started
        async for events in stream.take_events(5000, within=0.2):
            started = started or time.monotonic()
            seen += len(events)
            if seen >= records:
                print(f"RATE {seen / (time.monotonic() - started):.0f}", flush=True)
                os._exit(0)

    if fast:
        fastpath.install(app.consumer)
    worker = faust.Worker(app, loglevel="warning", quiet=True)
    worker.execute_from_commandline()


def one_round(bootstrap: str, topic: str, records: int, fast: bool) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "loadtests.fetch_loop", "--child", "fast" if fast else "faust",
         "--topic", topic, "--records", str(records)],
        capture_output=True, text=True, timeout=600,
    )
    for line in (out.stdout + out.stderr).splitlines():
        if "RATE " in line:
            return float(line.rsplit("RATE ", 1)[1].split()[0])
    raise RuntimeError(f"the reader printed no rate:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.fetch_loop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000, help="records in the topic")
    parser.add_argument("--rounds", type=int, default=2, help="reads per loop (alternating)")
    parser.add_argument("--child", choices=["faust", "fast"], help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP", "localhost:9092")
    if args.child:
        read_all(bootstrap, args.topic, args.records, args.child == "fast")
        return 0

    Stack().up(progress=lambda line: None)
    topic = f"fetch-loop-{uuid.uuid4().hex[:8]}"
    print(f"publishing {args.records:,} records to {topic} ...", flush=True)
    publish(bootstrap, topic, args.records)
    rates: dict[str, list[float]] = {"faust": [], "fast": []}
    try:
        for round_ in range(1, args.rounds + 1):
            for name in ("faust", "fast"):
                rate = one_round(bootstrap, topic, args.records, name == "fast")
                rates[name].append(rate)
                print(f"round {round_}: {name:5s} fetch loop {rate:10,.0f} records/s", flush=True)
    finally:
        from kafka.admin import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            admin.delete_topics([topic])
        finally:
            admin.close()
    faust_rate, fast_rate = (statistics.median(rates[n]) for n in ("faust", "fast"))
    print(f"median: Faust's loop {faust_rate:,.0f}/s, streams.fastpath {fast_rate:,.0f}/s,"
          f" ratio {fast_rate / faust_rate:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
