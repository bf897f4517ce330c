"""Load test of the tracking edge (issue 13): one `attribution edge` process, driven over HTTP.

    python -m loadtests.edge_load [--seconds 10] [--concurrency 32] [--no-restart] [--json FILE]

Under a fresh topic prefix:

1. **events** — `POST /v1/events`, batches of 100 clicks, as fast as `--concurrency` clients
   go: events/s answered 202 (every one acknowledged by Kafka, acks=all), then counted on Kafka;
2. **events latency** — the same at half that rate, and at half the target (10,000 events/s),
   sent on a fixed schedule (open loop): p50, p99 of the request;
3. **redirects** — `GET /r/{link_id}` as fast as the clients go, then p50/p99 at half that rate
   and at half the target (1,000/s);
4. **broker restart** — a second edge takes events at a steady rate while the broker is killed -9 and started again:
   every event answered 202 must be on Kafka (at least once; copies, from a replay of events
   whose acknowledgement was lost, are counted: the pipeline deduplicates by event_id).

The load client shares the machine with the edge (and the broker): the numbers are of both.
Everything runs on a broker of the run's own (free ports, the local stack's jars linked, under a
temporary directory removed afterwards): the shared broker is never loaded, stopped or killed.
It prints a JSON document (also written to --json FILE).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from deploy.stack import Stack, private_broker
from deploy.processes import free_port
from schemas.config import Config
from schemas.reference import Affiliate, Link, Settings

REPO = Path(__file__).resolve().parent.parent
EVENTS_PER_REQUEST = 100
#: The issue's targets (events/s, redirects/s): latency is also measured at half of each.
EVENTS_TARGET = 20_000
REDIRECTS_TARGET = 2_000
LINK_ID = "load"
AFFILIATE = "load-affiliate"
#: The edge's rate limits, lifted: one client address sends everything here.
UNLIMITED = {"EDGE_RATE_PER_IP": "1000000", "EDGE_BURST_PER_IP": "1000000",
             "EDGE_RATE_PER_LINK": "1000000", "EDGE_BURST_PER_LINK": "1000000"}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Edge:
    """An `attribution edge` child process."""

    env: dict[str, str]
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "attribution.cli", "edge", "--host", "127.0.0.1",
             "--loglevel", "warning"],
            env=self.env, cwd=REPO, stdout=log.open("ab"), stderr=subprocess.STDOUT)

    async def ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.process is not None and self.process.poll() is None, "the edge exited"
                try:
                    async with session.get(f"{self.url}/readyz") as answer:
                        if answer.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError("the edge did not become ready")

    def stop(self) -> None:
        """SIGTERM: the edge drains its delivery and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def edge_env(bootstrap: str, prefix: str, workdir: Path) -> dict[str, str]:
    return dict(
        os.environ, KAFKA_BOOTSTRAP=bootstrap, TOPIC_PREFIX=prefix, EDGE_PORT=str(free_port()),
        PII_KEY="load-test-pii-key-0123456789", EDGE_SECRET="load-test-edge-secret-0123456789",
        EDGE_SPOOL_DIR=str(workdir / "spool"), METRICS_PORT="0",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        **UNLIMITED)


def prepare(env: dict[str, str]) -> Config:
    """Topics and reference data (one affiliate, one tracking link) under the prefix."""
    from streams.publish import publish_reference
    from streams.topics import ensure_topics

    settings: dict[str, Any] = {name: env[name] for name in ("KAFKA_BOOTSTRAP", "TOPIC_PREFIX")}
    config = Config(**settings)
    ensure_topics(config)
    for _ in range(10):  # a fresh broker elects the new topics' leaders a moment later
        sent = publish_reference(
            config, [], [Affiliate(AFFILIATE, "load-program")],
            Settings(links=(Link(LINK_ID, AFFILIATE, "https://shop.example/landing", "email"),),
                     allowed_redirect_hosts=("shop.example",), allowed_origins=("shop.example",)))
        if not sent["unacknowledged"]:
            break
        time.sleep(1)
    assert not sent["unacknowledged"], sent
    return config


class Bodies:
    """Request bodies of 100 clicks each, every event with an event_id of its own; made ahead
    (`prepare`) so that the load client spends its CPU on requests, not on JSON."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.sequence = 0
        self.ready: list[tuple[bytes, list[str]]] = []

    def prepare(self, count: int) -> "Bodies":
        self.ready += [self.make() for _ in range(count)]
        self.ready.reverse()
        return self

    def next(self) -> tuple[bytes, list[str]]:
        return self.ready.pop() if self.ready else self.make()

    def make(self) -> tuple[bytes, list[str]]:
        ids = []
        parts = []
        for _ in range(EVENTS_PER_REQUEST):
            self.sequence += 1
            event_id = f"{self.tag}-{self.sequence}"
            ids.append(event_id)
            visitor = self.sequence % 50_000
            parts.append(
                b'{"type":"click","event_id":"%s","visitor_id":"v%d","session_id":"s%d",'
                b'"affiliate_id":"%s","channel":"email"}'
                % (event_id.encode(), visitor, visitor, AFFILIATE.encode()))
        return b"[" + b",".join(parts) + b"]", ids


@dataclass
class Outcome:
    requests: int = 0
    accepted_events: int = 0
    failed: int = 0
    statuses: dict[int, int] | None = None
    latencies: list[float] | None = None
    accepted_ids: list[str] | None = None

    def count(self, status: int) -> None:
        self.statuses = self.statuses or {}
        self.statuses[status] = self.statuses.get(status, 0) + 1


async def post_events(session: aiohttp.ClientSession, url: str, bodies: Bodies,
                      outcome: Outcome, keep_ids: bool) -> None:
    body, ids = bodies.next()
    started = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/events", data=body,
                                headers={"Content-Type": "application/json"}) as answer:
            payload = await answer.read()
            status = answer.status
    except aiohttp.ClientError:
        outcome.failed += 1
        return
    assert outcome.latencies is not None
    outcome.latencies.append(time.perf_counter() - started)
    outcome.requests += 1
    outcome.count(status)
    if status == 202:
        accepted = orjson.loads(payload)
        assert not accepted["rejected"], accepted
        outcome.accepted_events += accepted["accepted"]
        if keep_ids:
            assert outcome.accepted_ids is not None
            outcome.accepted_ids += ids


async def get_redirect(session: aiohttp.ClientSession, url: str, outcome: Outcome) -> None:
    started = time.perf_counter()
    try:
        async with session.get(f"{url}/r/{LINK_ID}", allow_redirects=False) as answer:
            await answer.read()
            status = answer.status
    except aiohttp.ClientError:
        outcome.failed += 1
        return
    assert outcome.latencies is not None
    outcome.latencies.append(time.perf_counter() - started)
    outcome.requests += 1
    outcome.count(status)


async def closed_loop(url: str, seconds: float, concurrency: int, kind: str,
                      bodies: Bodies | None = None) -> tuple[Outcome, float]:
    """As fast as `concurrency` clients go; the outcome and the wall time."""
    outcome = Outcome(latencies=[], accepted_ids=[])
    deadline = time.monotonic() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            if kind == "events":
                assert bodies is not None
                await post_events(session, url, bodies, outcome, keep_ids=False)
            else:
                await get_redirect(session, url, outcome)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        return outcome, time.monotonic() - started


async def open_loop(url: str, seconds: float, per_second: float, kind: str,
                    bodies: Bodies | None = None, keep_ids: bool = False,
                    during: Any = None) -> Outcome:
    """Requests started on a fixed schedule, whatever the answers take (latency is honest)."""
    outcome = Outcome(latencies=[], accepted_ids=[])
    interval = 1.0 / per_second
    tasks: set[asyncio.Task[None]] = set()
    # Enough connections for the answers in flight; a new connection per request would cost the
    # client more CPU than the request.
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as session:
        side = asyncio.create_task(during()) if during is not None else None
        started = time.monotonic()
        n = 0
        while (now := time.monotonic()) < started + seconds:
            due = started + n * interval
            if due > now:
                await asyncio.sleep(due - now)
            if kind == "events":
                assert bodies is not None
                task = asyncio.create_task(post_events(session, url, bodies, outcome, keep_ids))
            else:
                task = asyncio.create_task(get_redirect(session, url, outcome))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        await asyncio.gather(*tasks)
        if side is not None:
            await side
    return outcome


async def server_histogram(url: str, route: str) -> dict[float, float]:
    """The edge's own request-time histogram of `route`: upper bound → cumulative count."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/metrics") as answer:
            text = await answer.text()
    buckets: dict[float, float] = {}
    prefix = "attribution_edge_request_seconds_bucket{"
    for line in text.splitlines():
        if line.startswith(prefix) and f'route="{route}"' in line:
            labels, value = line[len(prefix):].rsplit("} ", 1)
            bound = labels.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(bound)] = float(value)
    return buckets


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The q-quantile's bucket upper bound (ms) of what was observed between two scrapes."""
    counts = {bound: after[bound] - before.get(bound, 0.0) for bound in sorted(after)}
    total = counts.get(float("inf"), 0.0)
    for bound, cumulative in counts.items():
        if total and cumulative >= q * total:
            return bound * 1000
    return float("nan")


async def timed_on_server(url: str, route: str, phase: Any) -> tuple[Any, float, float]:
    """Run a phase; its result and the edge's own p50 and p99 bucket bounds for `route` (ms)."""
    before = await server_histogram(url, route)
    result = await phase
    after = await server_histogram(url, route)
    return (result, histogram_quantile(before, after, 0.5),
            histogram_quantile(before, after, 0.99))


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def events_on_kafka(config: Config, expected: int, timeout: float = 120.0) -> dict[str, int]:
    """Every click on the prefix's topic: event_id → how many times it is there."""
    from kafka import KafkaConsumer, TopicPartition

    from streams import kafka_clients

    consumer: KafkaConsumer = kafka_clients.consumer(config, enable_auto_commit=False,
                                                     fetch_max_bytes=32 * 1024 * 1024)
    topic = config.topic("clicks")
    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    end = consumer.end_offsets(partitions)
    seen: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if all(consumer.position(tp) >= end[tp] for tp in partitions):
                if len(seen) >= expected:
                    break
                end = consumer.end_offsets(partitions)
                if all(consumer.position(tp) >= end[tp] for tp in partitions):
                    time.sleep(0.5)
            for records in consumer.poll(timeout_ms=500, max_records=5000).values():
                for record in records:
                    for element in orjson.loads(record.value):
                        seen[element["event_id"]] = seen.get(element["event_id"], 0) + 1
    finally:
        consumer.close()
    return seen


def run(seconds: float, concurrency: int, restart: bool) -> dict[str, Any]:
    stack = Stack()
    if not stack.kafka.libs_dir.is_dir():
        raise SystemExit("no Kafka jars yet: `attribution stack up` fetches them")
    tag = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix=f"edge-load-{tag}-"))
    try:
        with private_broker(stack, workdir / "broker") as broker:
            return measure(broker, workdir, tag, seconds, concurrency, restart)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def measure(broker: Stack, workdir: Path, tag: str, seconds: float, concurrency: int,
            restart: bool) -> dict[str, Any]:
    results: dict[str, Any] = {"tag": tag, "cpus": os.cpu_count(), "seconds": seconds,
                               "concurrency": concurrency}
    env = edge_env(broker.kafka_bootstrap, f"edgeload{tag}.", workdir)
    config = prepare(env)
    edge = Edge(env, int(env["EDGE_PORT"]))
    edge.start(workdir / "edge.log")
    try:
        asyncio.run(edge.ready())
        assert edge.process is not None
        pid = edge.process.pid
        bodies = Bodies(f"{tag}-e").prepare(int(seconds * 600))
        cpu = process_cpu_seconds(pid)
        (outcome, wall), p50, p99 = asyncio.run(timed_on_server(
            edge.url, "/v1/events", closed_loop(edge.url, seconds, concurrency, "events", bodies)))
        rate = outcome.accepted_events / wall
        results["events"] = {
            "events_per_second": round(rate), "requests": outcome.requests,
            "statuses": outcome.statuses, "failed": outcome.failed,
            "edge_cpu_share": round((process_cpu_seconds(pid) - cpu) / wall, 2),
            "client_p99_ms": round(percentile(outcome.latencies or [], 0.99) * 1000, 1),
            "edge_p50_ms_bucket": p50, "edge_p99_ms_bucket": p99}
        bodies.prepare(int(seconds * rate / 2 / EVENTS_PER_REQUEST) + 10)
        cpu = process_cpu_seconds(pid)
        half, p50, p99 = asyncio.run(timed_on_server(edge.url, "/v1/events", open_loop(
            edge.url, seconds, rate / 2 / EVENTS_PER_REQUEST, "events", bodies)))
        results["events_half_rate"] = {
            "events_per_second": round(half.accepted_events / seconds),
            "requests": half.requests, "statuses": half.statuses,
            "edge_cpu_share": round((process_cpu_seconds(pid) - cpu) / seconds, 2),
            "client_p50_ms": round(percentile(half.latencies or [], 0.5) * 1000, 1),
            "client_p99_ms": round(percentile(half.latencies or [], 0.99) * 1000, 1),
            "edge_p50_ms_bucket": p50, "edge_p99_ms_bucket": p99}
        bodies.prepare(int(seconds * EVENTS_TARGET / 2 / EVENTS_PER_REQUEST) + 10)
        target, p50, p99 = asyncio.run(timed_on_server(edge.url, "/v1/events", open_loop(
            edge.url, seconds, EVENTS_TARGET / 2 / EVENTS_PER_REQUEST, "events", bodies)))
        results["events_half_target"] = {
            "events_per_second": round(target.accepted_events / seconds),
            "statuses": target.statuses,
            "client_p50_ms": round(percentile(target.latencies or [], 0.5) * 1000, 1),
            "client_p99_ms": round(percentile(target.latencies or [], 0.99) * 1000, 1),
            "edge_p50_ms_bucket": p50, "edge_p99_ms_bucket": p99}
        accepted = outcome.accepted_events + half.accepted_events + target.accepted_events
        on_kafka = events_on_kafka(config, accepted)
        results["events"]["on_kafka_of_all_phases"] = len(on_kafka)
        results["events"]["accepted_in_all_phases"] = accepted

        route = "/r/{link_id}"
        cpu = process_cpu_seconds(pid)
        (outcome, wall), p50, p99 = asyncio.run(timed_on_server(
            edge.url, route, closed_loop(edge.url, seconds, concurrency, "redirects")))
        redirects = outcome.statuses.get(302, 0) if outcome.statuses else 0
        rate = redirects / wall
        results["redirects"] = {
            "per_second": round(rate), "statuses": outcome.statuses,
            "edge_cpu_share": round((process_cpu_seconds(pid) - cpu) / wall, 2),
            "client_p99_ms": round(percentile(outcome.latencies or [], 0.99) * 1000, 1),
            "edge_p50_ms_bucket": p50, "edge_p99_ms_bucket": p99}
        cpu = process_cpu_seconds(pid)
        half, p50, p99 = asyncio.run(timed_on_server(
            edge.url, route, open_loop(edge.url, seconds, rate / 2, "redirects")))
        results["redirects_half_rate"] = {
            "per_second": round((half.statuses or {}).get(302, 0) / seconds),
            "statuses": half.statuses,
            "edge_cpu_share": round((process_cpu_seconds(pid) - cpu) / seconds, 2),
            "client_p50_ms": round(percentile(half.latencies or [], 0.5) * 1000, 1),
            "client_p99_ms": round(percentile(half.latencies or [], 0.99) * 1000, 1),
            "edge_p50_ms_bucket": p50, "edge_p99_ms_bucket": p99}
        half, p50, p99 = asyncio.run(timed_on_server(
            edge.url, route, open_loop(edge.url, seconds, REDIRECTS_TARGET / 2, "redirects")))
        results["redirects_half_target"] = {
            "per_second": round((half.statuses or {}).get(302, 0) / seconds),
            "statuses": half.statuses,
            "client_p50_ms": round(percentile(half.latencies or [], 0.5) * 1000, 1),
            "client_p99_ms": round(percentile(half.latencies or [], 0.99) * 1000, 1),
            "edge_p50_ms_bucket": p50, "edge_p99_ms_bucket": p99}
    finally:
        edge.stop()
    if restart:
        results["broker_restart"] = broker_restart(broker, workdir, tag)
    return results


def broker_restart(broker: Stack, workdir: Path, tag: str, rate: float = 5_000,
                   seconds: float = 40.0) -> dict[str, Any]:
    """Events at `rate`/s for `seconds` while the edge's broker is killed -9 at 5 s and started
    again 10 s later; then every event answered 202 is looked for on Kafka."""
    env = edge_env(broker.kafka_bootstrap, f"edgerestart{tag}.", workdir / "restart")
    config = prepare(env)
    edge = Edge(env, int(env["EDGE_PORT"]))
    edge.start(workdir / "edge-restart.log")
    timeline: dict[str, float] = {}

    async def outage() -> None:
        started = time.monotonic()
        await asyncio.sleep(5)
        await asyncio.to_thread(broker.kill_kafka)
        timeline["killed_at_s"] = round(time.monotonic() - started, 1)
        await asyncio.sleep(10)
        await asyncio.to_thread(broker.start_kafka, lambda line: None)
        timeline["back_at_s"] = round(time.monotonic() - started, 1)

    try:
        asyncio.run(edge.ready())
        bodies = Bodies(f"{tag}-r").prepare(int(seconds * rate / EVENTS_PER_REQUEST) + 10)
        outcome = asyncio.run(open_loop(edge.url, seconds, rate / EVENTS_PER_REQUEST,
                                        "events", bodies, keep_ids=True, during=outage))
    finally:
        edge.stop()  # SIGTERM: drains the spool into the broker
    accepted = outcome.accepted_ids or []
    seen = events_on_kafka(config, len(accepted))
    missing = [event_id for event_id in accepted if event_id not in seen]
    return {
        "rate": rate, "seconds": seconds, **timeline, "statuses": outcome.statuses,
        "failed": outcome.failed, "accepted": len(accepted), "missing_on_kafka": len(missing),
        "copies_on_kafka": sum(count - 1 for count in seen.values()),
        "p99_ms": round(percentile(outcome.latencies or [], 0.99) * 1000, 1),
        "max_ms": round(max(outcome.latencies or [0.0]) * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-restart", action="store_true",
                        help="skip the broker restart (it starts a broker of its own)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = run(args.seconds, args.concurrency, not args.no_restart)
    text = orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
    print(text)
    if args.json is not None:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
