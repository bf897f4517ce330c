"""`attribution demo`: the whole pipeline on a generated day of traffic, on the local stack; then
one visitor through the tracking edge's HTTP API (a tracking link, a signed order postback)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from datetime import date, datetime, timezone
from typing import Any

import orjson
from rich.console import Console

from attribution.progress import progress_bar
from deploy.stack import Stack, StackError
from edge.sample_store import signed_headers
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
    say(f"[bold]1/6[/] schema: {migrate_server(config.clickhouse) and 'migrated' or 'up to date'}")
    ensure_topics(config, progress=lambda line: say(f"  {line}"))

    reference = sample_reference()
    reference["settings"]["links"] = [DEMO_LINK]
    counts = publish_reference(config, *parse_reference_document(orjson.dumps(reference)))
    say(f"[bold]2/6[/] reference data: {counts['programs']} programs, {counts['affiliates']} affiliates")

    log_path = stack.root / "demo-worker.log"
    say(f"[bold]3/6[/] starting the worker (log: {log_path})")
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
            task = progress.add_task("[bold]4/6[/] producing a day of traffic", total=len(lines))
            summary = produce_lines(config, lines, on_line=lambda n: progress.advance(task, n))
            say(f"  sent {summary.total_sent} events: " + ", ".join(
                f"{n} {topic}" for topic, n in sorted(summary.sent.items())))
            wait = progress.add_task("[bold]5/6[/] waiting for the ledger", total=len(order_ids))
            _wait_for_orders(config, len(order_ids), timeout, worker,
                             lambda n: progress.update(wait, completed=n))
        _settle(config)
        client = connect(config.clickhouse)
        try:
            everything = (date(1970, 1, 1), date(2105, 12, 31))
            report = build_report(client, config.clickhouse.database, *everything)
            leaked = code_evidence(client, config.clickhouse.database, *everything)
        finally:
            client.disconnect()
        print_report([row.as_dict() for row in report.rows])
        print_codes([code.as_dict() for code in leaked[:10]])
        # After the report: the edge's click and order are stamped now, weeks after the generated
        # day, and would move event time past that day's lock ends (approvals) before it is read.
        say("[bold]6/6[/] one visitor through the tracking edge (attribution edge)")
        _edge_round_trip(config, stack, worker, say)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()

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



#: The demo's tracking link: `/r/demo` sends a browser to the store's product page.
DEMO_LINK = {"link_id": "demo", "affiliate_id": "aff-001", "url": "https://shop.example/product",
             "channel": "blog"}
#: The edge does not record scripts' clicks (edge/bots.py); the demo stands in for a browser.
DEMO_BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (attribution demo)"
#: Starting the edge, and the worker attributing one order: seconds on a laptop.
EDGE_STEP_TIMEOUT = 60.0


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _edge_round_trip(
    config: Config, stack: Stack, worker: subprocess.Popen[bytes], say: Callable[..., None]
) -> None:
    """What a browser and a store's back end do, through `attribution edge` on a free port:
    follow the tracking link, then send the order signed, with the visitor id the link gave."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, EDGE_PORT=str(port), EDGE_SPOOL_DIR=str(stack.root / "demo-edge-spool"))
    secret = config.edge_secret
    if secret is None:  # the demo's own, never shown
        secret = secrets.token_hex(32).encode()
        env["EDGE_SECRET"] = secret.decode()
    if config.pii_key is None:
        env["PII_KEY"] = secrets.token_hex(32)
    edge = f"http://127.0.0.1:{port}"
    log_path = stack.root / "demo-edge.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "attribution", "edge"], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    opener = urllib.request.build_opener(_NoRedirect)

    def get(url: str, headers: dict[str, str]) -> tuple[int, str]:
        try:
            with opener.open(urllib.request.Request(url, headers=headers), timeout=5) as answer:
                return answer.status, answer.headers.get("Location", "")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Location", "")

    try:
        deadline = time.monotonic() + EDGE_STEP_TIMEOUT
        while True:  # up, and has read the link (a script's visit is redirected, not recorded)
            if process.poll() is not None:
                raise SystemExit(f"the edge exited with {process.returncode}; see {log_path}")
            try:
                if get(f"{edge}/r/demo", {})[0] == 302:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the edge did not serve /r/demo in {EDGE_STEP_TIMEOUT:.0f}s; "
                                 f"see {log_path}")
            time.sleep(0.3)
        status, location = get(f"{edge}/r/demo", {"User-Agent": DEMO_BROWSER})
        landing = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)
        visitor_id = landing["av"][0]
        say(f"  GET {edge}/r/demo -> {status} {location}")

        order_id = f"demo-edge-{uuid.uuid4().hex[:8]}"
        body = orjson.dumps({
            "type": "order", "order_id": order_id, "event_id": f"order-{order_id}",
            # Milliseconds, as the edge stamps the click: in the same second, it must not be later.
            "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "visitor_id": visitor_id,
            "customer_id": "cust-demo-edge", "currency": "EUR", "total": "80.00"})
        request = urllib.request.Request(f"{edge}/v1/orders", data=body, method="POST",
                                         headers=signed_headers(secret.decode(), body))
        with urllib.request.urlopen(request, timeout=10) as answer:
            say(f"  POST {edge}/v1/orders (signed, visitor_id {visitor_id}) -> {answer.status} "
                f"{answer.read().decode()}")
        _say_attribution(config, order_id, worker, say)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _say_attribution(
    config: Config, order_id: str, worker: subprocess.Popen[bytes], say: Callable[..., None]
) -> None:
    client = connect(config.clickhouse)
    database = config.clickhouse.database
    deadline = time.monotonic() + EDGE_STEP_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise SystemExit(f"the worker exited with {worker.returncode}; see its log")
            rows = client.execute(
                f"SELECT o.affiliate_id, o.method, f.amount, f.currency "
                f"FROM {database}.attributed_orders AS o FINAL INNER JOIN "
                f"(SELECT * FROM {database}.commission_facts FINAL WHERE kind = 'accrual') AS f "
                "ON f.order_id = o.order_id WHERE o.order_id = %(order_id)s",
                {"order_id": order_id})
            if rows:
                affiliate, method, amount, currency = rows[0]
                say(f"  order {order_id}: {method} to {affiliate}, "
                    f"accrual {amount:.2f} {currency}")
                return
            time.sleep(0.5)
    finally:
        client.disconnect()
    raise SystemExit(f"timed out after {EDGE_STEP_TIMEOUT:.0f}s waiting for order {order_id}")
