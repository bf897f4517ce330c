"""The Faust app: topics, tables and agents wired to the stages. No business logic here.

Error policy (faust acks an event whose agent raised, i.e. silently skips it, so nothing may
escape an agent):
- invalid input -> dead-letters (in the ingest stage), never an exception;
- transient failure (ClickHouse down) -> retried in place by the sink, the agent just waits;
- a rebalance or shutdown while a batch is in flight -> the batch is dropped before its next
  effect and commits nothing (`streams.offsets`: Faust's acks never decide what is committed);
- anything else -> fatal: logged, then the process exits at once *without* committing offsets,
  so the batch is processed again after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Awaitable, Callable

import faust

from schemas.config import (
    ABUSE_FLAGS_TOPIC,
    CODE_EVENTS_TOPIC,
    DEAD_LETTERS_TOPIC,
    LEDGER_EVENTS_TOPIC,
    REVIEWS_TOPIC,
    STATE_TABLES,
    VISITOR_EVENTS_TOPIC,
    Config,
)
from sinks.clickhouse import RowSink
from sinks.metrics import METRICS
from sinks.rows import TABLES, share_row

from .barrier import click_barrier, order_barrier
from . import fastpath
from .codes import CodeStage, LookAhead
from .forwarding import Forwarder
from .kafka_meta import GroupOffsets
from .lag import run_lag_reporter
from .offsets import RESEEK_SECONDS, OffsetLedger, Rebalanced, check_fence, install
from .watchdog import watch_partitions
from .ingest import Validator, forward
from .join import JoinStage
from .ledger import LedgerStage
from .reference import ReferenceReader

log = logging.getLogger(__name__)

#: Exit status of a worker stopped by an error it must not skip past (EX_SOFTWARE).
FATAL_EXIT_CODE = 70
#: Records per consumer fetch (Faust's default is unbounded). Faust's conductor hands fetched
#: records to each agent's queue; when a queue is *full* it awaits room, which blocks delivery to
#: every agent of the worker. The orders agent legitimately holds its queue at the click barrier
#: until clicks (delivered by the same conductor) are committed, so a full orders queue would
#: deadlock the worker: seen after a kill -9 restart with a large backlog. Faust pauses fetching a
#: partition once its queue passes 80 % (1/1.25) of `stream_buffer_maxsize`; with fetches bounded
#: to this many records, the 20 % headroom above that mark is never exhausted.
MAX_POLL_RECORDS = 500
#: Queue size per agent: >= 5 x MAX_POLL_RECORDS leaves 20 % headroom >= one fetch (see above).
STREAM_BUFFER_MAXSIZE = 10 * MAX_POLL_RECORDS
#: Pending table (changelog) writes before Faust holds back fetched records (see create_app).
PRODUCER_BUFFER_MESSAGES = 10_000
#: RocksDB per table partition (3 tables x ATTRIBUTION_PARTITIONS databases per worker). Faust's
#: defaults let *each* database cache up to 2 GiB of blocks and 3 x 64 MiB of memtables, so a
#: worker's memory grew with the state it had read. These bound a database at about 16 MiB of
#: memory (two 4 MiB memtables and an 8 MiB block cache); the state itself stays on disk, and the
#: OS page cache serves hot blocks. Measured in the benchmark (README).
TABLE_STORE_OPTIONS = {
    "write_buffer_size": 4 * 1024 * 1024,
    "max_write_buffer_number": 2,
    "block_cache_size": 8 * 1024 * 1024,
    "block_cache_compressed_size": 1 * 1024 * 1024,
}
#: Commit offsets every 0.25 s: the barriers count the group's commits for partitions other
#: workers own (this worker's own forwards count at once, see barrier.py), so this bounds the
#: extra order latency with several workers; Faust's default 2.8 s would eat the whole 2 s
#: latency budget. A commit is one small request per worker.
COMMIT_INTERVAL_SECONDS = 0.25


def fatal(exc: BaseException) -> None:
    log.critical("fatal error, stopping without committing offsets: %r", exc, exc_info=exc)
    logging.shutdown()
    os._exit(FATAL_EXIT_CODE)


async def flush_in_thread(sink: RowSink) -> None:
    """ClickHouse I/O is blocking: keep it off the event loop so Kafka heartbeats go on."""
    check_fence()
    await asyncio.to_thread(sink.flush)


def create_app(config: Config) -> faust.App:
    bootstrap = ";".join(f"kafka://{host.strip()}" for host in config.kafka_bootstrap.split(","))
    # One directory per app id: workers with different prefixes never share RocksDB files.
    state_dir = Path(config.state_dir).resolve() / config.app_id
    state_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        config.app_id,
        broker=bootstrap,
        store="rocksdb://",
        datadir=str(state_dir),
        topic_partitions=config.partitions,
        topic_replication_factor=config.replication_factor,
        topic_allow_declare=True,
        web_enabled=False,
        broker_commit_interval=COMMIT_INTERVAL_SECONDS,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_linger=0.005,
        broker_max_poll_records=MAX_POLL_RECORDS,
        stream_buffer_maxsize=max(STREAM_BUFFER_MAXSIZE, config.batch_size * 2),
        table_standby_replicas=0,
        # 10 s: after a crash the group waits this long for the dead member before rebalancing;
        # heartbeats run on their own task, so a ClickHouse outage does not expire the session.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=3.0,
        autodiscover=False,
    )

    # Table writes go through Faust's producer buffer, and Faust stops handing out *any* fetched
    # record while that buffer holds more than `max_messages` (100 by default): a join batch
    # writing a few thousand visitors' touches froze every stage until they were sent. Let the
    # buffer hold a couple of batches; Faust still flushes it before every commit.
    app.producer.buffer.max_messages = max(PRODUCER_BUFFER_MESSAGES, 2 * config.batch_size)

    def raw_topic(name: str) -> Any:
        return app.topic(
            config.topic(name), key_type=bytes, value_type=bytes,
            key_serializer="raw", value_serializer="raw",
        )

    clicks, shares, orders, refunds = (raw_topic(n) for n in ("clicks", "shares", "orders", "refunds"))
    reviews = raw_topic(REVIEWS_TOPIC)
    dead_letters = raw_topic(DEAD_LETTERS_TOPIC)
    visitor_events = raw_topic(VISITOR_EVENTS_TOPIC)
    code_events = raw_topic(CODE_EVENTS_TOPIC)
    ledger_events = raw_topic(LEDGER_EVENTS_TOPIC)
    abuse_flags = raw_topic(ABUSE_FLAGS_TOPIC)

    touches, order_ledgers, code_redemptions = (
        app.Table(
            name, default=None, partitions=config.partitions,
            key_type=bytes, value_type=bytes, options=dict(TABLE_STORE_OPTIONS),
        )
        for name in STATE_TABLES  # their changelog topics are created with the others (topics.py)
    )

    visitor_events_name = config.topic(VISITOR_EVENTS_TOPIC)
    code_events_name = config.topic(CODE_EVENTS_TOPIC)
    ledger_events_name = config.topic(LEDGER_EVENTS_TOPIC)
    reference = ReferenceReader(config)
    group_offsets = GroupOffsets(config.kafka_bootstrap, config.app_id)
    commit_ledger = OffsetLedger(
        group_offsets, interrupted=lambda: bool(app.rebalancing or app.should_stop),
        owned=lambda: app.consumer.assignment(),
    )
    barrier = click_barrier(config.kafka_bootstrap, config.app_id, config.topic("clicks"),
                            commit_ledger)

    def sink() -> RowSink:
        return RowSink(config.clickhouse, TABLES)

    forwarder = Forwarder(app)
    join_stage = JoinStage(
        visitor_events_name, touches, forwarder, ledger_events_name, code_events_name, sink(),
        lambda: reference.snapshot, flush_in_thread,
    )
    code_barrier = order_barrier(config.kafka_bootstrap, config.app_id, config.topic("orders"),
                                 visitor_events_name, commit_ledger)
    look_ahead = LookAhead(config.kafka_bootstrap, code_events_name)
    code_stage = CodeStage(
        code_events_name, code_redemptions, forwarder, ledger_events_name,
        lambda: reference.snapshot, code_barrier, look_ahead,
    )
    ledger_stage = LedgerStage(
        ledger_events_name, order_ledgers, sink(), abuse_flags, flush_in_thread,
        assigned=lambda: {tp.partition for tp in app.consumer.assignment()
                          if tp.topic == ledger_events_name},
    )
    shares_sink = sink()

    def batches(stream: Any) -> Any:
        return stream.take_events(config.batch_size, within=config.batch_seconds)

    async def seek(tp: Any, offset: int) -> None:
        """Send the consumer back to `offset` of `tp`, in the consumer's own thread (a seek from
        the event loop's thread sometimes did not take effect)."""
        await app.consumer.seek_wait({tp: offset})

    def guarded(
        name: str, body: Callable[[Any], Awaitable[None]], sinks: Sequence[RowSink] = (),
    ) -> Callable[[Any], Awaitable[None]]:
        """Run `body` for every batch, on the events the commit ledger admits, and mark it done
        after; a batch fenced by a rebalance is dropped with its pending rows; any other
        exception is fatal (see the module docstring)."""

        async def agent(stream: Any) -> None:
            await reference.ready.wait()
            try:
                async for events in batches(stream):
                    fence = commit_ledger.fence()
                    token = commit_ledger.enter(fence)
                    try:
                        admitted = await commit_ledger.admit(events, seek, fence)
                        if admitted:
                            await body(admitted)
                        commit_ledger.done(admitted, fence)  # only now may its offsets be committed
                    except Rebalanced:
                        METRICS.batches_dropped.labels(name).inc()
                        dropped = sum(sink.discard() for sink in sinks)
                        log.info("%s: batch of %d events dropped (%d rows not written): a rebalance"
                                 " started; the partitions' owners read it again", name, len(events),
                                 dropped)
                    finally:
                        commit_ledger.leave(token)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - must not be acked past
                fatal(exc)

        agent.__name__ = agent.__qualname__ = name.replace("-", "_")
        return agent

    click_validator = Validator("clicks", "click", dead_letters)
    share_validator = Validator("shares", "share", dead_letters)
    order_validator = Validator("orders", "order", dead_letters)
    refund_validator = Validator("refunds", "refund", dead_letters)
    review_validator = Validator("reviews", "review", dead_letters)

    async def ingest_clicks(events: Any) -> None:
        await forward(forwarder, visitor_events_name, await click_validator.split(events), "visitor_id")

    async def ingest_shares(events: Any) -> None:
        for item in await share_validator.split(events):
            shares_sink.add("shares", share_row(item.event))  # type: ignore[arg-type]
        await flush_in_thread(shares_sink)

    async def ingest_orders(events: Any) -> None:
        valid = await order_validator.split(events)
        if not valid:
            return
        METRICS.orders_waiting_for_clicks.set(len(valid))
        await barrier.wait()
        METRICS.orders_waiting_for_clicks.set(0)
        await forward(forwarder, visitor_events_name, valid, "visitor_id")

    async def ingest_refunds(events: Any) -> None:
        await forward(forwarder, ledger_events_name, await refund_validator.split(events), "order_id")

    async def ingest_reviews(events: Any) -> None:
        await forward(forwarder, ledger_events_name, await review_validator.split(events), "order_id")

    app.agent(clicks, name="ingest-clicks")(guarded("ingest-clicks", ingest_clicks))
    app.agent(shares, name="ingest-shares")(guarded("ingest-shares", ingest_shares, [shares_sink]))
    app.agent(orders, name="ingest-orders")(guarded("ingest-orders", ingest_orders))
    app.agent(refunds, name="ingest-refunds")(guarded("ingest-refunds", ingest_refunds))
    app.agent(reviews, name="ingest-reviews")(guarded("ingest-reviews", ingest_reviews))
    app.agent(visitor_events, name="join")(guarded("join", join_stage.process, [join_stage.sink]))
    app.agent(code_events, name="codes")(guarded("codes", code_stage.process))
    app.agent(ledger_events, name="ledger")(guarded("ledger", ledger_stage.process, [ledger_stage.sink]))

    stream_topics = {t.get_topic_name() for t in (
        clicks, shares, orders, refunds, reviews, visitor_events, code_events, ledger_events)}
    install(app.consumer, commit_ledger, stream_topics)
    fastpath.install(app.consumer)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def forget_revoked(app: Any, revoked: Any, **kwargs: Any) -> None:
        """After Faust committed what was done: batches from before this are fenced."""
        commit_ledger.revoked(revoked)

    @app.timer(interval=RESEEK_SECONDS)
    async def reseek_stalled_partitions() -> None:
        if not (app.rebalancing or app.should_stop):
            await commit_ledger.reseek_stalled(seek)

    @app.task
    async def read_reference() -> None:
        try:
            await reference.run()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001
            fatal(exc)

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def close_side_clients(app: Any, **kwargs: Any) -> None:
        """The barriers' and the read-ahead's own Kafka clients (aiokafka logs unclosed ones)."""
        for client in (barrier, code_barrier, look_ahead, group_offsets):
            try:
                await client.stop()
            except Exception as exc:  # noqa: BLE001 - shutting down anyway
                log.debug("closing %r failed: %r", client, exc)

    @app.task
    async def watch_fetched_partitions() -> None:
        await watch_partitions(app)

    @app.task
    async def report_consumer_lag() -> None:
        # Telemetry only: run_lag_reporter logs and retries its own errors and never raises.
        await run_lag_reporter(config, [t.get_topic_name() for t in (
            clicks, shares, orders, refunds, reviews, visitor_events, code_events, ledger_events)])

    return app
