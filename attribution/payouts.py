"""`attribution payouts ...` and `attribution statement` (contract §9).

Each command reads the ledger and payout tables through sinks/payouts.py, lets the pure rules of
streams/rules/payouts.py decide, and writes or prints the result. `attribution/cli.py` registers
them (`payouts` sub-app, `statement` command).
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from schemas.config import Config
from schemas.payouts import PayoutLine
from streams.rules.payouts import Batch
from sinks.migrate import Executor

payouts_app = typer.Typer(
    help="Payout batches from the approved ledger (contract §9). A batch pays every affiliate x "
         "currency whose balance (approved commission before the cut-off, minus earlier batches) "
         "reaches the minimum; a negative balance (a clawback after a payout) is carried.",
    no_args_is_help=True,
)

out = Console()

#: PayPal waits this long at most for the reference topics to be read to their end: they are
#: compacted and small, so 30 s only passes when the broker is away.
REFERENCE_TIMEOUT_SECONDS = 30.0


def _cli() -> Any:
    import attribution.cli as cli  # the shared helpers; imported late, cli.py imports this module

    return cli


@contextmanager
def _clickhouse() -> Iterator[tuple[Executor, str, Config]]:
    from sinks.clickhouse import connect

    config = _cli().load_config()
    client = connect(config.clickhouse)

    def execute(sql: str, rows: list[tuple[object, ...]] | None = None) -> list[tuple[object, ...]]:
        return client.execute(sql, rows) if rows is not None else client.execute(sql)  # type: ignore[no-any-return]

    try:
        yield execute, config.clickhouse.database, config
    except Exception as exc:
        if isinstance(exc, (typer.Exit, typer.BadParameter)):
            raise
        from sinks.payouts import PayoutConflict, PayoutNotFound
        from streams.rules.payouts import PayoutOutOfOrder

        if isinstance(exc, (PayoutNotFound, PayoutConflict, PayoutOutOfOrder)):
            raise _cli().fail(str(exc)) from exc
        raise _cli().fail(f"cannot read {config.clickhouse!r}: {exc}") from exc
    finally:
        client.disconnect()


def _day(text: str, option: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise _cli().fail(f"{option} must be a date YYYY-MM-DD, got {text!r}", 2) from exc


def _format(fmt: str, allowed: tuple[str, ...]) -> str:
    if fmt not in allowed:
        raise _cli().fail(f"--format must be {' | '.join(allowed)}", 2)
    return fmt


def _print_lines(title: str, lines: list[dict[str, object]]) -> None:
    out.print(title)
    if not lines:
        return
    table = Table()
    for column in ("affiliate_id", "currency", "amount", "orders"):
        table.add_column(column, justify="right" if column in ("amount", "orders") else "left")
    for line in lines:
        table.add_row(*(str(line[c]) for c in ("affiliate_id", "currency", "amount", "orders")))
    out.print(table)


def _show_batch(batch: Any, fmt: str) -> None:
    from sinks.payouts import line_dict

    lines = [line_dict(line) for line in batch.lines]
    if fmt == "json":
        _cli()._emit([{**batch.as_dict(), "lines": lines}], "json", lambda rows: None)
    elif fmt == "csv":
        _cli()._emit(lines, "csv", lambda rows: None)
    else:
        header = batch.as_dict()
        totals = ", ".join(f"{a} {c}" for c, a in header["total"].items()) or "nothing"  # type: ignore[attr-defined]
        reference = f", reference {batch.reference}" if batch.reference else ""
        _print_lines(f"{batch.payout_id} (until {header['until']}, {batch.status}{reference}): "
                     f"{len(lines)} lines, {totals}", lines)


# --- commands -----------------------------------------------------------------------------------


def create_or_get(execute: Executor, database: str, cut_off: date, minimum: Decimal,
                  currency: str | None, now: datetime) -> tuple[Any, Batch | None]:
    """The stored batch of `cut_off` and the plan it was written from (None: it existed)."""
    from sinks.payouts import PayoutNotFound, get_batch, latest_until, read_balances, write_batch
    from streams.rules.payouts import batch_from_balances, payout_id_for

    payout_id = payout_id_for(cut_off)
    try:
        return get_batch(execute, database, payout_id), None
    except PayoutNotFound:
        pass
    # The sums come from the database (sinks.payouts.balances_sql, checked against the rules'
    # own `balances` over the facts); which balance is paid and which carried is the rules'.
    planned = batch_from_balances(read_balances(execute, database, cut_off, currency), cut_off,
                                  minimum=minimum, latest_until=latest_until(execute, database))
    write_batch(execute, database, payout_id, cut_off, planned.lines, now, minimum, currency or "")
    return get_batch(execute, database, payout_id), planned


@payouts_app.command("create")
def create(
    until: str = typer.Option(..., "--until", help="Cut-off DATE (YYYY-MM-DD): facts before "
                              "00:00 UTC of that day, of orders approved before it. The batch is "
                              "payout-<DATE>; running it again prints it and writes nothing."),
    minimum: str = typer.Option("50.00", "--minimum", help="Pay a balance only from this amount; "
                                "a smaller one is carried to the next batch."),
    currency: Optional[str] = typer.Option(None, "--currency", help="Only balances in this "
                                           "currency (ISO 4217). Default: every currency."),
    fmt: str = typer.Option("table", "--format", help="table | csv | json"),
) -> None:
    """Create the payout batch for a cut-off DATE, or print it if it exists."""
    cut_off = _day(until, "--until")
    _format(fmt, ("table", "csv", "json"))
    try:
        least = Decimal(minimum).quantize(Decimal("0.01"))
        if not least.is_finite():
            raise InvalidOperation
    except InvalidOperation as exc:
        raise _cli().fail(f"--minimum must be an amount, got {minimum!r}", 2) from exc
    if least < 0:
        raise _cli().fail("--minimum must not be negative", 2)
    today = datetime.now(timezone.utc).date()
    if cut_off > today:
        # Facts of a day still running could arrive after the batch was cut.
        raise _cli().fail(f"--until {cut_off} is after today ({today}): cut off at today at most", 2)
    cur = currency.strip().upper() if currency else None
    with _clickhouse() as (execute, database, _config):
        batch, planned = create_or_get(execute, database, cut_off, least, cur,
                                       datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0))
    if planned is None:
        _cli().console.print(f"{batch.payout_id} exists already (created "
                             f"{batch.created_at:%Y-%m-%d %H:%M:%S} UTC): nothing written")
        _show_batch(batch, fmt)
        return
    negative = [b for b in planned.carried if b.amount < 0]
    _cli().console.print(
        f"created {batch.payout_id}: {len(batch.lines)} lines; {len(planned.carried)} balances carried"
        + (f" ({len(negative)} negative)" if negative else ""))
    _show_batch(batch, fmt)


@payouts_app.command("list")
def list_(fmt: str = typer.Option("table", "--format", help="table | csv | json")) -> None:
    """Every batch: cut-off, status, reference, lines and totals."""
    from sinks.payouts import list_batches

    _format(fmt, ("table", "csv", "json"))
    with _clickhouse() as (execute, database, _config):
        batches = list_batches(execute, database)
    rows = [dict(b.as_dict(), total=" ".join(f"{a} {c}" for c, a in b.as_dict()["total"].items()))  # type: ignore[attr-defined]
            for b in batches]

    def print_table(rows: list[dict[str, object]]) -> None:
        table = Table(title="payout batches")
        for column in ("payout_id", "until", "status", "reference", "lines", "total", "created_at"):
            table.add_column(column)
        for row in rows:
            table.add_row(*(str(row[c]) for c in ("payout_id", "until", "status", "reference",
                                                   "lines", "total", "created_at")))
        out.print(table)

    _cli()._emit(rows, fmt, print_table)


@payouts_app.command("show")
def show(payout_id: str = typer.Argument(..., help="payout-YYYY-MM-DD"),
         fmt: str = typer.Option("table", "--format", help="table | csv | json")) -> None:
    """One batch and its lines (affiliate, currency, amount, orders)."""
    from sinks.payouts import get_batch

    _format(fmt, ("table", "csv", "json"))
    with _clickhouse() as (execute, database, _config):
        batch = get_batch(execute, database, payout_id)
    _show_batch(batch, fmt)


def paypal_csv(lines: tuple[PayoutLine, ...], emails: dict[str, str], note: str) -> str:
    """PayPal Payouts bulk file: recipient, amount, currency, sender item id, note; no header.

    Raises LookupError naming every affiliate without a `payout_email`: half a payment file is
    worse than none (the missing ones would silently wait a month).
    """
    missing = sorted({line.affiliate_id for line in lines if not emails.get(line.affiliate_id)})
    if missing:
        raise LookupError("no payout_email for " + ", ".join(missing))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for line in lines:
        writer.writerow([emails[line.affiliate_id], str(line.amount), line.currency,
                         line.payout_id, note])
    return buffer.getvalue()


def read_payout_emails(config: Config) -> dict[str, str]:
    """affiliate_id -> payout_email, from the compacted `ref-affiliates` topic (the worker keeps
    affiliates there, not in ClickHouse), read to its end like a worker does at start."""
    from streams.reference import ReferenceReader

    async def load() -> dict[str, str]:
        reader = ReferenceReader(config)
        task = asyncio.create_task(reader.run())
        try:
            ready = asyncio.create_task(reader.ready.wait())
            done, _ = await asyncio.wait({task, ready}, timeout=REFERENCE_TIMEOUT_SECONDS,
                                         return_when=asyncio.FIRST_COMPLETED)
            if ready not in done:
                ready.cancel()
                if task in done:
                    task.result()  # raises the reader's error
                raise TimeoutError(f"reference topics not read within {REFERENCE_TIMEOUT_SECONDS:.0f} s")
            return {a.affiliate_id: a.payout_email for a in reader.snapshot.affiliates.values()}
        finally:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    return asyncio.run(load())


@payouts_app.command("export")
def export(
    payout_id: str = typer.Argument(..., help="payout-YYYY-MM-DD"),
    fmt: str = typer.Option(..., "--format", help="csv: the lines with a header (affiliate_id, "
                            "currency, amount, orders). paypal: a PayPal Payouts bulk file, one "
                            "line per payment: payout_email (from the reference data, §3), "
                            "amount, currency, the payout_id as sender item id, a note."),
) -> None:
    """Print a batch's lines as CSV, or as a PayPal Payouts file to upload."""
    from sinks.payouts import get_batch, line_dict

    _format(fmt, ("csv", "paypal"))
    with _clickhouse() as (execute, database, config):
        batch = get_batch(execute, database, payout_id)
    if fmt == "csv":
        _cli()._emit([line_dict(line) for line in batch.lines], "csv", lambda rows: None)
        return
    try:
        emails = read_payout_emails(config)
    except Exception as exc:
        raise _cli().fail(f"cannot read the affiliates' payout_email from Kafka: {exc}") from exc
    try:
        text = paypal_csv(batch.lines, emails,
                          f"Commission until {batch.until.isoformat()} ({batch.payout_id})")
    except LookupError as exc:
        raise _cli().fail(f"{exc.args[0]}: add it to the affiliates and run load-reference") from exc
    typer.echo(text, nl=False)


@payouts_app.command("mark-paid")
def mark_paid(
    payout_id: str = typer.Argument(..., help="payout-YYYY-MM-DD"),
    reference: str = typer.Option(..., "--reference", help="The payment's reference (e.g. the "
                                  "PayPal batch id). Again with the same reference: nothing "
                                  "changes; with another: refused."),
) -> None:
    """Record that a batch was paid. Idempotent."""
    from sinks.payouts import mark_paid as record_paid

    if not reference.strip():
        raise _cli().fail("--reference must not be empty", 2)
    with _clickhouse() as (execute, database, _config):
        batch, changed = record_paid(execute, database, payout_id, reference.strip())
    _cli().console.print(f"{batch.payout_id} {'marked paid' if changed else 'was already paid'}, "
                         f"reference {batch.reference}")


def statements_for(execute: Executor, database: str, affiliate_id: str, month: str) -> list[Any]:
    """An affiliate's statements of a month (one per currency): its balances at the month's ends
    summed by the database, the facts of the month's orders read, the rest the rules'."""
    from sinks.payouts import (read_affiliate_currencies, read_balances, read_month_facts,
                               read_paid_lines)
    from streams.rules.payouts import Balances, month_bounds, statements

    first, following = month_bounds(month)

    def at(day: date) -> dict[str, Decimal]:
        return {b.currency: b.amount
                for b in read_balances(execute, database, day, affiliate_id=affiliate_id)}

    known = Balances(at(first), at(following),
                     read_affiliate_currencies(execute, database, affiliate_id, following))
    return statements(affiliate_id, month,
                      read_month_facts(execute, database, affiliate_id, first, following),
                      read_paid_lines(execute, database, affiliate_id), known)


STATEMENT_FIELDS = ("opening_balance", "accruals", "reversals", "clawbacks", "approvals",
                    "approved", "adjustments", "payouts", "closing_balance")


def statement(
    affiliate_id: str = typer.Argument(..., help="The affiliate."),
    month: str = typer.Option(..., "--month", help="YYYY-MM (UTC)."),
    fmt: str = typer.Option("table", "--format", help="table | csv | json"),
) -> None:
    """An affiliate's month, per currency: opening balance, accruals, reversals, clawbacks,
    approvals (and what they made payable), adjustments to orders approved earlier, payouts
    (batches cut off in the month), closing balance, and the month's orders.

    closing = opening + approved + adjustments - payouts (§9 balances at the month's first day and the next's).
    """
    from streams.rules.payouts import month_bounds

    _format(fmt, ("table", "csv", "json"))
    try:
        month_bounds(month)
    except ValueError as exc:
        raise _cli().fail(f"--month must be YYYY-MM, got {month!r}", 2) from exc
    with _clickhouse() as (execute, database, _config):
        found = statements_for(execute, database, affiliate_id, month)
    if fmt == "json":
        rows: list[dict[str, object]] = [
            {"affiliate_id": s.affiliate_id, "month": s.month, "currency": s.currency,
             **{f: (str(getattr(s, f)) if f != "approvals" else s.approvals)
                for f in STATEMENT_FIELDS},
             "orders": [_order_dict(o) for o in s.orders]} for s in found]
        _cli()._emit(rows, "json", lambda r: None)
    elif fmt == "csv":
        # One row per order, with its month's summary in the first columns.
        flat: list[dict[str, object]] = [{"affiliate_id": s.affiliate_id, "month": s.month, "currency": s.currency,
                 "line": "summary", **{f: str(getattr(s, f)) for f in STATEMENT_FIELDS}}
                for s in found]
        flat += [{"affiliate_id": s.affiliate_id, "month": s.month, "currency": s.currency,
                  "line": "order", **_order_dict(o)} for s in found for o in s.orders]
        buffer = io.StringIO()
        fields = ["affiliate_id", "month", "currency", "line", *STATEMENT_FIELDS,
                  "order_id", "first_ts", "accrued", "net", "state"]
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(flat)
        typer.echo(buffer.getvalue(), nl=False)
    else:
        if not found:
            out.print(f"{affiliate_id}: no facts or payouts until the end of {month}")
        for s in found:
            summary = Table(title=f"{affiliate_id} {month} {s.currency}", show_header=False)
            summary.add_column("", no_wrap=True)
            summary.add_column("", justify="right")
            for name in STATEMENT_FIELDS:
                summary.add_row(name.replace("_", " "), str(getattr(s, name)))
            out.print(summary)
            orders = Table(title=f"orders of {month}")
            for column in ("order_id", "first_ts", "accrued", "net", "state"):
                orders.add_column(column)
            for o in s.orders:
                orders.add_row(*(str(v) for v in _order_dict(o).values()))
            out.print(orders)


def _order_dict(order: Any) -> dict[str, object]:
    return {"order_id": order.order_id,
            "first_ts": order.first_ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "accrued": str(order.accrued), "net": str(order.net), "state": order.state}


def register(app: typer.Typer) -> None:
    """Add `payouts` and `statement` to the `attribution` app."""
    app.add_typer(payouts_app, name="payouts")
    app.command("statement")(statement)
