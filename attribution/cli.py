"""The `attribution` command line: one entry point for operators (contract §1).

Configuration comes from the environment (KAFKA_BOOTSTRAP, TOPIC_PREFIX, CLICKHOUSE_URL,
METRICS_PORT, and the ATTRIBUTION_* settings in the README); no command takes a password.
"""

from __future__ import annotations

import csv
import io
import sys
from datetime import date
from pathlib import Path
from typing import Any, Callable, Optional

import orjson
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from attribution.progress import progress_bar
from schemas.config import Config
from schemas.validation import MAX_BATCH_ELEMENTS

app = typer.Typer(
    help="Real-time affiliate attribution: Kafka -> stream worker -> ClickHouse commission ledger.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stack_app = typer.Typer(help="Local single-node Kafka broker and ClickHouse server (no Docker).",
                        no_args_is_help=True)
db_app = typer.Typer(help="ClickHouse schema.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(db_app, name="db")

console = Console(stderr=True)


def load_config() -> Config:
    try:
        return Config.from_env()
    except ValidationError as exc:
        for error in exc.errors():
            # A field's error names its variable; a cross-field one names them in its message.
            where = f"{str(error['loc'][0]).upper()}: " if error.get("loc") else ""
            message = error["msg"].removeprefix("Value error, ")
            console.print(f"[red]configuration error:[/] {where}{message}")
        raise typer.Exit(2) from exc


def fail(message: str, code: int = 1) -> typer.Exit:
    console.print(f"[red]error:[/] {message}")
    return typer.Exit(code)


# --- stack ---------------------------------------------------------------------------------


PRINCIPALS = ("admin", "worker", "producer", "reviewer")


@stack_app.command("up")
def stack_up(
    secure: bool = typer.Option(
        False, "--secure",
        help="The broker also listens with SASL_SSL on 127.0.0.1:9093 (its own CA under the "
             "stack directory), with SCRAM users admin, worker, producer, reviewer and their "
             "ACLs. Decided when the broker starts: a running broker without it is not restarted."),
    topic_prefix: str = typer.Option(
        "", "--topic-prefix", envvar="TOPIC_PREFIX", show_default=False,
        help="With --secure: grant the ACLs on this prefix's topics (run again for another)."),
) -> None:
    """Install (if needed) and start Kafka and ClickHouse; waits until both answer. Idempotent."""
    from deploy.stack import Stack, StackError
    from schemas.config import check_topic_prefix

    try:
        check_topic_prefix(topic_prefix)
    except ValueError as exc:
        raise fail(str(exc), 2) from exc
    try:
        status = Stack().up(progress=lambda line: console.print(line), secure=secure,
                            topic_prefix=topic_prefix)
    except StackError as exc:
        raise fail(str(exc)) from exc
    typer.echo(status.render())
    if secure:
        console.print('point a shell at it: eval "$(attribution stack env --principal worker)"')


@stack_app.command("env")
def stack_env(
    secure: bool = typer.Option(False, "--secure", help="Over the SASL_SSL listener (as admin "
                                                        "unless --principal says otherwise)."),
    principal: Optional[str] = typer.Option(
        None, "--principal", metavar="|".join(PRINCIPALS),
        help="Connect as this principal over the SASL_SSL listener (implies --secure)."),
) -> None:
    """Print `export NAME=value` lines that point a shell at the local stack:
    eval "$(attribution stack env --principal producer)".

    The password is never printed: KAFKA_SASL_PASSWORD_FILE names the file that holds it.
    Settings the chosen connection does not use are exported empty (empty means unset).
    """
    import shlex

    from deploy.stack import Stack, StackError

    if principal is not None and principal not in PRINCIPALS:
        raise fail(f"--principal must be one of {', '.join(PRINCIPALS)}", 2)
    if secure or principal is not None:
        principal = principal or "admin"
    try:
        settings = Stack().client_env(principal)
    except StackError as exc:
        raise fail(str(exc)) from exc
    unused = ("KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD",
              "KAFKA_SASL_PASSWORD_FILE", "KAFKA_SSL_CAFILE")
    for name in unused:
        settings.setdefault(name, "")
    for name, value in settings.items():
        typer.echo(f"export {name}={shlex.quote(value)}")


@stack_app.command("down")
def stack_down(
    purge: bool = typer.Option(False, "--purge", help="Also delete Kafka and ClickHouse data."),
) -> None:
    """Stop both services cleanly (data is kept unless --purge). Idempotent."""
    from deploy.stack import Stack, StackError

    try:
        Stack().down(progress=lambda line: console.print(line), purge=purge)
    except StackError as exc:
        raise fail(str(exc)) from exc


@stack_app.command("status")
def stack_status() -> None:
    """Versions, addresses, pids, data directories and logs of the local services."""
    from deploy.stack import Stack

    status = Stack().status()
    typer.echo(status.render())
    if not status.running:
        raise typer.Exit(3)


# --- db ------------------------------------------------------------------------------------


@db_app.command("migrate")
def db_migrate(
    print_roles: bool = typer.Option(
        False, "--print-roles",
        help="Only print the SQL of the roles (ClickHouse 20.x and later); connects to nothing."),
    print_users_xml: bool = typer.Option(
        False, "--print-users-xml",
        help="Only print the same rights as a users.xml snippet, for ClickHouse without SQL access"
             " control (18.16); connects to nothing."),
) -> None:
    """Create the database, apply pending schema migrations and create the roles <db>_writer
    (INSERT and SELECT on the database: the worker) and <db>_reader (SELECT: BI). Idempotent.

    Run it as an administrator: the worker and BI users need neither DDL nor access management.

    Without SQL access control (18.16), or the right to create roles, it prints them to apply.
    """
    from sinks.migrate import (SchemaOptions, ensure_roles_server, migrate_server, roles_sql,
                               roles_users_xml)

    config = load_config()
    database = config.clickhouse.database
    if print_roles and print_users_xml:
        raise fail("--print-roles and --print-users-xml print different things: choose one", 2)
    if print_roles or print_users_xml:
        typer.echo(roles_sql(database) if print_roles else roles_users_xml(database), nl=False)
        return
    try:
        applied = migrate_server(config.clickhouse, progress=lambda line: console.print(line),
                                 options=SchemaOptions.from_config(config))
        roles = ensure_roles_server(config.clickhouse)
    except Exception as exc:  # connection refused, auth...: one line, not a traceback
        raise fail(f"migration against {config.clickhouse!r} failed: {exc}") from exc
    if applied:
        typer.echo(f"applied {len(applied)} migration(s) to {database}")
    else:
        typer.echo(f"{database} is up to date")
    if roles.created:
        typer.echo(f"roles {', '.join(roles.created)} hold their rights on {database}")
    else:
        console.print(f"[yellow]roles not created:[/] {roles.reason}; apply this by hand:")
        typer.echo(roles.by_hand, nl=False)


# --- reference data and events -------------------------------------------------------------


@app.command("load-reference")
def load_reference(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="Reference JSON (contract §3)."),
) -> None:
    """Validate programs, affiliates and settings, then publish them to the reference topics.

    Exits 2 on an invalid file, 1 if the broker did not acknowledge every record sent.
    """
    from schemas.validation import InvalidReference, parse_reference_document
    from streams.publish import publish_reference
    from streams.topics import ensure_topics

    config = load_config()
    try:
        programs, affiliates, settings = parse_reference_document(file.read_bytes())
    except InvalidReference as exc:
        raise fail(f"{file}: {exc}", 2) from exc
    ensure_topics(config, progress=lambda line: console.print(line))
    counts = publish_reference(config, programs, affiliates, settings)
    records = counts["programs"] + counts["affiliates"] + counts["settings"]
    if counts["unacknowledged"]:
        raise fail(_not_acknowledged(counts["unacknowledged"], records))
    typer.echo(
        f"published {counts['programs']} programs, {counts['affiliates']} affiliates, "
        f"{counts['settings']} settings to {config.topic('ref-*')}"
    )


@app.command("produce")
def produce(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="Events, one JSON object per line."),
    batch: Optional[int] = typer.Option(
        None, "--batch", min=1, max=MAX_BATCH_ELEMENTS, metavar="N",
        help="Send batched records: JSON arrays of up to N events (at most 10,000, and under "
             "1 MB per record), grouped by topic and by the partition of their key.",
    ),
) -> None:
    """Publish events to the topic of their `type`: one record per event, or batched records.

    Keys: clicks and orders by visitor_id, refunds by order_id, shares by affiliate_id.

    Lines that cannot be routed are skipped and counted.

    Exits 1, naming the count, if the broker did not acknowledge every record sent.
    """
    from streams.publish import produce_lines
    from streams.topics import ensure_topics

    config = load_config()
    ensure_topics(config, progress=lambda line: console.print(line))
    with file.open("rb") as handle, progress_bar(console, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task("producing", total=_count_lines(file))
        summary = produce_lines(config, handle, on_line=lambda n: progress.advance(task, n),
                                batch=batch)
    for topic, count in sorted(summary.sent.items()):
        records = f" in {summary.records[topic]} records" if batch is not None else ""
        typer.echo(f"sent {count:>9} to {config.topic(topic)}{records}")
    for reason, count in sorted(summary.skipped.items()):
        typer.echo(f"skipped {count:>6} lines: {reason}")
    in_records = f" in {summary.total_records} records" if batch is not None else ""
    typer.echo(f"total sent {summary.total_sent}{in_records}, "
               f"skipped {sum(summary.skipped.values())}")
    if summary.unacknowledged:
        events = (f" ({summary.unacknowledged_events} of {summary.total_sent} events)"
                  if batch is not None else "")
        raise fail(_not_acknowledged(summary.unacknowledged, summary.total_records) + events)


def _not_acknowledged(count: int, records: int) -> str:
    return f"{count} of {records} records were not acknowledged by the broker"


# --- worker and report ---------------------------------------------------------------------


@app.command("worker")
def worker(
    loglevel: str = typer.Option("info", help="crit | error | warn | info | debug"),
) -> None:
    """Run the stream processor until interrupted (SIGTERM/SIGINT: the batch in flight is finished and committed). Creates missing topics."""
    from streams.worker import run_worker

    run_worker(load_config(), loglevel=loglevel)


@app.command("edge")
def edge(
    host: str = typer.Option("0.0.0.0", help="Address to listen on (the port is EDGE_PORT)."),
    loglevel: str = typer.Option("info", help="critical | error | warning | info | debug"),
) -> None:
    """Run the tracking edge (contract §8) on EDGE_PORT: tracking links /r/{link_id} and
    /r?aff=&to=, browser events POST /v1/events, signed postbacks POST /v1/orders and
    /v1/refunds, /t.js, /healthz, /readyz and /metrics. Events go to Kafka (acks=all) or, while
    Kafka is unreachable, to the local spool. Needs PII_KEY and EDGE_SECRET. SIGTERM/SIGINT:
    stops accepting, finishes requests in flight and drains the delivery."""
    import asyncio
    import logging

    config = load_config()
    for variable, value in (("PII_KEY", config.pii_key), ("EDGE_SECRET", config.edge_secret)):
        if value is None:
            raise fail(f"{variable} (or {variable}_FILE) is required by the edge", 2)
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from edge.app import serve

    asyncio.run(serve(config, host=host))


def _period(since: Optional[str], until: Optional[str]) -> tuple[date, date]:
    try:
        first = date.fromisoformat(since) if since else date(1970, 1, 1)
        last = date.fromisoformat(until) if until else date(2105, 12, 31)
    except ValueError as exc:
        raise fail(f"bad date: {exc}", 2) from exc
    return first, last


def _emit(rows: list[dict[str, object]], fmt: str, print_table: Callable[[list[dict[str, object]]], None]) -> None:
    if fmt == "json":
        typer.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    elif fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["affiliate_id"])
        writer.writeheader()
        writer.writerows(rows)
        typer.echo(out.getvalue(), nl=False)
    else:
        print_table(rows)


def _query_and_emit(
    rows: Callable[[Any, str, date, date], list[dict[str, object]]],
    since: Optional[str], until: Optional[str], fmt: str,
    print_table: Callable[[list[dict[str, object]]], None],
) -> None:
    """Validate the options, read `rows` from ClickHouse for the period, print them as asked."""
    from sinks.clickhouse import connect

    if fmt not in ("table", "csv", "json"):
        raise fail("--format must be table, csv or json", 2)
    first, last = _period(since, until)
    config = load_config()
    client = connect(config.clickhouse)
    try:
        found = rows(client, config.clickhouse.database, first, last)
    except Exception as exc:
        raise fail(f"cannot read {config.clickhouse!r}: {exc}") from exc
    finally:
        client.disconnect()
    _emit(found, fmt, print_table)


SINCE = typer.Option(None, help="First day (YYYY-MM-DD, UTC). Default: all.")
UNTIL = typer.Option(None, help="Last day, inclusive. Default: all.")
FORMAT = typer.Option("table", "--format", help="table | csv | json")


@app.command("report")
def report(
    since: Optional[str] = SINCE,
    until: Optional[str] = UNTIL,
    fmt: str = FORMAT,
    max_age: float = typer.Option(
        0, "--max-age", min=0, metavar="SECONDS",
        help="Read the rollup as it is when it was recomputed less than SECONDS ago (a busy "
             "store's current month is always stale, and its rebuild takes seconds). Default 0: "
             "always bring it up to date first, exact to the last row written."),
) -> None:
    """Per affiliate and channel: clicks, shares, orders, conversion, revenue, commission.

    Read from the rollup (its rows of the asked days), whose months in the range are refreshed
    first; a user who may not write reads it as it is, with a warning saying how old it is."""
    from sinks.report import build_report

    def rows(client: Any, database: str, first: date, last: date) -> list[dict[str, object]]:
        found = build_report(client, database, first, last, max_age_seconds=max_age)
        if found.warning:
            console.print(f"[yellow]warning:[/] {found.warning}")
        return [r.as_dict() for r in found.rows]

    _query_and_emit(rows, since, until, fmt, print_report_table)


@app.command("codes")
def codes(
    since: Optional[str] = SINCE,
    until: Optional[str] = UNTIL,
    fmt: str = FORMAT,
    show_all: bool = typer.Option(False, "--all", help="List every code used, not only suspicious ones."),
    limit: int = typer.Option(20, min=1, help="At most this many codes."),
) -> None:
    """Discount codes that look leaked, worst first, with the evidence.

    A code looks leaked when some of its orders came from a coupon-site referrer or were flagged
    for code velocity. Score = coupon-site orders + velocity-flagged orders + 0.1 x orders
    without a click of the code's owner.
    """
    from sinks.code_report import code_evidence

    def rows(client: Any, database: str, first: date, last: date) -> list[dict[str, object]]:
        found = code_evidence(client, database, first, last, only_leaked=not show_all)
        return [e.as_dict() for e in found[:limit]]

    _query_and_emit(rows, since, until, fmt, print_codes_table)


def print_codes_table(rows: list[dict[str, object]]) -> None:
    if not rows:
        console.print("no code looks leaked (use --all to list every code)")
        return
    table = Table(title="Discount codes that look leaked, worst first")
    columns = ["discount_code", "affiliate_id", "leak_score", "redemptions", "distinct_customers",
               "peak_customers_per_hour", "without_owner_click", "from_coupon_sites",
               "velocity_flagged", "coupon_sites", "first_seen", "revenue", "discount_given"]
    for column in columns:
        table.add_column(column.replace("_", " "), justify="left" if column in columns[:2] else "right")
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    Console(width=None if sys.stdout.isatty() else 240).print(table)


@app.command("review")
def review(
    order_id: str = typer.Argument(..., help="The held order to decide on."),
    release: bool = typer.Option(False, "--release", help="Release: the order is approved at its lock end."),
    reject: bool = typer.Option(False, "--reject", help="Reject: a reversal zeroes its commission."),
    reviewer: str = typer.Option(..., "--reviewer", help="Who decides (recorded with the decision)."),
    note: str = typer.Option("", "--note", help="Why (recorded with the decision)."),
) -> None:
    """Release or reject a held order: publishes the decision to the `reviews` topic.

    The worker applies it to the ledger and records it in the `reviews` table with its outcome
    (only held orders can be reviewed; any other decision is recorded as ignored).

    Exits 1 if the broker did not acknowledge the decision.
    """
    from datetime import datetime, timezone
    from uuid import uuid4

    from schemas.events import Review
    from streams.publish import publish_review
    from streams.topics import ensure_topics

    if release == reject:
        raise fail("give exactly one of --release or --reject", 2)
    if not reviewer.strip():
        raise fail("--reviewer must not be empty", 2)
    config = load_config()
    decision = Review(
        event_id=f"review-{uuid4().hex}", ts=datetime.now(timezone.utc), order_id=order_id,
        decision="release" if release else "reject", reviewer=reviewer.strip(), note=note,
    )
    ensure_topics(config, progress=lambda line: console.print(line))
    if publish_review(config, decision):
        raise fail(_not_acknowledged(1, 1))
    typer.echo(f"published {decision.decision} of order {order_id} by {decision.reviewer}"
               f" ({decision.event_id}) to {config.topic('reviews')}")


def print_report_table(rows: list[dict[str, object]]) -> None:
    table = Table(title="Affiliates by channel")
    columns = ["affiliate_id", "channel", "currency", "clicks", "shares", "orders",
               "conversion_rate", "revenue", "net_commission", "pending", "approved", "held"]
    for column in columns:
        table.add_column(column.replace("_", " "), justify="left" if column in columns[:3] else "right")
    for row in rows:
        cells = [str(row[c]) if row[c] is not None else "-" for c in columns]
        cells[0] = cells[0] or "(unattributed)"
        cells[1] = cells[1] or "(no click)"
        table.add_row(*cells)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


# --- personal data -------------------------------------------------------------------------


@app.command("forget")
def forget(
    customer: str = typer.Option(..., "--customer", metavar="ID",
                                 help="The customer_id to forget, as the orders carry it."),
    requested_by: Optional[str] = typer.Option(
        None, "--requested-by", metavar="WHO",
        help="Who asked for the erasure, for the audit row. Default: the OS user."),
    timeout: float = typer.Option(600, min=1, help="Seconds to wait for ClickHouse's mutations."),
) -> None:
    """Erase a customer's identifiers (GDPR), keeping the money facts. Idempotent.

    Finds the customer's orders and the visitor ids they were placed as, and
    tells the worker to drop those visitors' state (forget records on
    `visitor-events`). Then, in ClickHouse, replaces the customer id, those
    visitor ids and their session ids (attributed_orders, clicks) and mentions
    of the customer id (abuse_flags.detail, reviews.note) by tombstones,
    `forgotten:` + keyed hash, and waits for the mutations. Every run writes
    one row to `privacy_audit`, with the keyed hash of the id, never the id.

    Kept: amounts, dates, affiliates, codes, commission_facts. Not erased: the
    input topics, which hold raw events until Kafka's retention removes them
    (README, "Personal data").

    Needs PII_KEY or PII_KEY_FILE. Exits 0 when done, when run again and for
    an unknown customer; 1 if the broker did not acknowledge a forget record
    (then nothing was erased), the mutations did not finish within --timeout
    or rows still carry the identifiers; 2 on a usage or configuration error.
    """
    from sinks.clickhouse import connect
    from sinks.forget import AUDIT_TABLE, ForgetError, SchemaMissing, forget_customer
    from streams.forget import publish_forget
    from streams.topics import ensure_topics

    customer_id = customer.strip()  # as validation stores it
    if not customer_id:
        raise fail("--customer must not be empty", 2)
    config = load_config()
    key = config.pii_key
    if key is None:
        raise fail("forget needs PII_KEY or PII_KEY_FILE: its tombstones and audit row are keyed "
                   "hashes", 2)
    who = (requested_by or _os_user()).strip() or "unknown"

    def forget_state(visitor_ids: tuple[str, ...]) -> int:
        ensure_topics(config, progress=lambda line: console.print(line))
        return publish_forget(config, visitor_ids)

    client = connect(config.clickhouse)

    def execute(sql: str, rows: list[tuple[object, ...]] | None = None) -> list[tuple[object, ...]]:
        return client.execute(sql, rows) if rows is not None else client.execute(sql)  # type: ignore[no-any-return]

    try:
        outcome = forget_customer(execute, config.clickhouse.database, customer_id, key,
                                  requested_by=who, forget_state=forget_state, timeout=timeout,
                                  progress=lambda line: console.print(line))
    except SchemaMissing as exc:
        raise fail(str(exc)) from exc
    except ForgetError as exc:
        raise fail(f"{exc} (recorded in {AUDIT_TABLE}; run forget again to finish)") from exc
    except Exception as exc:  # connection refused, auth...: one line, not a traceback
        reason = " ".join(str(exc).split("Stack trace:")[0].split())  # 18.16 appends the server's
        raise fail(f"forget against {config.clickhouse!r} failed: {reason}") from exc
    finally:
        client.disconnect()
    # The id itself is not printed (terminal logs are stored too): the subject's keyed hash is.
    subject = f"customer {outcome.subject_hash}"
    if outcome.remaining:
        left = ", ".join(f"{table} {n}" for table, n in sorted(outcome.remaining.items()))
        raise fail(f"{subject}: rows written while the erasure ran still carry its identifiers "
                   f"({left}); run forget again")
    if outcome.outcome == "nothing_found":
        typer.echo(f"{subject}: nothing found, nothing to erase (audit row written)")
    elif outcome.outcome == "already_forgotten":
        typer.echo(f"{subject}: already forgotten, nothing left to change (audit row written)")
    else:
        changed = ", ".join(f"{table} {n}" for table, n in sorted(outcome.rows.items())) or "none"
        typer.echo(f"{subject}: forgot {outcome.orders} orders and {outcome.visitors} visitors; "
                   f"rows changed: {changed}; {outcome.state_records} forget records on "
                   f"{config.topic('visitor-events')}; audit row written to {AUDIT_TABLE}")


def _os_user() -> str:
    import getpass
    import os

    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        return f"uid {os.getuid()}"


# --- demo ----------------------------------------------------------------------------------


@app.command("demo")
def demo(
    visitors: int = typer.Option(20_000, help="Visitors in the generated day of traffic."),
    timeout: float = typer.Option(600, help="Seconds to wait for the worker to catch up."),
) -> None:
    """The whole pipeline on a sample: stack up, migrate, reference data, worker, traffic, report;
    then one visitor through `attribution edge` (a tracking link, a signed order postback)."""
    from attribution.demo import run_demo

    run_demo(load_config(), visitors=visitors, timeout=timeout, console=console,
             print_report=print_report_table, print_codes=print_codes_table)




def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


# --- payouts (contract §9): the commands live in attribution/payouts.py ----------------------

from attribution.payouts import register as _register_payouts  # noqa: E402  (uses this module's helpers)

_register_payouts(app)
from attribution.rollup import rollup_app  # noqa: E402
app.add_typer(rollup_app, name="rollup")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
