"""The benchmark of the operations issue: what one worker does on one machine, next to a baseline.

    python -m loadtests.benchmark [--events 300000] [--workers 1] [--json FILE] [--keep]
        [--shape interleaved|topic-by-topic|orders-first|hot-partition] [--order-share SHARE]
        [--batch N]

One run, on the local stack (`attribution stack up`), under a fresh topic prefix and database:

1. **catch-up** — a generated backlog of at least `--events` events (about `--order-share` of
   them orders, when given), in the order or partitioning of `--shape` (`loadtests.generator.
   arrange`: interleaved as a live shop sends it by default), is published (with `--batch N` as
   batched records, JSON arrays of up to N events, `streams.publish.produce_lines(batch=N)`;
   one event per record by default), then one worker
   (`attribution worker`, a subprocess) turns it into ClickHouse rows: events/s from the worker's
   start, and from its first row, until every valid click, share and order is in its table
   (counted with FINAL, against the distinct valid ids that were published);
2. **baseline** — a plain consumer (aiokafka, no group) reads the same backlog from the 4 input
   topics and decodes every record with the project's decoder (`decode_record`, as the worker
   does: an array element by element): events/s, and the pipeline's share of it (it runs before
   the worker starts, so the two never share the machine);
3. **bare Faust agent** — with the worker caught up (and idle), a Faust app whose only agent
   takes batches and does nothing else (`loadtests.fetch_loop.bare_faust_read`, a child process)
   reads the same backlog's records from the 4 input topics: records/s, the events/s they carry
   (records/s x events per record: the agent decodes nothing), and the pipeline's share of it.
   The agent reads records, so with `--batch` its records/s and events/s differ; the share is
   the same in both units (events per record is the backlog's, for both);
4. **latency** — with the worker caught up, a fresh stream is published at half the catch-up rate
   for about a minute (with `--batch N`, as batched records of up to min(N, 20) events: the
   publisher sends every group as soon as one is full, and an order's time is when it was handed
   to the publisher, so the batching delay counts); order -> `attributed_orders` row (every order
   has one) and order -> accrual fact (attributed orders), p50/p95/p99, seen by polling
   ClickHouse every 100 ms (`inserted_at` has whole seconds only);
5. **memory** — the worker's peak resident set (VmHWM).

With `--workers N`, N workers in one consumer group (each its own process, state directory and
log) do the catch-up and the latency phase together; memory is then the largest one worker's.

It prints a table and a JSON document (also written to --json FILE) with the machine, the commit
the worker ran and what else loaded the machine meanwhile. It never stops the stack; at
the end it stops its worker, drops its database and deletes its topics and worker state, unless
--keep. The worker's log stays under `.stack/bench/<tag>/`.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import importlib.metadata
import logging
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from deploy.stack import Stack
from loadtests.generator import (
    DEFAULT_PARTITIONS,
    SHAPES,
    TrafficProfile,
    arrange,
    generate,
    pace,
    plan_profile,
    sample_reference,
)
from loadtests.host import host_facts
from schemas.config import INPUT_TOPICS, Config
from schemas.events import TOPIC_OF_TYPE, Order
from schemas.validation import (
    MAX_BATCH_ELEMENTS,
    InvalidEvent,
    decode_event,
    decode_record,
    encode_json,
    parse_reference_document,
)

REPO = Path(__file__).resolve().parent.parent
#: What the worker subprocess runs: the code a result belongs to.
PIPELINE_PACKAGES = ("attribution", "schemas", "sinks", "streams")
TYPE_OF_TOPIC = {topic: kind for kind, topic in TOPIC_OF_TYPE.items()}
#: The tables the catch-up waits on (`ExpectedRows.of_table` says how many rows each must hold).
CATCH_UP_TABLES = ("clicks", "shares", "attributed_orders")

#: The backlog's day; the latency stream is the next day, so the two never share a timestamp.
BACKLOG_START = datetime(2026, 11, 2, tzinfo=timezone.utc)
#: Head-room over `--events` when sizing the backlog (the planned size is approximate).
BACKLOG_HEAD_ROOM = 1.02
#: The steady-state input rate, as a share of the measured catch-up rate (the issue asks 50 %).
STEADY_RATE_SHARE = 0.5
#: 100 ms: ClickHouse's `inserted_at` has whole seconds, so first sightings are timed by polling;
#: this bounds the error of each latency sample (plus one query, a few ms).
LATENCY_POLL_SECONDS = 0.1
#: How often the catch-up counts rows: a FINAL count costs the server more than a 100 ms poll.
CATCH_UP_POLL_SECONDS = 0.5
#: No new row for this long means the worker is stuck (start-up and the first rebalance take
#: 10-30 s; see the README's known issue for a worker that stops making progress).
STALL_SECONDS = 180.0
#: After the last fresh event is published, how long the orders still missing may take.
SETTLE_SECONDS = 120.0
#: Waiting for the consumer group's lag to reach 0 after the catch-up: a caught-up worker
#: commits within a second (commit interval 0.5 s); past this we measure anyway and say so.
LAG_WAIT_SECONDS = 60.0
#: A terminated worker flushes and leaves the group; past this it is killed.
WORKER_STOP_SECONDS = 30.0
#: 5 ms: a shop's checkout service sends each order as it happens; the project publisher's 20 ms
#: linger (bulk `produce`) would add to the latency being measured.
LATENCY_PRODUCER_LINGER_MS = 5
#: With `--batch N`, the latency phase's stream goes out as batched records of up to
#: min(N, LATENCY_BATCH_MAX) events: a live shop batches what it has, not a backlog's worth.
LATENCY_BATCH_MAX = 20
#: The baseline consumer gives up when no record arrives for this long.
BASELINE_STALL_SECONDS = 60.0
#: The benchmark's own queries wait out a ClickHouse outage this long (the resilience test of the
#: project stops it for 60 s); past it the run fails.
CLICKHOUSE_DOWN_SECONDS = 180.0
#: Clean-up waits less for ClickHouse: after a Ctrl-C the user wants the prompt back.
CLEAN_UP_PATIENCE_SECONDS = 30.0
#: "Others" using more CPU than this during a phase means the machine was shared: say so.
BUSY_MACHINE_CORES = 0.25
MB = 1024 * 1024
#: Terminal control sequences Faust writes even into a log file (its spinner).
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x08")
#: The level field of a Faust log line: "[2026-11-23 20:16:19,476] [24225] [WARNING] message".
LOG_LEVEL = re.compile(r"\] \[\d+\] \[(WARNING|ERROR|CRITICAL)\]")


class BenchmarkError(Exception):
    """The run cannot go on; the message says why and what to look at."""


# --- pure parts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpectedRows:
    """What one worker must write for a list of published lines, given what the pipeline keeps.

    Clicks and shares are rows per distinct valid `event_id`, orders per distinct valid `order_id`
    (the first wins); invalid lines go to dead letters and unroutable ones are never sent.
    """

    lines: int
    unroutable: int
    invalid: int
    duplicates: int
    clicks: int
    shares: int
    orders: int
    refunds: int

    @property
    def rows(self) -> int:
        return self.clicks + self.shares + self.orders

    def of_table(self, table: str) -> int:
        return {"clicks": self.clicks, "shares": self.shares, "attributed_orders": self.orders}[table]


def expected_rows(lines: Iterable[bytes]) -> ExpectedRows:
    """Count what `lines`, published with `streams.publish.produce_lines`, must become."""
    # Imported here: `streams.publish` pulls in kafka-python, which this pure part does not use.
    from streams.publish import route

    unroutable = invalid = duplicates = total = 0
    ids: dict[str, set[str]] = {kind: set() for kind in TOPIC_OF_TYPE}
    for line in lines:
        total += 1
        routed = route(line.strip())
        if isinstance(routed, str):
            unroutable += 1
            continue
        kind = TYPE_OF_TOPIC[routed[0]]
        try:
            event = decode_event(line, kind)
        except InvalidEvent:
            invalid += 1
            continue
        key = event.order_id if isinstance(event, Order) else event.event_id
        if key in ids[kind]:
            duplicates += 1
        ids[kind].add(key)
    return ExpectedRows(
        lines=total, unroutable=unroutable, invalid=invalid, duplicates=duplicates,
        clicks=len(ids["click"]), shares=len(ids["share"]), orders=len(ids["order"]),
        refunds=len(ids["refund"]),
    )


def order_ids(lines: Sequence[bytes]) -> list[str | None]:
    """For each line, the order it carries if it is a valid order, else None."""
    found: list[str | None] = []
    for line in lines:
        try:
            event: object = decode_event(line)
        except InvalidEvent:
            event = None
        found.append(event.order_id if isinstance(event, Order) else None)
    return found


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0-100), interpolated linearly between the closest ranks (numpy's
    default, so the numbers compare with the usual tools)."""
    if not values:
        raise ValueError("no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be between 0 and 100, got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class LatencySummary:
    samples: int
    unseen: int
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None
    max_s: float | None


def summarise_latency(delays: Sequence[float], unseen: int) -> LatencySummary:
    """Percentiles of `delays` (seconds); `unseen` orders never showed up within the wait."""
    if not delays:
        return LatencySummary(0, unseen, None, None, None, None)
    # Milliseconds are all the 100 ms polling can tell apart.
    return LatencySummary(
        samples=len(delays), unseen=unseen,
        p50_s=round(percentile(delays, 50), 3), p95_s=round(percentile(delays, 95), 3),
        p99_s=round(percentile(delays, 99), 3), max_s=round(max(delays), 3),
    )


def median_by_thirds(samples: Sequence[tuple[float, float]]) -> list[float | None]:
    """The median delay of the orders published in each third of the phase, from (published at,
    delay) pairs. Steady state has three similar medians; medians that grow mean the worker
    falls behind at that rate and the percentiles depend on how long the phase ran."""
    if not samples:
        return [None, None, None]
    first = min(sent for sent, _ in samples)
    span = max(sent for sent, _ in samples) - first or 1.0
    thirds: list[list[float]] = [[], [], []]
    for sent, delay in samples:
        thirds[min(2, int((sent - first) / span * 3))].append(delay)
    return [round(percentile(third, 50), 3) if third else None for third in thirds]


def visitors_for(events: int, events_per_visitor: float) -> int:
    """Visitors to generate for at least `events` events (2 % head-room: the count varies)."""
    if events_per_visitor <= 0:
        raise ValueError(f"events_per_visitor must be > 0, got {events_per_visitor}")
    return max(1, math.ceil(events / events_per_visitor * 1.02))


def per_second(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


def decoded_counts(value: bytes, kind: str) -> tuple[int, int]:
    """(events, invalid events) in one record value, decoded as the worker decodes it: an array
    element by element; a value that is unusable as a whole is one invalid event."""
    decoded = decode_record(value, kind)
    return len(decoded), sum(1 for item in decoded if item.error is not None)


def latency_batch(batch: int) -> int | None:
    """The batch size of the latency phase's publisher for `--batch batch` (None: one event per
    record)."""
    return min(batch, LATENCY_BATCH_MAX) if batch > 0 else None


def bare_faust_summary(
    records_per_s: float, records: int, events: int, pipeline_events_per_s: float,
    pipeline_events_per_s_from_first_row: float,
) -> dict[str, Any]:
    """The bare agent's records/s next to the events they carry, and the pipeline's share.

    The agent decodes nothing: `events_per_s` is what its records/s carry at the backlog's
    `events / records` events per record. The pipeline's share is the same whether counted in
    events or in records (both sides have that ratio of events per record)."""
    events_per_record = events / records if records > 0 else 0.0
    events_per_s = records_per_s * events_per_record
    usable = events_per_s > 0 and math.isfinite(events_per_s)
    return {
        "records_per_s": round(records_per_s) if math.isfinite(records_per_s) else None,
        "events_per_record": round(events_per_record, 2),
        "events_per_s": round(events_per_s) if usable else None,
        "ratio_pipeline_to_bare_faust":
            round(pipeline_events_per_s / events_per_s, 4) if usable else None,
        "ratio_pipeline_from_first_row_to_bare_faust":
            round(pipeline_events_per_s_from_first_row / events_per_s, 4) if usable else None,
    }


# --- the machine and its processes --------------------------------------------------------------


def _proc_status(pid: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return fields


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of `pid` in MiB: the resident set now, and its peak so far."""
    fields = _proc_status(pid)
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` has used, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used (every core), from /proc/stat."""
    with open("/proc/stat") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user


class CpuMeter:
    """CPU used over a phase, in cores (1.0 = one core busy all the time): by the worker, Kafka,
    ClickHouse and the benchmark itself, and by everything else on the machine ("others": other
    people's tests on a shared stack disturb the numbers, and this says by how much)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids, benchmark=os.getpid())
        self.start = time.monotonic()
        self.machine = machine_busy_seconds()
        self.used = {name: self._read(pid) for name, pid in self.pids.items()}
        self.finished: dict[str, float] = {}

    def track(self, pids: dict[str, int]) -> None:
        """Count processes started during the phase (all their CPU time is the phase's)."""
        for name, pid in pids.items():
            self.pids[name] = pid
            self.used[name] = 0.0

    def add_finished(self, name: str, seconds: float) -> None:
        """Count a process that started and ended during the phase (its own CPU seconds): it is
        the phase's load, not "others"."""
        self.finished[name] = self.finished.get(name, 0.0) + seconds

    @staticmethod
    def _read(pid: int) -> float:
        try:
            return cpu_seconds(pid)
        except OSError:  # the process is gone (a restarted server): its share is unknown
            return float("nan")

    def cores(self) -> dict[str, float]:
        elapsed = time.monotonic() - self.start
        used = {name: (self._read(pid) - self.used[name]) / elapsed
                for name, pid in self.pids.items()}
        used.update({name: seconds / elapsed for name, seconds in self.finished.items()})
        machine = (machine_busy_seconds() - self.machine) / elapsed
        used["others"] = max(0.0, machine - sum(v for v in used.values() if not math.isnan(v)))
        return {name: round(value, 2) for name, value in used.items()}


def machine(stack: Stack, clickhouse_version: str) -> dict[str, Any]:
    return {
        **host_facts(),
        "faust_streaming": importlib.metadata.version("faust-streaming"),
        "kafka": stack.status().kafka.version,
        "clickhouse": clickhouse_version,
    }


def code_under_test() -> dict[str, Any]:
    """The commit the worker runs, and the pipeline files that differ from it: the checkout is
    shared, so a result means little without the code it measured."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=30).stdout

    try:
        # Not stripped: a porcelain line starts with its two status columns, " M path".
        changed = git("status", "--porcelain", "--", *PIPELINE_PACKAGES).splitlines()
        return {"commit": git("rev-parse", "--short=12", "HEAD").strip(),
                "uncommitted_pipeline_files": [line[3:] for line in changed if line]}
    except (OSError, subprocess.SubprocessError) as exc:
        return {"commit": None, "error": repr(exc)}


def describe_code(code: dict[str, Any]) -> str:
    """`commit` or `commit + uncommitted a.py, b.py`, from `code_under_test`."""
    changed = code.get("uncommitted_pipeline_files") or []
    return f"{code.get('commit')}" + (f" + uncommitted {', '.join(changed)}" if changed else "")


# --- progress -----------------------------------------------------------------------------------


class Phase:
    """A progress bar on a terminal; a line every 10 s otherwise (a log file, CI)."""

    LINE_EVERY_SECONDS = 10.0

    def __init__(self, console: Console, description: str, total: int) -> None:
        self.console = console
        self.description = description
        self.total = total
        self.started = time.monotonic()
        self.last_line = self.started
        self.bar: Progress | None = None
        if console.is_terminal:
            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("{task.fields[note]}"), console=console,
            )
            self.task = self.bar.add_task(description, total=total, note="")
            self.bar.start()

    def update(self, completed: int, note: str = "") -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, note=note)
            return
        now = time.monotonic()
        if now - self.last_line >= self.LINE_EVERY_SECONDS:
            self.last_line = now
            self.console.print(f"  {self.description}: {completed:,}/{self.total:,} "
                               f"after {now - self.started:.0f} s {note}")

    def __enter__(self) -> "Phase":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


# --- the worker ---------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the worker's child process: get SIGTERM if the benchmark dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass  # not glibc Linux: the finally-block cleanup still stops it on any Python exit


class Worker:
    """One `attribution worker` subprocess, its log, memory and liveness."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.started = time.monotonic()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "attribution", "worker", "--loglevel", "warn"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise BenchmarkError(
                f"the worker exited with status {self.process.returncode}; "
                f"its log ({self.log_path}) ends:\n{self.log_tail()}"
            )

    def sample_memory(self) -> tuple[float, float]:
        try:
            rss, peak = memory_mb(self.pid)
        except OSError:  # gone since the last look: say how it ended
            self.check_alive()
            raise
        return rss, peak

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(cannot read the log: {exc})"

    def log_problems(self, keep: int = 10) -> dict[str, Any]:
        """The kinds of warning and error lines in the log, most frequent first (the worker runs
        at --loglevel warn: nothing else is there). Numbers are masked so that one kind of
        message counts as one."""
        try:
            lines = [ANSI_ESCAPE.sub("", line)
                     for line in self.log_path.read_text(errors="replace").splitlines()]
        except OSError:
            return {"log_lines": 0, "kinds": {}}
        kinds: Counter[str] = Counter()
        for line in lines:
            level = LOG_LEVEL.search(line)
            if level is not None:
                message = line[level.end():].strip()
                kinds[f"{level.group(1)} {re.sub(r'[0-9]+', 'N', message)[:160]}"] += 1
            elif line.startswith("Traceback"):
                kinds["Traceback"] += 1
        return {"log_lines": len(lines), "kinds": dict(kinds.most_common(keep))}

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM: it flushes and leaves the group); `wait` for it after."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self) -> None:
        """Until it exited; killed if it takes longer than WORKER_STOP_SECONDS."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout=WORKER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        self.terminate()
        self.wait()


class Workers:
    """The run's `--workers` worker subprocesses: one consumer group, a state directory and a log
    each (a RocksDB database is open in one process at a time). Started together; memory is the
    sum of their resident sets, the peak the largest single worker's."""

    def __init__(self, env: dict[str, str], workdir: Path, count: int) -> None:
        #: Each member's name, in its log's name and the CPU meter: "worker", or "worker-1", ...
        self.names = ["worker"] if count == 1 else [f"worker-{n}" for n in range(1, count + 1)]
        self.members = [
            Worker(env if count == 1
                   else {**env, "ATTRIBUTION_STATE_DIR": str(workdir / "state" / name)},
                   workdir / f"{name}.log")
            for name in self.names
        ]
        self.max_rss_mb = 0.0

    @property
    def started(self) -> float:
        return min(member.started for member in self.members)

    @property
    def pids(self) -> dict[str, int]:
        return {name: member.pid for name, member in zip(self.names, self.members)}

    @property
    def log_paths(self) -> list[Path]:
        return [member.log_path for member in self.members]

    def start(self) -> None:
        for member in self.members:
            member.start()

    def check_alive(self) -> None:
        for member in self.members:
            member.check_alive()

    def sample_memory(self) -> tuple[float, float]:
        """(sum of the resident sets now, the largest peak of one worker so far), in MiB."""
        samples = [member.sample_memory() for member in self.members]
        rss = sum(now for now, _ in samples)
        self.max_rss_mb = max(self.max_rss_mb, rss)
        return rss, max(peak for _, peak in samples)

    def log_tail(self, chars: int = 4000) -> str:
        return "\n".join(f"--- {member.log_path}\n{member.log_tail(chars // len(self.members))}"
                         for member in self.members)

    def log_problems(self) -> dict[str, Any]:
        if len(self.members) == 1:
            return {"path": str(self.members[0].log_path), **self.members[0].log_problems()}
        return {name: {"path": str(member.log_path), **member.log_problems()}
                for name, member in zip(self.names, self.members)}

    def stop(self) -> None:
        for member in self.members:  # all asked first: they leave the group together
            member.terminate()
        for member in self.members:
            member.wait()


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Isolation:
    """A topic prefix, database, state directory and log of this run only."""

    tag: str
    env: dict[str, str]
    config: Config
    workdir: Path

    @property
    def database(self) -> str:
        return self.config.clickhouse.database


def isolate(stack: Stack) -> Isolation:
    from sinks.migrate import migrate_server
    from streams.topics import ensure_topics

    tag = uuid.uuid4().hex[:8]
    workdir = stack.root / "bench" / tag
    env = dict(
        os.environ,
        KAFKA_BOOTSTRAP=stack.kafka_bootstrap,
        TOPIC_PREFIX=f"bench{tag}.",
        CLICKHOUSE_URL=f"clickhouse://default@{stack.clickhouse_address}/bench_{tag}",
        METRICS_PORT="0",
        ATTRIBUTION_STATE_DIR=str(workdir / "state"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    # Config reads the environment only; this process is the benchmark's own, so set it here.
    os.environ.update(env)
    config = Config.from_env()
    migrate_server(config.clickhouse)
    ensure_topics(config)
    return Isolation(tag, env, config, workdir)


def generate_lines(
    visitors: int, seed: int, start: datetime, conversion_rate: float | None = None,
    shape: str = "interleaved", partitions: int = DEFAULT_PARTITIONS,
) -> list[bytes]:
    profile = TrafficProfile(visitors=visitors, seed=seed, start=start)
    if conversion_rate is not None:
        profile = replace(profile, conversion_rate=conversion_rate)
    events = arrange(generate(sample_reference(), profile), shape, partitions=partitions)
    return [encode_json(event) for event in events]


def backlog_of_at_least(
    events: int, seed: int, order_share: float | None = None, shape: str = "interleaved",
    partitions: int = DEFAULT_PARTITIONS,
) -> tuple[TrafficProfile, list[bytes]]:
    """(profile, lines) of a generated day with at least `events` lines, about `order_share` of
    them orders (the generator's default conversion rate when None), shaped by `shape`."""
    try:
        profile = plan_profile(
            sample_reference(), events=math.ceil(events * BACKLOG_HEAD_ROOM),
            order_share=order_share, seed=seed, start=BACKLOG_START,
        )
    except ValueError as exc:
        raise BenchmarkError(str(exc)) from exc
    lines: list[bytes] = []
    for _ in range(5):
        lines = generate_lines(profile.visitors, seed, BACKLOG_START, profile.conversion_rate,
                               shape, partitions)
        if len(lines) >= events:
            return profile, lines
        visitors = max(visitors_for(events, len(lines) / max(1, profile.visitors)),
                       profile.visitors + profile.visitors // 20 + 1)
        profile = TrafficProfile(visitors=visitors, seed=seed, start=BACKLOG_START,
                                 conversion_rate=profile.conversion_rate)
    raise BenchmarkError(f"could not generate {events} events (last try: {len(lines)})")


def publish_backlog(
    iso: Isolation, lines: list[bytes], console: Console, batch: int = 0,
) -> dict[str, Any]:
    """Reference data, then `lines` (one event per record, or batched records of up to `batch`
    events); every record must be acknowledged."""
    from streams.publish import produce_lines, publish_reference

    reference = sample_reference()
    publish_reference(iso.config, *parse_reference_document(orjson.dumps(reference)))
    done = 0
    with Phase(console, "publishing the backlog", len(lines)) as phase:
        def on_line(count: int) -> None:
            nonlocal done
            done += count
            if done % 2000 == 0:
                phase.update(done)

        started = time.monotonic()
        summary = produce_lines(iso.config, lines, on_line=on_line, batch=batch or None)
        seconds = time.monotonic() - started
        phase.update(done)
    if summary.unacknowledged:
        raise BenchmarkError(
            f"{summary.unacknowledged} of {summary.total_records} backlog records "
            f"({summary.unacknowledged_events} events) were not acknowledged by the broker: "
            f"{summary.first_error}")
    return {"sent": summary.total_sent, "by_topic": dict(summary.sent),
            "records": summary.total_records, "records_by_topic": dict(summary.records),
            "batch": batch, "skipped": dict(summary.skipped), "seconds": round(seconds, 2),
            "events_per_s": round(per_second(summary.total_sent, seconds))}


def read_baseline(iso: Isolation, expected_lines: int, console: Console) -> dict[str, Any]:
    """A plain consumer: all partitions of the input topics, beginning to end, each record
    decoded as the worker decodes it (an array element by element)."""
    return asyncio.run(_read_baseline(iso, expected_lines, console))


async def _read_baseline(iso: Isolation, expected_lines: int, console: Console) -> dict[str, Any]:
    # aiokafka, the client under Faust: the baseline is what the worker's own client and the
    # project's validator can do. kafka-python parses records in pure Python and reads only
    # ~11k events/s on a 2-CPU machine (aiokafka ~200k): as a baseline it would measure itself.
    from aiokafka import TopicPartition

    from streams.kafka_clients import aio_consumer

    consumer = aio_consumer(
        iso.config, group_id=None, enable_auto_commit=False,
        fetch_max_bytes=64 * MB, max_partition_fetch_bytes=8 * MB,
    )
    await consumer.start()
    try:
        started = time.monotonic()
        # This run created the topics (fresh prefix) with `config.partitions` partitions.
        partitions = [
            TopicPartition(iso.config.topic(topic), partition)
            for topic in INPUT_TOPICS
            for partition in range(iso.config.partitions)
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        remaining = {tp for tp in partitions if ends[tp] > 0}
        kind_of = {tp: TYPE_OF_TOPIC[tp.topic[len(iso.config.topic_prefix):]] for tp in partitions}
        read = events = invalid = 0
        last_record = time.monotonic()
        with Phase(console, "baseline consumer", sum(ends.values())) as phase:
            while remaining:
                batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
                for tp, records in batch.items():
                    kind = kind_of[tp]
                    for record in records:
                        found, bad = decoded_counts(record.value or b"", kind)
                        events += found
                        invalid += bad
                    read += len(records)
                    if records and records[-1].offset + 1 >= ends[tp]:
                        remaining.discard(tp)
                now = time.monotonic()
                if batch:
                    last_record = now
                elif now - last_record > BASELINE_STALL_SECONDS:
                    raise BenchmarkError(
                        f"baseline consumer: no record for {BASELINE_STALL_SECONDS:.0f} s with "
                        f"{len(remaining)} partitions unfinished (read {read} of "
                        f"{sum(ends.values())})"
                    )
                phase.update(read)
        seconds = time.monotonic() - started
    finally:
        await consumer.stop()
    if events != expected_lines:
        console.print(f"[yellow]baseline read {events} events, {expected_lines} were published")
    return {"client": f"aiokafka {importlib.metadata.version('aiokafka')}", "events": events,
            "records": read, "invalid": invalid, "seconds": round(seconds, 2),
            "events_per_s": round(per_second(events, seconds)),
            "records_per_s": round(per_second(read, seconds))}


def read_bare_faust(
    iso: Isolation, records: int, events: int, catch: dict[str, Any], console: Console,
    meter: CpuMeter,
) -> dict[str, Any]:
    """A bare Faust agent reads the backlog's `records` records (`events` events) from the input
    topics; its rate next to the catch-up's. A failure is reported, not raised: the run goes on."""
    from loadtests.fetch_loop import bare_faust_read

    topics = [iso.config.topic(topic) for topic in INPUT_TOPICS]
    console.print(f"bare Faust agent: reading {records:,} records of {', '.join(INPUT_TOPICS)}")
    try:
        read = bare_faust_read(iso.config.kafka_bootstrap, topics, records,
                               app_id=bare_faust_app_id(iso.config))
    except RuntimeError as exc:
        console.print(f"[yellow]bare Faust agent failed: {exc}")
        return {"error": str(exc)[-2000:]}
    meter.add_finished("bare_faust", read.cpu_s)
    return {
        **bare_faust_summary(read.records_per_s, records, events, catch["events_per_s"],
                             catch["events_per_s_from_first_row"]),
        "records": records, "events": events, "timed_records": read.records,
        "timed_seconds": read.seconds, "timed_from": read.timed_from,
        "process_seconds": read.wall_s, "process_cpu_s": round(read.cpu_s, 2),
        "client": f"faust-streaming {importlib.metadata.version('faust-streaming')}, "
                  "take_events(5000, within=0.2)",
    }


def bare_faust_app_id(config: Config) -> str:
    """The bare agent's Faust app (its group, and the prefix of Faust's own topics): under the
    run's app id, so that `clean_up` deletes them with the run's."""
    return f"{config.app_id}-bare-faust"


class Rows:
    """Counting and finding the benchmark's rows in ClickHouse, riding out short outages.

    The stack is shared: another engineer's outage test may stop ClickHouse for a minute. The
    worker waits such outages out (it retries forever); so do the benchmark's queries, for up to
    CLICKHOUSE_DOWN_SECONDS, and the seconds lost are reported with the phase they fell in.
    """

    def __init__(self, iso: Isolation, console: Console) -> None:
        from sinks.clickhouse import connect

        self.client = connect(iso.config.clickhouse)
        self.db = iso.database
        self.console = console
        self.unreachable_seconds = 0.0

    def execute(
        self, sql: str, params: dict[str, Any] | None = None,
        patience: float = CLICKHOUSE_DOWN_SECONDS,
    ) -> list[Any]:
        from sinks.clickhouse import is_transient

        down_since: float | None = None
        while True:
            try:
                rows: list[Any] = self.client.execute(sql, params)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                now = time.monotonic()
                if down_since is None:
                    down_since = now
                    self.console.print(f"[yellow]ClickHouse unreachable ({exc.__class__.__name__});"
                                       f" retrying for up to {patience:.0f} s")
                if now - down_since > patience:
                    raise BenchmarkError(
                        f"ClickHouse unreachable for {patience:.0f} s: {exc!r}"
                    ) from exc
                time.sleep(1.0)
                continue
            if down_since is not None:
                lost = time.monotonic() - down_since
                self.unreachable_seconds += lost
                self.console.print(f"[yellow]ClickHouse back after {lost:.0f} s")
            return rows

    def count(self, table: str, final: bool = False) -> int:
        sql = f"SELECT count() FROM {self.db}.{table}{' FINAL' if final else ''}"
        return int(self.execute(sql)[0][0])

    def orders_seen(self, ids: Iterable[str]) -> dict[str, str]:
        """Of the orders `ids`, those with an attributed_orders row, and their status."""
        rows = self.execute(
            f"SELECT order_id, status FROM {self.db}.attributed_orders WHERE order_id IN %(ids)s",
            {"ids": tuple(ids)},
        )
        return {order_id: status for order_id, status in rows}

    def accruals_seen(self, ids: Iterable[str]) -> set[str]:
        rows = self.execute(
            f"SELECT order_id FROM {self.db}.commission_facts WHERE fact_id IN %(ids)s",
            {"ids": tuple(f"{order_id}:accrual" for order_id in ids)},
        )
        return {order_id for (order_id,) in rows}

    def version(self) -> str:
        return str(self.execute("SELECT version()")[0][0])


def catch_up(
    worker: Workers, rows: Rows, expected: ExpectedRows, lines: int, timeout: float,
    console: Console, on_start: Callable[[dict[str, int]], None] = lambda pids: None,
) -> dict[str, Any]:
    """Start the worker(s); wait until every expected click, share and order is in ClickHouse."""
    worker.start()
    on_start(worker.pids)
    first_row: float | None = None
    last_progress, last_done = worker.started, -1
    counts: dict[str, int] = {}
    with Phase(console, "worker catch-up (rows)", expected.rows) as phase:
        while True:
            worker.check_alive()
            counts = {table: rows.count(table) for table in CATCH_UP_TABLES}
            now = time.monotonic()
            if first_row is None and any(counts.values()):
                first_row = now
            done = sum(min(counts[t], expected.of_table(t)) for t in CATCH_UP_TABLES)
            if done != last_done:
                last_progress, last_done = now, done
            rss, _ = worker.sample_memory()
            # Events/s so far, assuming events are done in the proportion their rows are.
            rate = per_second(lines, now - worker.started) * done / max(1, expected.rows)
            phase.update(done, f"~{rate:,.0f} events/s  worker RSS {rss:,.0f} MB")
            if all(counts[t] >= expected.of_table(t) for t in CATCH_UP_TABLES):
                final = {table: rows.count(table, final=True) for table in CATCH_UP_TABLES}
                if all(final[t] >= expected.of_table(t) for t in CATCH_UP_TABLES):
                    finished = time.monotonic()
                    counts = final
                    break
            if now - last_progress > STALL_SECONDS:
                raise BenchmarkError(
                    f"no new rows for {STALL_SECONDS:.0f} s (have {counts}, expect clicks "
                    f"{expected.clicks}, shares {expected.shares}, orders {expected.orders}); "
                    f"the worker's log ends:\n{worker.log_tail()}"
                )
            if now - worker.started > timeout:
                raise BenchmarkError(
                    f"catch-up not done after {timeout:.0f} s (have {counts}); raise "
                    f"--catchup-timeout or use fewer --events; log: {worker.log_paths}"
                )
            time.sleep(CATCH_UP_POLL_SECONDS)
    seconds = finished - worker.started
    busy = finished - (first_row or worker.started)
    return {
        "seconds": round(seconds, 2),
        "events_per_s": round(per_second(lines, seconds)),
        "first_row_after_s": round((first_row or finished) - worker.started, 2),
        "events_per_s_from_first_row": round(per_second(lines, busy)),
        "rows_final": counts,
    }


def group_lag_by_partition(iso: Isolation) -> dict[str, int] | None:
    """Messages the worker's consumer group has not committed yet, by "topic[partition]" of its
    topics (without the prefix; None: the group has committed nothing yet)."""
    from streams import kafka_clients

    admin = kafka_clients.admin(iso.config)
    consumer = kafka_clients.consumer(iso.config, group_id=None)
    try:
        committed = admin.list_group_offsets({iso.config.app_id: None}).get(iso.config.app_id, {})
        ours = {tp: meta.offset for tp, meta in committed.items()
                if tp.topic.startswith(iso.config.topic_prefix)}
        if not ours:
            return None
        ends = consumer.end_offsets(list(ours))
        prefix = len(iso.config.topic_prefix)
        return {f"{tp.topic[prefix:]}[{tp.partition}]": max(0, ends[tp] - offset)
                for tp, offset in sorted(ours.items())}
    finally:
        consumer.close()
        admin.close()


def group_lag(iso: Isolation) -> int | None:
    """Messages the worker's consumer group has not committed yet, over its topics (None: the
    group has committed nothing yet)."""
    lags = group_lag_by_partition(iso)
    return None if lags is None else sum(lags.values())


def wait_for_zero_lag(iso: Isolation, worker: Workers, console: Console) -> dict[str, Any]:
    started = time.monotonic()
    lags = group_lag_by_partition(iso)
    while (lags is None or any(lags.values())) \
            and time.monotonic() - started < LAG_WAIT_SECONDS:
        worker.check_alive()
        time.sleep(1.0)
        lags = group_lag_by_partition(iso)
    seconds = time.monotonic() - started
    lag = None if lags is None else sum(lags.values())
    behind = {where: n for where, n in (lags or {}).items() if n}
    if lag != 0:
        console.print(f"[yellow]the worker's consumer lag is still {lag} after {seconds:.0f} s "
                      f"({behind}); measuring latency anyway")
    return {"lag": lag, "lag_by_partition": behind, "waited_s": round(seconds, 2)}


@dataclass
class _Published:
    """What the latency publisher thread hands to the poller."""

    orders: "queue.SimpleQueue[tuple[str, float]]" = field(default_factory=queue.SimpleQueue)
    sent: int = 0
    records: int = 0  # records the events went out in (known at the end)
    first: float | None = None
    last: float | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)


def _publish_stream(
    config: Config, lines: list[bytes], rate: float, out: _Published, batch: int | None = None,
) -> None:
    from streams import kafka_clients
    from streams.publish import produce_lines

    ids = order_ids(lines)
    recorded: set[str] = set()

    def timed() -> Iterator[bytes]:
        for index, line in enumerate(pace(lines, rate)):
            if out.stop.is_set():
                return
            now = time.monotonic()
            out.first = out.first or now
            out.last = now
            out.sent += 1
            order_id = ids[index]
            if order_id is not None and order_id not in recorded:  # a re-sent order keeps its first time
                recorded.add(order_id)
                out.orders.put((order_id, now))
            yield line

    producer = kafka_clients.producer(
        config, acks="all", linger_ms=LATENCY_PRODUCER_LINGER_MS,
        max_in_flight_requests_per_connection=1, retries=10,
    )
    try:
        summary = produce_lines(config, timed(), producer=producer, batch=batch)
        out.records = summary.total_records
    except BaseException as exc:  # handed to the main thread, which reports it
        out.error = exc
    finally:
        producer.close(timeout=10)
        out.done.set()


def steady_latency(
    iso: Isolation, worker: Workers, rows: Rows, lines: list[bytes], rate: float, console: Console,
    batch: int | None = None,
) -> dict[str, Any]:
    """Publish `lines` at `rate` (as batched records of up to `batch` events when given); time
    each order until its row (and accrual fact) is readable."""
    published = _Published()
    publisher = threading.Thread(
        target=_publish_stream, args=(iso.config, lines, rate, published, batch), daemon=True,
        name="latency-publisher",
    )
    pending_rows: dict[str, float] = {}
    pending_facts: dict[str, float] = {}
    row_delays: list[float] = []
    row_samples: list[tuple[float, float]] = []  # (published at, delay), for the trend
    attributed_row_delays: list[float] = []  # the same orders as the accrual facts
    fact_delays: list[float] = []
    orders = 0
    publisher.start()
    try:
        with Phase(console, "steady-state orders seen", len(lines)) as phase:
            while True:
                polled = time.monotonic()
                while True:
                    try:
                        order_id, sent_at = published.orders.get_nowait()
                    except queue.Empty:
                        break
                    pending_rows[order_id] = pending_facts[order_id] = sent_at
                    orders += 1
                if pending_rows:
                    seen = rows.orders_seen(pending_rows)
                    now = time.monotonic()
                    for order_id, status in seen.items():
                        sent_at = pending_rows.pop(order_id)
                        row_delays.append(now - sent_at)
                        row_samples.append((sent_at, now - sent_at))
                        if status == "unattributed":  # no commission, so no accrual fact
                            pending_facts.pop(order_id, None)
                        else:
                            attributed_row_delays.append(row_delays[-1])
                waiting_facts = [o for o in pending_facts if o not in pending_rows]
                if waiting_facts:
                    seen_facts = rows.accruals_seen(waiting_facts)
                    now = time.monotonic()
                    for order_id in seen_facts:
                        fact_delays.append(now - pending_facts.pop(order_id))
                if published.error is not None:
                    raise BenchmarkError(f"publishing the fresh stream failed: {published.error!r}")
                worker.check_alive()
                rss, _ = worker.sample_memory()
                p50 = f"p50 {percentile(row_delays, 50):.2f} s" if row_delays else ""
                phase.update(published.sent, f"{len(row_delays)}/{orders} orders seen {p50}  "
                                             f"worker RSS {rss:,.0f} MB")
                if published.done.is_set() and not pending_rows and not pending_facts:
                    break
                if published.done.is_set() and published.last is not None \
                        and time.monotonic() - published.last > SETTLE_SECONDS:
                    console.print(f"[yellow]{len(pending_rows)} orders without a row and "
                                  f"{len(pending_facts)} without an accrual fact "
                                  f"{SETTLE_SECONDS:.0f} s after the last event was published")
                    break
                time.sleep(max(0.0, LATENCY_POLL_SECONDS - (time.monotonic() - polled)))
    finally:
        published.stop.set()
        publisher.join(timeout=30)
    span = (published.last or 0.0) - (published.first or 0.0)
    return {
        "target_rate": round(rate, 1),
        "achieved_rate": round(per_second(published.sent - 1, span), 1),
        "events": published.sent,
        "batch": batch or 0,
        "records": published.records,
        "publish_seconds": round(span, 2),
        "orders": orders,
        "order_to_row": asdict(summarise_latency(row_delays, len(pending_rows))),
        "order_to_row_median_by_third_s": median_by_thirds(row_samples),
        "attributed_order_to_row": asdict(summarise_latency(attributed_row_delays, 0)),
        "order_to_accrual_fact": asdict(summarise_latency(fact_delays, len(pending_facts))),
        "poll_interval_s": LATENCY_POLL_SECONDS,
    }


def clean_up(iso: Isolation, rows: Rows | None, console: Console) -> None:
    """Drop what this run made on the shared stack: its database, topics, group and state."""
    from streams import kafka_clients

    steps: list[tuple[str, Callable[[], object]]] = []
    if rows is not None:
        database = rows
        steps.append(("drop database", lambda: database.execute(
            f"DROP DATABASE IF EXISTS {iso.database}", patience=CLEAN_UP_PATIENCE_SECONDS)))

    def delete_topics() -> None:
        admin = kafka_clients.admin(iso.config)
        try:
            # Ours only: the prefix and the Faust app id (changelogs) both carry the run's tag.
            mine = [topic for topic in admin.list_topics()
                    if topic.startswith(iso.config.topic_prefix)
                    or topic.startswith(f"{iso.config.app_id}-")]
            if mine:
                admin.delete_topics(mine, timeout_ms=30_000)
            for group in (iso.config.app_id, bare_faust_app_id(iso.config)):
                try:
                    admin.delete_groups([group])
                except Exception:  # the group may never have committed; nothing to delete
                    pass
        finally:
            admin.close()

    steps.append(("delete topics", delete_topics))
    steps.append(("delete worker state",
                  lambda: shutil.rmtree(iso.workdir / "state", ignore_errors=True)))
    for name, step in steps:
        try:
            step()
        except Exception as exc:  # clean up what we can; say what is left behind
            console.print(f"[yellow]clean-up: {name} failed ({exc!r}); left behind: database "
                          f"{iso.database}, topics {iso.config.topic_prefix}* and "
                          f"{iso.config.app_id}-*, state {iso.workdir / 'state'}")


# --- output -------------------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.0f} ms"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def worker_cores(cores: dict[str, float]) -> float:
    """The CPU meter's cores of all workers ("worker", or "worker-1", "worker-2", ...)."""
    return round(sum(v for name, v in cores.items() if name.split("-")[0] == "worker"), 2)


def results_table(result: dict[str, Any]) -> Table:
    code = result["code"]
    dirty = " + uncommitted changes" if code.get("uncommitted_pipeline_files") else ""
    workers = result["settings"].get("workers", 1)
    who = "one worker" if workers == 1 else f"{workers} workers"
    table = Table(title=f"Benchmark {result['tag']} — {who}, {result['machine']['nproc']} "
                        f"CPUs, code {code.get('commit')}{dirty}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("notes")
    backlog, catch, base = result["backlog"], result["catch_up"], result["baseline"]
    batch = result["settings"].get("batch", 0)
    records = backlog.get("publish", {}).get("records")
    in_records = (f" in {records:,} records (batched, up to {batch} events each)"
                  if batch and records else "")
    table.add_row("backlog", f"{backlog['events']:,} events{in_records}",
                  f"{backlog.get('shape', 'interleaved')}: "
                  f"{backlog['expected']['clicks']:,} clicks, {backlog['expected']['shares']:,} shares, "
                  f"{backlog['expected']['orders']:,} orders, {backlog['expected']['refunds']:,} refunds")
    table.add_row("catch-up", f"{catch['events_per_s']:,} events/s",
                  f"{catch['seconds']:.0f} s from worker start; {who} used "
                  f"{worker_cores(catch['cpu_cores'])} cores")
    table.add_row("catch-up from first row", f"{catch['events_per_s_from_first_row']:,} events/s",
                  f"first row after {catch['first_row_after_s']:.1f} s")
    base_records = (f"; {base['records_per_s']:,} records/s"
                    if batch and base.get("records_per_s") is not None else "")
    table.add_row("baseline consumer + decode", f"{base['events_per_s']:,} events/s",
                  f"{base['seconds']:.1f} s, {base['client']}, no group{base_records}")
    table.add_row("pipeline / baseline", f"{result['ratio_pipeline_to_baseline']:.1%}", "")
    bare = result.get("bare_faust")
    if bare is not None and "error" in bare:
        table.add_row("bare Faust agent", "failed", bare["error"].splitlines()[0][:120])
    elif bare is not None:
        value = f"{_count(bare['records_per_s'])} records/s"
        if batch:
            carried = (f"= {_count(bare['events_per_s'])} events/s at "
                       f"{bare['events_per_record']} events per record (not decoded); ")
        else:
            carried = "one event per record (not decoded); "
        table.add_row("bare Faust agent", value,
                      f"{carried}{bare['timed_records']:,} records in {bare['timed_seconds']:.1f} s"
                      f" (timed from {bare['timed_from']}), worker idle")
        ratio = bare["ratio_pipeline_to_bare_faust"]
        from_first = bare["ratio_pipeline_from_first_row_to_bare_faust"]
        table.add_row("pipeline / bare Faust agent", _share(ratio),
                      f"from first row: {_share(from_first)}"
                      + ("; the same in events and in records" if batch else ""))
    latency = result["latency"]
    if latency is not None:
        rows, facts = latency["order_to_row"], latency["order_to_accrual_fact"]
        note = f"at {latency['achieved_rate']:,.0f} events/s for {latency['publish_seconds']:.0f} s"
        if latency.get("batch"):
            note += f", batched records of up to {latency['batch']} events"
        table.add_row("order -> row p50 / p95 / p99",
                      f"{_seconds(rows['p50_s'])} / {_seconds(rows['p95_s'])} / {_seconds(rows['p99_s'])}",
                      f"{rows['samples']} orders, {rows['unseen']} unseen, {note}")
        thirds = " / ".join(_seconds(m) for m in latency["order_to_row_median_by_third_s"])
        table.add_row("order -> row p50 by third of the phase", thirds,
                      "growing = the worker falls behind at this rate")
        table.add_row("order -> accrual fact p50 / p95 / p99",
                      f"{_seconds(facts['p50_s'])} / {_seconds(facts['p95_s'])} / {_seconds(facts['p99_s'])}",
                      f"{facts['samples']} attributed orders")
    table.add_row("worker peak RSS (VmHWM)", f"{result['memory']['peak_rss_mb']:,.0f} MB",
                  "" if workers == 1 else "the largest of one worker")
    m = result["machine"]
    table.add_row("machine", f"{m['nproc']} CPUs, {m['ram_gib']} GiB",
                  f"{m['cpu_model']}; Python {m['python']}, Kafka {m['kafka']}, ClickHouse {m['clickhouse']}")
    for disturbance in result["disturbances"]:
        table.add_row("[yellow]disturbed", "", disturbance)
    return table


class PhaseWatch:
    """What else happened during a phase: CPU by process, ClickHouse outages, server restarts.

    Numbers from a disturbed phase are kept, and the disturbance is reported next to them.
    """

    def __init__(
        self, name: str, stack: Stack, rows: Rows, pids: dict[str, int] | None = None
    ) -> None:
        self.name = name
        self.stack = stack
        self.rows = rows
        self.servers = self._server_pids()
        self.cpu = CpuMeter(
            {**(pids or {}), **{k: v for k, v in self.servers.items() if v is not None}}
        )
        self.unreachable_before = rows.unreachable_seconds

    def _server_pids(self) -> dict[str, int | None]:
        return {"kafka": self.stack.kafka.process.pid(),
                "clickhouse": self.stack.clickhouse.process.pid()}

    def finish(self, into: dict[str, Any], disturbances: list[str]) -> None:
        cores = self.cpu.cores()
        lost = self.rows.unreachable_seconds - self.unreachable_before
        into["cpu_cores"] = cores
        into["clickhouse_unreachable_s"] = round(lost, 1)
        if cores["others"] > BUSY_MACHINE_CORES:
            disturbances.append(f"{self.name}: other processes used {cores['others']} cores")
        if lost > 0:
            disturbances.append(f"{self.name}: ClickHouse unreachable for {lost:.0f} s")
        for server, pid in self._server_pids().items():
            if pid != self.servers[server]:
                disturbances.append(f"{self.name}: {server} restarted (pid {self.servers[server]}"
                                    f" -> {pid})")


# --- the command --------------------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    stack = Stack()
    status = stack.status()
    if not status.running:
        console.print("starting the local stack (attribution stack up)")
        stack.up(progress=lambda line: console.print(f"  {line}"))
        status = stack.status()
    iso = isolate(stack)
    console.print(f"run {iso.tag}: prefix {iso.config.topic_prefix}, database {iso.database}, "
                  f"{args.workers} worker(s), logs in {iso.workdir}")
    worker = Workers(iso.env, iso.workdir, args.workers)
    rows: Rows | None = None
    try:
        rows = Rows(iso, console)
        result: dict[str, Any] = {
            "tag": iso.tag,
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(stack, rows.version()),
            "code": code_under_test(),
            "settings": {
                "events": args.events, "seed": args.seed, "partitions": iso.config.partitions,
                "batch_size": iso.config.batch_size, "batch_seconds": iso.config.batch_seconds,
                "workers": args.workers, "shape": args.shape, "order_share": args.order_share,
                "batch": args.batch, "latency_batch": latency_batch(args.batch) or 0,
            },
        }

        disturbances: list[str] = result.setdefault("disturbances", [])
        console.print(f"generating at least {args.events:,} events")
        profile, lines = backlog_of_at_least(args.events, args.seed, args.order_share,
                                             args.shape, iso.config.partitions)
        visitors = profile.visitors
        expected = expected_rows(lines)
        console.print(f"  {len(lines):,} events from {visitors:,} visitors "
                      f"(conversion rate {profile.conversion_rate:.3f}, shape {args.shape}): "
                      f"{expected}")
        result["backlog"] = {"events": len(lines), "visitors": visitors, "expected": asdict(expected),
                             "shape": args.shape,
                             "conversion_rate": round(profile.conversion_rate, 4),
                             "order_share": round(expected.orders / max(1, len(lines)), 4)}
        result["backlog"]["publish"] = publish_backlog(iso, lines, console, args.batch)
        if args.batch:
            publish = result["backlog"]["publish"]
            console.print(f"  {publish['sent']:,} events in {publish['records']:,} records")

        watch = PhaseWatch("baseline", stack, rows)
        result["baseline"] = read_baseline(iso, len(lines), console)
        watch.finish(result["baseline"], disturbances)
        console.print(f"  baseline: {result['baseline']['events_per_s']:,} events/s")

        watch = PhaseWatch("catch-up", stack, rows)

        def on_start(pids: dict[str, int]) -> None:
            watch.cpu.track(pids)
            # The checkout is shared: the worker runs what is there when it starts, not what
            # was there when the run began.
            result["code_at_worker_start"] = code_under_test()
            if result["code_at_worker_start"] != result["code"]:
                disturbances.append(
                    f"the code changed between the run's start ({describe_code(result['code'])}) "
                    f"and the worker's ({describe_code(result['code_at_worker_start'])})")

        result["catch_up"] = catch_up(
            worker, rows, expected, len(lines), args.catchup_timeout, console, on_start=on_start,
        )
        watch.finish(result["catch_up"], disturbances)
        rss, _ = worker.sample_memory()
        result["catch_up"]["worker_rss_mb"] = round(rss)
        catch_rate = result["catch_up"]["events_per_s"]
        result["ratio_pipeline_to_baseline"] = round(catch_rate / result["baseline"]["events_per_s"], 4)
        console.print(f"  catch-up: {catch_rate:,} events/s "
                      f"({result['catch_up']['seconds']:.0f} s), worker RSS {rss:,.0f} MB")

        # Watched too: a server restarted while the worker is meant to be catching its last
        # commits up (another test's outage) explains a lag that does not reach 0.
        watch = PhaseWatch("lag wait", stack, rows, worker.pids)
        result["caught_up"] = wait_for_zero_lag(iso, worker, console)
        watch.finish(result["caught_up"], disturbances)

        # After the catch-up, with the worker idle: the same records, read by a bare Faust agent.
        watch = PhaseWatch("bare Faust agent", stack, rows, worker.pids)
        result["bare_faust"] = read_bare_faust(
            iso, result["baseline"]["records"], result["baseline"]["events"],
            result["catch_up"], console, watch.cpu,
        )
        watch.finish(result["bare_faust"], disturbances)
        if "error" not in result["bare_faust"]:
            bare = result["bare_faust"]
            console.print(f"  bare Faust agent: {_count(bare['records_per_s'])} records/s "
                          f"({_count(bare['events_per_s'])} events/s); pipeline / bare agent "
                          f"{_share(bare['ratio_pipeline_to_bare_faust'])}")
        rate = args.latency_rate or catch_rate * STEADY_RATE_SHARE
        fresh_visitors = visitors_for(int(rate * args.latency_seconds), len(lines) / visitors)
        # The same mix of orders as the backlog; the stream is paced, so it has no shape.
        fresh = generate_lines(fresh_visitors, args.seed + 1, BACKLOG_START + timedelta(days=1),
                               profile.conversion_rate)
        console.print(f"steady state: {len(fresh):,} fresh events at {rate:,.0f} events/s "
                      f"(~{len(fresh) / rate:.0f} s)")
        watch = PhaseWatch("latency", stack, rows, worker.pids)
        result["latency"] = steady_latency(iso, worker, rows, fresh, rate, console,
                                           latency_batch(args.batch))
        watch.finish(result["latency"], disturbances)
        for disturbance in disturbances:
            console.print(f"[yellow]disturbed: {disturbance}")

        rss, peak = worker.sample_memory()
        result["memory"] = {"peak_rss_mb": round(peak), "rss_at_end_mb": round(rss),
                            "max_sampled_rss_mb": round(worker.max_rss_mb)}
        worker.stop()  # first, so that the log summary has the shut-down too
        result["worker_log"] = worker.log_problems()
        return result
    finally:
        worker.stop()
        if args.keep:
            console.print(f"kept: prefix {iso.config.topic_prefix}, database {iso.database}, "
                          f"state {iso.workdir / 'state'}")
        else:
            clean_up(iso, rows, console)
        if rows is not None:
            rows.client.disconnect()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.benchmark",
        description="Catch-up throughput of the worker(s) vs a plain consumer, steady-state "
        "order latency and worker memory, on the local stack (see the module docstring).",
    )
    parser.add_argument("--events", type=int, default=300_000,
                        help="backlog size, at least (default 300000)")
    parser.add_argument("--seed", type=int, default=42, help="generator seed (default 42)")
    parser.add_argument("--shape", choices=SHAPES, default="interleaved",
                        help="how the backlog is published: interleaved (default, as a live shop "
                        "sends it), topic-by-topic (all clicks and shares, then all orders, then "
                        "all refunds), orders-first (orders, clicks and shares, refunds), "
                        "hot-partition (most visitors keyed to partition 0); the latency phase's "
                        "stream is always interleaved")
    parser.add_argument("--order-share", type=float, default=None, metavar="SHARE",
                        help="make about SHARE of the events orders, in the backlog and the "
                        "latency phase (e.g. 0.2 for an order-heavy backlog; at most about 0.3; "
                        "default: the generator's 3 %% of visitors buying, ~1.5 %% orders)")
    parser.add_argument("--latency-seconds", type=float, default=60.0,
                        help="length of the fixed-rate phase (default 60)")
    parser.add_argument("--latency-rate", type=float, default=None, metavar="EVENTS_PER_S",
                        help="input rate of the latency phase (default: half the catch-up rate)")
    parser.add_argument("--catchup-timeout", type=float, default=1800.0,
                        help="give up on the catch-up after this many seconds (default 1800)")
    parser.add_argument("--workers", type=int, default=1,
                        help="workers in the consumer group, each its own process (default 1)")
    parser.add_argument("--batch", type=int, default=0, metavar="N",
                        help="publish the backlog as batched records: JSON arrays of up to N "
                        f"events (1-{MAX_BATCH_ELEMENTS:,}); the latency phase then batches up "
                        f"to min(N, {LATENCY_BATCH_MAX}) (default 0: one event per record)")
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    parser.add_argument("--keep", action="store_true",
                        help="keep the database, topics and worker state of the run")
    args = parser.parse_args(argv)
    if args.events < 1 or args.latency_seconds <= 0 or (args.latency_rate or 1) <= 0 \
            or args.workers < 1:
        parser.error("--events, --latency-seconds, --latency-rate and --workers must be positive")
    if args.order_share is not None and not 0 < args.order_share < 1:
        parser.error("--order-share must be between 0 and 1")
    if not 0 <= args.batch <= MAX_BATCH_ELEMENTS:
        parser.error(f"--batch must be between 0 and {MAX_BATCH_ELEMENTS} (0: no batching)")

    # Progress goes to stderr, results to stdout; a log file gets long lines, not 80 columns.
    progress = Console(stderr=True, soft_wrap=not sys.stderr.isatty())
    # The driver logs every failed ping; `Rows` says once that ClickHouse is unreachable.
    logging.getLogger("clickhouse_driver").setLevel(logging.CRITICAL)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = run(args, progress)
    except BenchmarkError as exc:
        progress.print(f"[red]benchmark failed:[/red] {exc}", markup=True, highlight=False)
        return 1
    except KeyboardInterrupt:
        progress.print("[red]interrupted[/red]; the worker was stopped")
        return 130
    Console(width=None if sys.stdout.isatty() else 140).print(results_table(result))
    document = orjson.dumps(result, option=orjson.OPT_INDENT_2)
    if args.json:
        Path(args.json).write_bytes(document + b"\n")
    sys.stdout.write(document.decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
