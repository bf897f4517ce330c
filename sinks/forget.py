"""The ClickHouse half of `attribution forget --customer ID`: erase one customer's identifiers,
keep the money facts, and write down that it was done.

What a customer leaves in ClickHouse, and what becomes of it:

- `attributed_orders.customer_id` of their orders, and `visitor_id` wherever it is one of the
  visitor ids those orders were placed as (other customers' orders on a shared browser included);
- `clicks.visitor_id` of those visitors, and `clicks.session_id` of their sessions;
- the customer id where a text names it as a word: `abuse_flags.detail` ("customer X is
  affiliate A's own customer account") and the reviewers' `reviews.note`.

Each becomes a tombstone, `forgotten:` + the keyed hash (PII_KEY) of what it replaces: one id
always gets the same one, so counts of distinct visitors, sessions and customers stay right, a
visitor's clicks still join its orders, and a second run finds nothing left to change. Amounts,
dates, affiliates, programs, codes, channels and `commission_facts` are not touched: the ledger
must still add up.

No raw id is ever written into SQL text. ClickHouse keeps the text of every mutation on disk
(`system.mutations`, the last 100 per table), and may log queries (`system.query_log`, a server
log at debug level): an erasure that wrote the ids there would keep them. So the ids travel as
data, into a temporary table of the session (`forget_ids`), queries select by it, and the
mutations select rows by their sorting key (`order_id`, `event_id`) and set values computed
here (`transform(key, [keys], [new values], column)`). Mutations (`ALTER TABLE … UPDATE`, in
ClickHouse since 18.16 for columns outside the sorting and partition keys, as all of these are)
run in the background: `erase` waits for them (`system.mutations.is_done`), clicks and texts
first and `attributed_orders`, which links the customer to the visitors, last, so that a run
that stops half-way leaves the links for the next run to find. Afterwards `leftovers` checks that
nothing carries the ids any more (a row inserted after its mutation was created is not rewritten:
running the command again takes care of it).

The raw id is never printed, logged or stored here: the audit row (`privacy_audit`, one per run)
has its keyed hash. Executors are `sinks.migrate.Executor`s (one connection: the temporary table
lives in its session), so this runs on the native client and on chdb alike.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TypeVar

from schemas.pii import keyed_hash

from .migrate import Executor

TOMBSTONE_PREFIX = "forgotten:"
AUDIT_TABLE = "privacy_audit"
#: The session's temporary table of the ids being forgotten: (kind, id), kind `customer`,
#: `visitor` or `session`.
ID_TABLE = "forget_ids"

#: Free-text columns that may name the customer: (table, its sorting key, the column).
TEXT_MENTIONS = (("abuse_flags", ("order_id", "reason"), "detail"),
                 ("reviews", ("order_id", "review_id"), "note"))

#: Characters that continue an id (`cust-981`, `a.b@c`, `urn:x:1`): the customer id is mentioned
#: only where none of them touches it, so `cust-1` is not found in `cust-10`, nor in a tombstone.
_ID_CHARACTER = "A-Za-z0-9_.@:-"

#: The most keys and values one mutation carries, in bytes of SQL: far below ClickHouse's
#: max_query_size (256 KiB), whatever the ids' length (validation allows 256 characters).
MUTATION_BUDGET_BYTES = 64 * 1024

#: How often `wait_for_mutations` looks at system.mutations.
POLL_SECONDS = 0.5


class ForgetError(Exception):
    """`forget` could not finish; what it did so far stays done, and running it again resumes."""


class MutationsPending(ForgetError):
    """The mutations did not finish in time. They go on in the background."""


class SchemaMissing(ForgetError):
    """The database lacks the tables `forget` needs (nothing was done, nor audited)."""


def tombstone(identifier: str, key: bytes) -> str:
    """What replaces an identifier: `forgotten:h1:<HMAC-SHA256 of it under PII_KEY>`."""
    return TOMBSTONE_PREFIX + keyed_hash(identifier, key)


def is_tombstone(value: str) -> bool:
    return value.startswith(TOMBSTONE_PREFIX)


# --- what the customer left --------------------------------------------------------------------


@dataclass(frozen=True)
class OrderRow:
    order_id: str
    visitor_id: str
    customer_id: str


@dataclass(frozen=True)
class ClickRow:
    event_id: str
    visitor_id: str
    session_id: str


@dataclass(frozen=True)
class Mention:
    """A text that names the customer: its row's sorting key, and the text."""

    table: str
    key: tuple[str, ...]
    text: str


@dataclass(frozen=True)
class Subject:
    """A customer, and the rows of ClickHouse that carry their identifiers."""

    customer_id: str
    visitor_ids: tuple[str, ...] = ()  # the visitor ids the customer's orders were placed as
    orders: tuple[OrderRow, ...] = ()  # the customer's orders, and other orders of those visitors
    clicks: tuple[ClickRow, ...] = ()  # those visitors' clicks, and others in their sessions
    mentions: tuple[Mention, ...] = ()

    @property
    def own_orders(self) -> tuple[str, ...]:
        return tuple(sorted({o.order_id for o in self.orders if o.customer_id == self.customer_id}))

    @property
    def session_ids(self) -> tuple[str, ...]:
        visitors = set(self.visitor_ids)
        return tuple(sorted({c.session_id for c in self.clicks if c.visitor_id in visitors
                             and c.session_id and not is_tombstone(c.session_id)}))


def find_subject(execute: Executor, database: str, customer_id: str,
                 tables: set[str]) -> Subject:
    """Every row that carries the customer's id, or a visitor or session id of theirs.

    Loads the ids into the session's `forget_ids` (for `leftovers` too). Ids already tombstoned
    (a visitor shared with a customer forgotten before) are not the customer's any more.
    """
    _load_ids(execute, [("customer", customer_id)], fresh=True)
    own = execute(f"SELECT DISTINCT visitor_id FROM {database}.attributed_orders "
                  f"WHERE customer_id IN {_ids('customer')}")
    visitor_ids = tuple(sorted({str(v) for (v,) in own if v and not is_tombstone(str(v))}))
    _load_ids(execute, [("visitor", v) for v in visitor_ids])
    orders = tuple(OrderRow(str(o), str(v), str(c)) for o, v, c in execute(
        f"SELECT DISTINCT order_id, visitor_id, customer_id FROM {database}.attributed_orders "
        f"WHERE customer_id IN {_ids('customer')} OR visitor_id IN {_ids('visitor')}"))
    clicks: tuple[ClickRow, ...] = ()
    if visitor_ids and "clicks" in tables:
        clicks = tuple(ClickRow(str(e), str(v), str(s)) for e, v, s in execute(
            f"SELECT DISTINCT event_id, visitor_id, session_id FROM {database}.clicks "
            f"WHERE visitor_id IN {_ids('visitor')} OR session_id IN "
            f"(SELECT session_id FROM {database}.clicks "
            f"WHERE visitor_id IN {_ids('visitor')} AND session_id != '')"))
    subject = Subject(customer_id, visitor_ids, orders, clicks)
    _load_ids(execute, [("session", s) for s in subject.session_ids])
    mentions = tuple(_mentions(execute, database, customer_id, tables))
    return Subject(customer_id, visitor_ids, orders, clicks, mentions)


def _mentions(execute: Executor, database: str, customer_id: str,
              tables: set[str]) -> Iterator[Mention]:
    named = mention_pattern(customer_id)
    for table, key_columns, column in TEXT_MENTIONS:
        if table not in tables:
            continue
        # position() finds the id anywhere (one pass over the column); the pattern keeps words.
        rows = execute(
            f"SELECT DISTINCT {', '.join(key_columns)}, {column} FROM {database}.{table} "
            f"WHERE position({column}, (SELECT any(id) FROM {ID_TABLE} "
            f"WHERE kind = 'customer')) > 0")
        for *key, text in rows:
            if named.search(str(text)):
                yield Mention(table, tuple(str(k) for k in key), str(text))


def mention_pattern(identifier: str) -> re.Pattern[str]:
    """`identifier` as a word of a text (see `_ID_CHARACTER`)."""
    return re.compile(rf"(?<![{_ID_CHARACTER}]){re.escape(identifier)}(?![{_ID_CHARACTER}])")


def _load_ids(execute: Executor, ids: list[tuple[str, str]], *, fresh: bool = False) -> None:
    if fresh:
        execute(f"DROP TEMPORARY TABLE IF EXISTS {ID_TABLE}")
        execute(f"CREATE TEMPORARY TABLE {ID_TABLE} (kind String, id String) ENGINE = Memory")
    if ids:
        execute(f"INSERT INTO {ID_TABLE} (kind, id) VALUES", list(ids))


def _ids(kind: str) -> str:
    return f"(SELECT id FROM {ID_TABLE} WHERE kind = '{kind}')"


# --- the mutations (pure) ----------------------------------------------------------------------


@dataclass(frozen=True)
class Erasure:
    """One mutation: `SET` assignments for the rows `WHERE` selects by their sorting key."""

    table: str
    assignments: tuple[tuple[str, str], ...]  # (column, SQL expression)
    where: str

    def count_sql(self, database: str) -> str:
        return f"SELECT count() FROM {database}.{self.table} WHERE {self.where}"

    def mutation_sql(self, database: str) -> str:
        sets = ", ".join(f"{column} = {expression}" for column, expression in self.assignments)
        return f"ALTER TABLE {database}.{self.table} UPDATE {sets} WHERE {self.where}"


def plan_erasures(subject: Subject, key: bytes) -> list[Erasure]:
    """The mutations that put tombstones where the subject's identifiers are: clicks and texts
    first, attributed_orders last (see the module). No raw identifier is in their SQL."""
    visitors, sessions = set(subject.visitor_ids), set(subject.session_ids)
    erasures: list[Erasure] = []
    click_changes = [
        (c.event_id,
         tombstone(c.visitor_id, key) if c.visitor_id in visitors else None,
         tombstone(c.session_id, key) if c.session_id in sessions else None)
        for c in sorted(set(subject.clicks), key=lambda c: c.event_id)
    ]
    for clicks in _chunks(click_changes):
        erasures.append(_keyed_erasure("clicks", "event_id", {
            "visitor_id": [(e, v) for e, v, _ in clicks if v is not None],
            "session_id": [(e, s) for e, _, s in clicks if s is not None],
        }, [e for e, _, _ in clicks]))
    gone = tombstone(subject.customer_id, key)
    named = mention_pattern(subject.customer_id)
    for table, key_columns, column in TEXT_MENTIONS:
        rewritten = sorted({("\0".join(m.key), named.sub(gone, m.text))
                            for m in subject.mentions if m.table == table})
        row_key = "concat(" + ", '\\0', ".join(key_columns) + ")"
        for texts in _chunks(rewritten):
            erasures.append(_keyed_erasure(table, row_key, {column: texts}, [k for k, _ in texts]))
    order_changes = sorted({
        (o.order_id,
         tombstone(o.visitor_id, key) if o.visitor_id in visitors else None,
         gone if o.customer_id == subject.customer_id else None)
        for o in subject.orders
    }, key=lambda change: (change[0], change[1] or "", change[2] or ""))
    for orders in _chunks(order_changes):
        erasures.append(_keyed_erasure("attributed_orders", "order_id", {
            "visitor_id": [(o, v) for o, v, _ in orders if v is not None],
            "customer_id": [(o, c) for o, _, c in orders if c is not None],
        }, [o for o, _, _ in orders]))
    return erasures


def _keyed_erasure(table: str, row_key: str, new_values: dict[str, list[tuple[str, str]]],
                   keys: list[str]) -> Erasure:
    """Set each column to its new value on the rows whose `row_key` is listed with one."""
    assignments = tuple(
        (column, f"transform({row_key}, {quote_list([k for k, _ in pairs])}, "
                 f"{quote_list([v for _, v in pairs])}, {column})")
        for column, pairs in new_values.items() if pairs
    )
    return Erasure(table, assignments, f"{row_key} IN {quote_list(sorted(set(keys)), '(', ')')}")


_Change = TypeVar("_Change", bound=tuple[str | None, ...])


def _chunks(items: Sequence[_Change], budget: int = MUTATION_BUDGET_BYTES) -> Iterator[list[_Change]]:
    """`items` in runs whose SQL (each string twice at most, quoted) fits one mutation."""
    chunk: list[_Change] = []
    size = 0
    for item in items:
        item_size = sum(2 * len(part.encode()) + 8 for part in item if part)
        if chunk and size + item_size > budget:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += item_size
    if chunk:
        yield chunk


def quote(value: str) -> str:
    """A ClickHouse string literal."""
    return "'" + value.translate(_ESCAPES) + "'"


_ESCAPES = str.maketrans({"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t",
                          "\0": "\\0"})


def quote_list(values: Sequence[str], opening: str = "[", closing: str = "]") -> str:
    return opening + ", ".join(quote(v) for v in values) + closing


# --- doing -------------------------------------------------------------------------------------


def existing_tables(execute: Executor, database: str) -> set[str]:
    return {str(name) for (name,) in execute(
        f"SELECT name FROM system.tables WHERE database = {quote(database)}")}


def erase(execute: Executor, database: str, erasures: list[Erasure], *, timeout: float,
          progress: Callable[[str], None] = lambda _: None) -> dict[str, int]:
    """Run the mutations in order, each table's after the previous table's are done (see the
    module); rows changed per table."""
    rows: dict[str, int] = {}
    by_table: dict[str, list[Erasure]] = {}
    for erasure in erasures:
        by_table.setdefault(erasure.table, []).append(erasure)
    for table, mutations in by_table.items():
        counts = [int(str(execute(e.count_sql(database))[0][0])) for e in mutations]
        if not sum(counts):
            continue
        rows[table] = sum(counts)
        progress(f"{table}: replacing identifiers in {rows[table]} rows")
        for erasure, count in zip(mutations, counts):
            if count:
                execute(erasure.mutation_sql(database))
        wait_for_mutations(execute, database, [table], timeout=timeout, progress=progress)
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


def leftovers(execute: Executor, database: str, subject: Subject,
              tables: set[str]) -> dict[str, int]:
    """Rows that still carry the subject's ids after the erasure (by the ids in `forget_ids`)."""
    found = {
        "attributed_orders": execute(
            f"SELECT count() FROM {database}.attributed_orders "
            f"WHERE customer_id IN {_ids('customer')} OR visitor_id IN {_ids('visitor')}")[0][0],
    }
    if "clicks" in tables:
        found["clicks"] = execute(
            f"SELECT count() FROM {database}.clicks "
            f"WHERE visitor_id IN {_ids('visitor')} OR session_id IN {_ids('session')}")[0][0]
    for mention in _mentions(execute, database, subject.customer_id, tables):
        found[mention.table] = int(str(found.get(mention.table, 0))) + 1
    return {table: int(str(n)) for table, n in found.items() if int(str(n))}


# --- the audit -----------------------------------------------------------------------------------


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


# --- the whole run -----------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one run found and did. `outcome`: `erased`; `already_forgotten` (nothing left, and
    rows carry the customer's tombstone); `nothing_found` (an unknown customer); `incomplete`."""

    subject_hash: str
    orders: int = 0
    visitors: int = 0
    state_records: int = 0  # forget records published to visitor-events
    rows: dict[str, int] = field(default_factory=dict)  # rows changed, per table
    remaining: dict[str, int] = field(default_factory=dict)  # rows still carrying the ids
    outcome: str = "nothing_found"

    @property
    def rows_affected(self) -> int:
        return sum(self.rows.values())


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
    """Find, tell the worker, erase, check, audit. Raises `SchemaMissing` before anything, and
    `ForgetError` (after the audit row) when the worker's state could not be told or the
    mutations did not finish.

    `forget_state(visitor_ids)` publishes the forget records and returns how many the broker did
    not acknowledge. It runs before anything in ClickHouse changes: should it fail, the visitor
    ids are still there for the next run to find.
    """
    tables = existing_tables(execute, database)
    if AUDIT_TABLE not in tables or "attributed_orders" not in tables:
        raise SchemaMissing(f"{database} has no {AUDIT_TABLE} table: run `attribution db migrate`")
    outcome = Outcome(subject_hash=keyed_hash(customer_id, key))
    subject = find_subject(execute, database, customer_id, tables)
    outcome.orders, outcome.visitors = len(subject.own_orders), len(subject.visitor_ids)
    failure: ForgetError | None = None
    try:
        if subject.visitor_ids:
            progress(f"telling the worker to forget {len(subject.visitor_ids)} visitor(s)")
            unacknowledged = forget_state(subject.visitor_ids)
            if unacknowledged:
                raise ForgetError(f"{unacknowledged} of {len(subject.visitor_ids)} forget records "
                                  "were not acknowledged by the broker; nothing was erased")
            outcome.state_records = len(subject.visitor_ids)
        outcome.rows = erase(execute, database, plan_erasures(subject, key), timeout=timeout,
                             progress=progress)
        outcome.remaining = leftovers(execute, database, subject, tables)
    except ForgetError as exc:
        failure = exc
    if failure is not None or outcome.remaining:
        outcome.outcome = "incomplete"
    elif outcome.rows or outcome.state_records:
        outcome.outcome = "erased"
    elif _tombstoned_orders(execute, database, customer_id, key):
        outcome.outcome = "already_forgotten"
    touched = tuple(sorted(outcome.rows))
    record_audit(execute, database, AuditRow(
        audit_id=uuid.uuid4().hex, ts=datetime.now(timezone.utc), subject_hash=outcome.subject_hash,
        tables=touched, rows=tuple(outcome.rows[t] for t in touched), visitors=outcome.visitors,
        orders=outcome.orders, state_records=outcome.state_records, requested_by=requested_by,
        outcome=outcome.outcome,
    ))
    if failure is not None:
        raise failure
    return outcome


def _tombstoned_orders(execute: Executor, database: str, customer_id: str, key: bytes) -> int:
    [(count,)] = execute(f"SELECT count() FROM {database}.attributed_orders "
                         f"WHERE customer_id = {quote(tombstone(customer_id, key))}")
    return int(str(count))
