"""What a bare Faust agent reads: the yardstick the worker's catch-up is compared with.

    python -m loadtests.fetch_loop [--records 200000] [--rounds 2]
    python -m loadtests.fetch_loop --topics T1,T2,... --records N   # an existing backlog

On the local stack: publishes `--records` small click-like records to a fresh 4-partition topic
(or reads the given topics from the beginning), then reads them all with a Faust app whose only
agent takes batches (`take_events(5000, 0.2)`) and does nothing else, in its own process, and
prints records/s per round and their median. The benchmark calls `bare_faust_rate` on its own
backlog in the same run. The figure bounds what any Faust agent can read here.
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


def read_all(bootstrap: str, topics: list[str], records: int) -> None:
    """Runs in a child process: reads `records` records, prints 'RATE <records/s>', exits."""
    import tempfile

    import faust

    app = faust.App(
        f"fetch-loop-{uuid.uuid4().hex[:8]}", broker=f"kafka://{bootstrap}", store="memory://",
        datadir=tempfile.mkdtemp(prefix="fetch-loop-"),
        web_enabled=False, autodiscover=False, consumer_auto_offset_reset="earliest",
        broker_max_poll_records=500, stream_buffer_maxsize=10_000,
    )
    source = app.topic(*topics, key_type=bytes, value_type=bytes, key_serializer="raw",
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

    worker = faust.Worker(app, loglevel="warning", quiet=True)
    worker.execute_from_commandline()


def bare_faust_rate(bootstrap: str, topics: list[str], records: int) -> float:
    """Records/s of a bare Faust agent reading `records` records of `topics` from the start."""
    out = subprocess.run(
        [sys.executable, "-m", "loadtests.fetch_loop", "--child",
         "--topics", ",".join(topics), "--records", str(records)],
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
    parser.add_argument("--topics", help="read these existing topics (comma-separated) instead")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP", "localhost:9092")
    if args.child:
        read_all(bootstrap, args.topics.split(","), args.records)
        return 0

    Stack().up(progress=lambda line: None)
    own_topic = None
    if args.topics:
        topics = args.topics.split(",")
    else:
        own_topic = f"fetch-loop-{uuid.uuid4().hex[:8]}"
        topics = [own_topic]
        print(f"publishing {args.records:,} records to {own_topic} ...", flush=True)
        publish(bootstrap, own_topic, args.records)
    rates: list[float] = []
    try:
        for round_ in range(1, args.rounds + 1):
            rate = bare_faust_rate(bootstrap, topics, args.records)
            rates.append(rate)
            print(f"round {round_}: bare Faust agent {rate:10,.0f} records/s", flush=True)
    finally:
        if own_topic is not None:
            from kafka.admin import KafkaAdminClient

            admin = KafkaAdminClient(bootstrap_servers=bootstrap)
            try:
                admin.delete_topics([own_topic])
            finally:
                admin.close()
    print(f"median: bare Faust agent {statistics.median(rates):,.0f} records/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
