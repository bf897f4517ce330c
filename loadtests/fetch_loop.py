"""What a bare Faust agent reads: the yardstick the worker's catch-up is compared with.

    python -m loadtests.fetch_loop [--records 200000] [--rounds 2]
    python -m loadtests.fetch_loop --topics T1,T2,... --records N   # an existing backlog

On the local stack: publishes `--records` small click-like records to a fresh 4-partition topic
(or reads the given topics from the beginning), then reads them all with a Faust app whose only
agent takes batches (`take_events(5000, 0.2)`) and does nothing else, in its own process, and
prints records/s per round and their median. The benchmark calls `bare_faust_read` on its own
backlog in the same run. The figure bounds what any Faust agent can read here.

The rate is timed from the first record's arrival in the stream to the last one's (Faust's
monitor stamps each message's `time_in`), over the records in between: neither the start-up and
rebalance before the first record nor `take_events`' wait of up to 0.2 s for more records after
the last one counts (with a backlog of batched records, a few thousand records read in a few
seconds, that wait was a good part of the time). Without the stamps it is timed from the end of
the first batch to the end of the last, over every batch's records but the first's. The child
also reports its own CPU time, so that a caller can tell the reader's load from the rest of the
machine's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deploy.stack import Stack
from schemas.config import Config
from streams import kafka_clients

REPO = Path(__file__).resolve().parent.parent
#: The longest a child may take, from start to its rate (start-up and rebalance ~5-10 s).
CHILD_TIMEOUT_SECONDS = 600.0

RECORD = (b'{"event_id":"e0000001","type":"click","ts":"2026-11-02T10:15:00Z","visitor_id":"v1234",'
          b'"session_id":"s1","affiliate_id":"aff001","channel":"facebook"}')


def kafka_config(bootstrap: str) -> Config:
    """The environment's Kafka settings (security included) with these bootstrap servers."""
    return Config(KAFKA_BOOTSTRAP=bootstrap)  # type: ignore[call-arg]


def publish(bootstrap: str, topic: str, records: int) -> None:
    from kafka.admin import NewTopic

    config = kafka_config(bootstrap)
    admin = kafka_clients.admin(config)
    try:
        admin.create_topics([NewTopic(topic, 4, 1)])
    finally:
        admin.close()

    async def send() -> None:
        producer = kafka_clients.aio_producer(config, linger_ms=20, max_batch_size=512 * 1024)
        await producer.start()
        try:
            for i in range(records):
                await producer.send(topic, RECORD, key=str(i).encode())
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(send())


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rate_line(records: int, seconds: float, cpu_seconds: float, timed_from: str) -> str:
    """What the child prints when done: `RATE <records/s> RECORDS <n> SECONDS <s> CPU <s> FROM <x>`."""
    return (f"RATE {records / seconds if seconds > 0 else float('nan'):.0f} RECORDS {records} "
            f"SECONDS {seconds:.3f} CPU {cpu_seconds:.2f} FROM {timed_from}")


def read_all(bootstrap: str, topics: list[str], records: int, app_id: str | None = None) -> None:
    """Runs in a child process: reads `records` records, prints `rate_line`, exits."""
    import tempfile

    import faust

    config = kafka_config(bootstrap)
    app = faust.App(
        app_id or f"fetch-loop-{uuid.uuid4().hex[:8]}", broker=kafka_clients.faust_broker(config),
        broker_credentials=kafka_clients.faust_credentials(config),
        store="memory://", datadir=tempfile.mkdtemp(prefix="fetch-loop-"),
        web_enabled=False, autodiscover=False, consumer_auto_offset_reset="earliest",
        broker_max_poll_records=500, stream_buffer_maxsize=10_000,
    )
    source = app.topic(*topics, key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw")
    seen = first_batch = 0
    started: float | None = None
    first_in: float | None = None

    @app.agent(source)
    async def count(stream):  # type: ignore[no-untyped-def]
        nonlocal seen, first_batch, started, first_in
        async for events in stream.take_events(5000, within=0.2):
            now = time.monotonic()
            seen += len(events)
            if started is None:
                started, first_batch = now, seen
                first_in = events[0].message.time_in
            if seen >= records:
                last_in = events[-1].message.time_in
                if first_in is not None and last_in is not None and last_in > first_in:
                    # `time_in` is time.monotonic() too (faust.sensors.Monitor).
                    line = rate_line(seen - 1, last_in - first_in, _cpu_seconds(), "time-in")
                else:
                    line = rate_line(seen - first_batch, now - started, _cpu_seconds(),
                                     "first-batch")
                print(line, flush=True)
                os._exit(0)

    worker = faust.Worker(app, loglevel="warning", quiet=True)
    worker.execute_from_commandline()


@dataclass(frozen=True)
class BareRead:
    """What one bare Faust agent read: `records_per_s` over `records` records in `seconds`
    (see the module for what is timed), and the CPU its process used from start to exit."""

    records_per_s: float
    records: int
    seconds: float
    cpu_s: float
    timed_from: str
    wall_s: float  # the child process, start-up and rebalance included


def parse_rate_line(output: str) -> tuple[float, int, float, float, str] | None:
    """(records/s, records, seconds, cpu seconds, timed from) of the child's last `rate_line` in
    `output`, or None when there is none. A bare `RATE <n>` line (an older child) has the rate
    only: the rest is 0 / unknown."""
    found = None
    for line in output.splitlines():
        if "RATE " not in line:
            continue
        words = line[line.rindex("RATE "):].split()
        fields = dict(zip(words[::2], words[1::2]))
        try:
            found = (float(fields["RATE"]), int(fields.get("RECORDS", 0)),
                     float(fields.get("SECONDS", 0.0)), float(fields.get("CPU", 0.0)),
                     fields.get("FROM", "unknown"))
        except (KeyError, ValueError):
            continue
    return found


def bare_faust_read(
    bootstrap: str, topics: list[str], records: int, app_id: str | None = None,
    timeout: float = CHILD_TIMEOUT_SECONDS,
) -> BareRead:
    """A bare Faust agent reading `records` records of `topics` from the start, in a child
    process (`app_id` names its consumer group and Faust's own topics; a fresh one by default).

    Raises RuntimeError when the child prints no rate (it failed, or found fewer records than
    `records` within `timeout`)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "loadtests.fetch_loop", "--child", "--bootstrap", bootstrap,
               "--topics", ",".join(topics), "--records", str(records)]
    if app_id:
        command += ["--app-id", app_id]
    started = time.monotonic()
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                             env=env)
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout or ""
        tail = (output.decode(errors="replace") if isinstance(output, bytes) else output)[-2000:]
        raise RuntimeError(f"the bare Faust reader did not read {records} records within "
                           f"{timeout:.0f} s; its output ends:\n{tail}") from exc
    wall = time.monotonic() - started
    parsed = parse_rate_line(out.stdout + "\n" + out.stderr)
    if parsed is None:
        raise RuntimeError(
            f"the reader printed no rate (exit {out.returncode}):\n{out.stdout[-2000:]}\n"
            f"{out.stderr[-2000:]}")
    rate, read, seconds, cpu, timed_from = parsed
    return BareRead(records_per_s=rate, records=read, seconds=seconds, cpu_s=cpu,
                    timed_from=timed_from, wall_s=round(wall, 2))


def bare_faust_rate(bootstrap: str, topics: list[str], records: int) -> float:
    """Records/s of a bare Faust agent reading `records` records of `topics` from the start."""
    return bare_faust_read(bootstrap, topics, records).records_per_s


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.fetch_loop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000, help="records in the topic")
    parser.add_argument("--rounds", type=int, default=2, help="reads per loop (alternating)")
    parser.add_argument("--topics", help="read these existing topics (comma-separated) instead")
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", "localhost:9092"),
                        help="Kafka bootstrap servers (default $KAFKA_BOOTSTRAP or localhost:9092)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--app-id", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bootstrap = args.bootstrap
    if args.child:
        read_all(bootstrap, args.topics.split(","), args.records, args.app_id)
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
    # Each round's Faust app (its group, and Faust's own `<app id>-__assignor-__leader` topic).
    app_ids = [f"fetch-loop-{uuid.uuid4().hex[:8]}" for _ in range(args.rounds)]
    try:
        for round_, app_id in enumerate(app_ids, 1):
            rate = bare_faust_read(bootstrap, topics, args.records, app_id=app_id).records_per_s
            rates.append(rate)
            print(f"round {round_}: bare Faust agent {rate:10,.0f} records/s", flush=True)
    finally:
        admin = kafka_clients.admin(kafka_config(bootstrap))
        try:
            mine = [topic for topic in admin.list_topics()
                    if topic == own_topic or any(topic.startswith(f"{app_id}-") for app_id in app_ids)]
            if mine:
                admin.delete_topics(mine)
            for app_id in app_ids:
                try:
                    admin.delete_groups([app_id])
                except Exception:  # a round that never joined has no group
                    pass
        finally:
            admin.close()
    print(f"median: bare Faust agent {statistics.median(rates):,.0f} records/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
