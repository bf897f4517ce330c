"""`attribution demo`: the whole pipeline on a generated day of traffic, on the local stack."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date
from typing import Any

import orjson
from rich.console import Console

from attribution.progress import progress_bar
from deploy.stack import Stack, StackError
from loadtests.generator import TrafficProfile, generate, sample_reference
from schemas.config import Config
from schemas.validation import parse_reference_document
from sinks.clickhouse import connect
from sinks.migrate import migrate_server
from sinks.code_report import code_evidence
from sinks.report import build_report
from streams.publish import produce_lines, publish_reference
from streams.topics import ensure_topics


def run_demo(
    config: Config,
    *,
    visitors: int,
    timeout: float,
    console: Console,
    print_report: Callable[[list[dict[str, Any]]], None],
    print_codes: Callable[[list[dict[str, Any]]], None],
) -> None:
    say = console.print
    stack = Stack()
    try:
        stack.up(progress=lambda line: say(f"  {line}"))
    except StackError as exc:
        say(f"[red]error:[/] {exc}")
        raise SystemExit(1) from exc
    say(f"[bold]1/5[/] schema: {migrate_server(config.clickhouse) and 'migrated' or 'up to date'}")
    ensure_topics(config, progress=lambda line: say(f"  {line}"))

    reference = sample_reference()
    counts = publish_reference(config, *parse_reference_document(orjson.dumps(reference)))
    say(f"[bold]2/5[/] reference data: {counts['programs']} programs, {counts['affiliates']} affiliates")

    log_path = stack.root / "demo-worker.log"
    say(f"[bold]3/5[/] starting the worker (log: {log_path})")
    with log_path.open("ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "attribution", "worker", "--loglevel", "warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        order_ids: set[str] = set()
        lines: list[bytes] = []
        for event in generate(reference, TrafficProfile(visitors=visitors)):
            if event["type"] == "order":
                order_ids.add(event["order_id"])
            lines.append(orjson.dumps(event))
        with progress_bar(console) as progress:
            task = progress.add_task("[bold]4/5[/] producing a day of traffic", total=len(lines))
            summary = produce_lines(config, lines, on_line=lambda n: progress.advance(task, n))
            say(f"  sent {summary.total_sent} events: " + ", ".join(
                f"{n} {topic}" for topic, n in sorted(summary.sent.items())))
            wait = progress.add_task("[bold]5/5[/] waiting for the ledger", total=len(order_ids))
            _wait_for_orders(config, len(order_ids), timeout, worker,
                             lambda n: progress.update(wait, completed=n))
        _settle(config)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()

    client = connect(config.clickhouse)
    try:
        everything = (date(1970, 1, 1), date(2105, 12, 31))
        report = build_report(client, config.clickhouse.database, *everything)
        leaked = code_evidence(client, config.clickhouse.database, *everything)
    finally:
        client.disconnect()
    print_report([row.as_dict() for row in report.rows])
    print_codes([code.as_dict() for code in leaked[:10]])
    say("The stack is still running: query ClickHouse (clickhouse-client, database "
        f"{config.clickhouse.database}) or stop it with `attribution stack down`.")


def _wait_for_orders(
    config: Config, expected: int, timeout: float, worker: subprocess.Popen[bytes],
    on_count: Callable[[int], None],
) -> None:
    client = connect(config.clickhouse)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise SystemExit(f"the worker exited with {worker.returncode}; see its log")
            written = client.execute(
                f"SELECT count() FROM {config.clickhouse.database}.attributed_orders FINAL"
            )[0][0]
            on_count(written)
            if written >= expected:
                return
            time.sleep(1)
    finally:
        client.disconnect()
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {expected} orders")


def _settle(config: Config, quiet_seconds: float = 3.0) -> None:
    """Refunds and approvals trail the orders a little: wait until the ledger stops growing."""
    client = connect(config.clickhouse)
    try:
        previous = -1
        while True:
            current = client.execute(
                f"SELECT count() FROM {config.clickhouse.database}.commission_facts"
            )[0][0]
            if current == previous:
                return
            previous = current
            time.sleep(quiet_seconds)
    finally:
        client.disconnect()

