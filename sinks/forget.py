"""The ClickHouse half of `attribution forget --customer ID`: erase one customer's identifiers,
keep the money facts, and write down that it was done.

What a customer leaves in ClickHouse, and what becomes of it:

- `attributed_orders.customer_id` of their orders, and `visitor_id` wherever it is one of the
  visitor ids those orders were placed as (other customers' orders on a shared browser included);
- `clicks.visitor_id` of those visitors and `clicks.session_id` of their sessions;
- the customer id where a text mentions it as a word: `abuse_flags.detail` ("customer X is
  affiliate A's own customer account") and the reviewers' `reviews.note`.

Each becomes a tombstone, `forgotten:` + the keyed hash (PII_KEY) of what it replaces: one id
always gets the same one, so counts of distinct visitors, sessions and customers stay right, a
visitor's clicks still join its orders, and a second run finds nothing left to change. Amounts,
dates, affiliates, programs, codes, channels and `commission_facts` are not touched: the ledger
must still add up.

The changes are mutations (`ALTER TABLE … UPDATE`, which ClickHouse has since 18.16 for columns
outside the sorting and partition keys, as all of these are). They run in the background; `erase`
waits for them (`system.mutations.is_done`) and then checks that nothing matches any more.
A row written after a mutation was created is not rewritten by it: `forget_customer` says so
(`remaining`), and running the command again takes care of it.

The raw id is never printed, logged or stored here: the audit row (`privacy_audit`, one per run)
has its keyed hash. Executors are `sinks.migrate.Executor`s, so this runs on the native client
and on chdb alike; values go into the SQL as escaped literals.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from schemas.pii import keyed_hash

from .migrate import Executor

TOMBSTONE_PREFIX = "forgotten:"
AUDIT_TABLE = "privacy_audit"

#: Free-text columns that may name the customer: (table, column).
TEXT_MENTIONS = (("abuse_flags", "detail"), ("reviews", "note"))

#: Characters that continue an id (`cust-981`, `a.b@c`, `urn:x:1`): the customer id counts as
#: mentioned only where no such character touches it, so `cust-1` is not found in `cust-10`, and
#: never inside a tombstone (made only of them).
_ID_CHARACTERS = r"A-Za-z0-9_.@:\x{2d}"

#: How often `wait_for_mutations` looks at system.mutations.
POLL_SECONDS = 0.5


class ForgetError(Exception):
    """`forget` could not finish; what it did so far stays done, and running it again resumes."""


class MutationsPending(ForgetError):
    """The mutations did not finish in time. They go on in the background."""


def tombstone(identifier: str, key: bytes) -> str:
    """What replaces an identifier: `forgotten:h1:<HMAC-SHA256 of it under PII_KEY>`."""
    return TOMBSTONE_PREFIX + keyed_hash(identifier, key)


def is_tombstone(value: str) -> bool:
    return value.startswith(TOMBSTONE_PREFIX)


@dataclass(frozen=True)
class Subject:
    """A customer and the identifiers ClickHouse links to them."""

    customer_id: str
    order_ids: tuple[str, ...] = ()
    visitor_ids: tuple[str, ...] = ()
    session_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Erasure:
    """One table's mutation: `SET` assignments for the rows `WHERE` selects."""

    table: str
    assignments: tuple[tuple[str, str], ...]  # (column, SQL expression)
    where: str

    def count_sql(self, database: str) -> str:
        return f"SELECT count() FROM {database}.{self.table} WHERE {self.where}"

    def mutation_sql(self, database: str) -> str:
        sets = ", ".join(f"{column} = {expression}" for column, expression in self.assignments)
        return f"ALTER TABLE {database}.{self.table} UPDATE {sets} WHERE {self.where}"


@dataclass
class Outcome:
    """What one run found and did. `outcome`: `erased`; `already_forgotten` (nothing left, and
    rows carry the customer's tombstone); `nothing_found` (an unknown customer); `incomplete`."""

    subject_hash: str
    orders: int = 0
    visitors: int = 0
    state_records: int = 0  # forget records published to visitor-events
    rows: dict[str, int] = field(default_factory=dict)  # rows changed, per table
    remaining: dict[str, int] = field(default_factory=dict)  # rows still matching afterwards
    outcome: str = "nothing_found"

    @property
    def rows_affected(self) -> int:
        return sum(self.rows.values())


# --- finding -------------------------------------------------------------------------------


def find_subject(execute: Executor, database: str, customer_id: str) -> Subject:
    """The customer's orders, the visitor ids they ordered as, and those visitors' sessions.

    Ids already tombstoned (a visitor shared with a customer forgotten before) are left out.
    """
    orders = execute(
        f"SELECT DISTINCT order_id, visitor_id FROM {database}.attributed_orders "
        f"WHERE customer_id = {quote(customer_id)}"
    )
    order_ids = tuple(sorted({str(o) for o, _ in orders}))
    visitor_ids = tuple(sorted({str(v) for _, v in orders if v and not is_tombstone(str(v))}))
    session_ids: tuple[str, ...] = ()
    if visitor_ids:
        sessions = execute(
            f"SELECT DISTINCT session_id FROM {database}.clicks "
            f"WHERE visitor_id IN {quote_list(visitor_ids, '(', ')')} AND session_id != ''"
        )
        session_ids = tuple(sorted({str(s) for (s,) in sessions if not is_tombstone(str(s))}))
    return Subject(customer_id, order_ids, visitor_ids, session_ids)


# --- planning (pure) -----------------------------------------------------------------------


def plan_erasures(subject: Subject, key: bytes, tables: set[str]) -> list[Erasure]:
    """The mutations that replace the subject's identifiers by tombstones, for the `tables` that
    exist. Re-planned on a second run they select nothing: tombstones never match an id."""
    customer = quote(subject.customer_id)
    customer_tombstone = tombstone(subject.customer_id, key)
    visitors = _Replacement("visitor_id", subject.visitor_ids, key)
    sessions = _Replacement("session_id", subject.session_ids, key)
    erasures = []
    if "attributed_orders" in tables:
        erasures.append(Erasure(
            "attributed_orders",
            (("customer_id",
              f"if(customer_id = {customer}, {quote(customer_tombstone)}, customer_id)"),)
            + visitors.assignments,
            " OR ".join([f"customer_id = {customer}", *visitors.conditions]),
        ))
    if "clicks" in tables and (subject.visitor_ids or subject.session_ids):
        erasures.append(Erasure("clicks", visitors.assignments + sessions.assignments,
                                " OR ".join(visitors.conditions + sessions.conditions)))
    mention = quote(mention_pattern(subject.customer_id))
    replacement = quote(r"\1" + customer_tombstone + r"\2")
    for table, column in TEXT_MENTIONS:
        if table in tables:
            # Twice: one pass cannot replace two mentions that share the character between them.
            once = f"replaceRegexpAll({column}, {mention}, {replacement})"
            erasures.append(Erasure(
                table, ((column, f"replaceRegexpAll({once}, {mention}, {replacement})"),),
                f"match({column}, {mention})",
            ))
    return erasures


@dataclass(frozen=True)
class _Replacement:
    """Every value of `column` in `values` becomes its tombstone (one `transform` call)."""

    column: str
    values: tuple[str, ...]
    key: bytes

    @property
    def assignments(self) -> tuple[tuple[str, str], ...]:
        if not self.values:
            return ()
        tombstones = [tombstone(v, self.key) for v in self.values]
        return ((self.column, f"transform({self.column}, {quote_list(self.values)}, "
                              f"{quote_list(tombstones)}, {self.column})"),)

    @property
    def conditions(self) -> list[str]:
        return [f"{self.column} IN {quote_list(self.values, '(', ')')}"] if self.values else []


def mention_pattern(identifier: str) -> str:
    """An re2 pattern for `identifier` as a word of a text (see `_ID_CHARACTERS`); groups 1 and 2
    are the characters around it, kept by the replacement."""
    escaped = "".join(c if c.isascii() and c.isalnum() else
                      (f"\\x{{{ord(c):02x}}}" if c.isascii() else c) for c in identifier)
    return f"(^|[^{_ID_CHARACTERS}]){escaped}($|[^{_ID_CHARACTERS}])"


def quote(value: str) -> str:
    """A ClickHouse string literal."""
    return "'" + value.translate(_ESCAPES) + "'"


_ESCAPES = str.maketrans({"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t",
                          "\0": "\\0"})


def quote_list(values: Sequence[str], opening: str = "[", closing: str = "]") -> str:
    return opening + ", ".join(quote(v) for v in values) + closing


# --- doing ---------------------------------------------------------------------------------


def existing_tables(execute: Executor, database: str) -> set[str]:
    return {str(name) for (name,) in execute(
        f"SELECT name FROM system.tables WHERE database = {quote(database)}")}


def count_matching(execute: Executor, database: str, erasures: list[Erasure]) -> dict[str, int]:
    return {e.table: int(str(execute(e.count_sql(database))[0][0])) for e in erasures}


def erase(execute: Executor, database: str, erasures: list[Erasure], *, timeout: float,
          progress: Callable[[str], None] = lambda _: None) -> dict[str, int]:
    """Run the mutations of the erasures that select rows and wait for them; rows per table."""
    rows = {table: n for table, n in count_matching(execute, database, erasures).items() if n}
    for erasure in erasures:
        if erasure.table in rows:
            progress(f"{erasure.table}: replacing identifiers in {rows[erasure.table]} rows")
            execute(erasure.mutation_sql(database))
    if rows:
        wait_for_mutations(execute, database, sorted(rows), timeout=timeout, progress=progress)
    return rows


def wait_for_mutations(execute: Executor, database: str, tables: Sequence[str], *,
                       timeout: float, progress: Callable[[str], None] = lambda _: None,
                       sleep: Callable[[float], None] = time.sleep,
                       clock: Callable[[], float] = time.monotonic) -> None:
    """Until every mutation of `tables` is done, reporting progress when it changes; raises
    `MutationsPending` after `timeout` seconds (ClickHouse 18.16 does not say why one is stuck:
    its server log does)."""
    deadline = clock() + timeout
    last = ""
    while True:
        [(mutations, parts)] = execute(
            f"SELECT count(), sum(parts_to_do) FROM system.mutations "
            f"WHERE database = {quote(database)} AND table IN {quote_list(tables, '(', ')')} "
            f"AND is_done = 0")
        mutations, parts = int(str(mutations)), int(str(parts or 0))
        if not mutations:
            return
        state = f"waiting for {mutations} mutation(s) of {', '.join(tables)}: {parts} part(s) to do"
        if state != last:
            progress(state)
            last = state
        if clock() >= deadline:
            raise MutationsPending(
                f"{mutations} mutation(s) of {', '.join(tables)} not done after {timeout:g} s "
                f"({parts} part(s) to do); they go on in the background (system.mutations)")
        sleep(POLL_SECONDS)


@dataclass(frozen=True)
class AuditRow:
    audit_id: str
    ts: datetime
    subject_hash: str
    tables: tuple[str, ...]
    rows: tuple[int, ...]
    visitors: int
    orders: int
    state_records: int
    requested_by: str
    outcome: str
    action: str = "forget"

    COLUMNS = ("audit_id", "ts", "action", "subject_hash", "tables_touched", "table_rows",
               "rows_affected", "visitors", "orders", "state_records", "requested_by", "outcome")

    def values(self) -> tuple[object, ...]:
        return (self.audit_id, self.ts.astimezone(timezone.utc).replace(tzinfo=None, microsecond=0),
                self.action, self.subject_hash, list(self.tables), list(self.rows),
                sum(self.rows), self.visitors, self.orders, self.state_records,
                self.requested_by, self.outcome)


def record_audit(execute: Executor, database: str, row: AuditRow) -> None:
    execute(f"INSERT INTO {database}.{AUDIT_TABLE} ({', '.join(AuditRow.COLUMNS)}) VALUES",
            [row.values()])


def _tombstoned_orders(execute: Executor, database: str, customer_id: str, key: bytes) -> int:
    [(count,)] = execute(f"SELECT count() FROM {database}.attributed_orders "
                         f"WHERE customer_id = {quote(tombstone(customer_id, key))}")
    return int(str(count))


# --- the whole run -------------------------------------------------------------------------


def forget_customer(
    execute: Executor,
    database: str,
    customer_id: str,
    key: bytes,
    *,
    requested_by: str,
    forget_state: Callable[[tuple[str, ...]], int],
    timeout: float,
    progress: Callable[[str], None] = lambda _: None,
) -> Outcome:
    """Find, tell the worker, erase, check, audit. Raises `ForgetError` (after the audit row)
    when the worker's state could not be told or the mutations did not finish.

    `forget_state(visitor_ids)` publishes the forget records and returns how many the broker did
    not acknowledge. It runs before anything in ClickHouse changes: should it fail, the visitor
    ids are still there for the next run to find.
    """
    tables = existing_tables(execute, database)
    if AUDIT_TABLE not in tables or "attributed_orders" not in tables:
        raise ForgetError(f"{database} has no {AUDIT_TABLE} table: run `attribution db migrate`")
    outcome = Outcome(subject_hash=keyed_hash(customer_id, key))
    subject = find_subject(execute, database, customer_id)
    outcome.orders, outcome.visitors = len(subject.order_ids), len(subject.visitor_ids)
    erasures = plan_erasures(subject, key, tables)
    failure: ForgetError | None = None
    try:
        if subject.visitor_ids:
            progress(f"telling the worker to forget {len(subject.visitor_ids)} visitor(s)")
            unacknowledged = forget_state(subject.visitor_ids)
            if unacknowledged:
                raise ForgetError(f"{unacknowledged} of {len(subject.visitor_ids)} forget records "
                                  "were not acknowledged by the broker; nothing was erased")
            outcome.state_records = len(subject.visitor_ids)
        outcome.rows = erase(execute, database, erasures, timeout=timeout, progress=progress)
        outcome.remaining = {t: n for t, n in count_matching(execute, database, erasures).items() if n}
    except ForgetError as exc:
        failure = exc
    if failure is not None or outcome.remaining:
        outcome.outcome = "incomplete"
    elif outcome.rows or outcome.state_records:
        outcome.outcome = "erased"
    elif _tombstoned_orders(execute, database, customer_id, key):
        outcome.outcome = "already_forgotten"
    tables_touched = tuple(sorted(outcome.rows))
    record_audit(execute, database, AuditRow(
        audit_id=uuid.uuid4().hex, ts=datetime.now(timezone.utc), subject_hash=outcome.subject_hash,
        tables=tables_touched, rows=tuple(outcome.rows[t] for t in tables_touched),
        visitors=outcome.visitors, orders=outcome.orders, state_records=outcome.state_records,
        requested_by=requested_by, outcome=outcome.outcome,
    ))
    if failure is not None:
        raise failure
    return outcome

