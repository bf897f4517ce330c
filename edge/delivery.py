"""Durable delivery of the edge's events into Kafka (contract §8): a caller's `deliver()` returns
only once every one of its events is acknowledged by Kafka (acks=all) or fsynced to the spool.

Events of many concurrent requests are gathered for a few milliseconds and sent together as
batched records (§2): per topic and partition (murmur2 of the key, as `attribution produce`
places them), JSON arrays of < 900 KB and at most 10,000 events. One group is in flight at a time,
so the next one gathers while Kafka acknowledges, and per-partition order is the order of calls.

When Kafka does not acknowledge (unreachable, timed out), the group's events go to the spool and
the edge stays in spool mode: every later event is spooled too, behind them, until the replay task
has sent the whole spool, in order; only then does it write to Kafka directly again. An error that
sending again cannot fix (a topic the producer may not write) is the caller's and is raised.

Never drop an event once a caller was told it is durable; duplicates on replay are allowed (the
pipeline deduplicates by event_id, orders by order_id).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

from schemas.config import Config
from streams import kafka_clients
from streams.publish import partition_of

from .metrics import SPOOL_BYTES, SPOOL_EVENTS, SPOOL_OLDEST_AGE
from .spool import EdgeEvent, Spool, SpoolFull

__all__ = ["Delivery", "EdgeEvent", "SpoolFull", "MAX_EVENT_BYTES"]

log = logging.getLogger(__name__)

#: §2: a batched record's array stays under 900 KB (the broker's default limit is 1 MB) and
#: holds at most 10,000 events.
MAX_RECORD_BYTES = 900_000
MAX_RECORD_EVENTS = 10_000
#: An event larger than this can never be sent (its array would not fit a record).
MAX_EVENT_BYTES = MAX_RECORD_BYTES - 2
#: How long events gather before a group goes out: short, since every request waits for it.
LINGER_SECONDS = 0.005
#: A group goes out at once when this many events wait (so a burst does not wait the linger).
GROUP_EVENTS = 20_000
#: How long Kafka has to acknowledge a group before its events are spooled. aiokafka's default
#: request timeout (40 s) is longer than any client waits for an answer.
ACK_TIMEOUT_SECONDS = 5.0
#: Replay of the spool: first wait after a failed attempt, and the most it grows to.
REPLAY_BACKOFF_SECONDS = 0.5
REPLAY_BACKOFF_MAX_SECONDS = 5.0
#: Retry-After of a full spool: about a broker restart, after which replay frees room.
SPOOL_FULL_RETRY_AFTER_SECONDS = 30
#: How long a graceful stop keeps replaying the spool while Kafka takes it.
STOP_DRAIN_SECONDS = 30.0


class _Unsent(Exception):
    """Kafka did not acknowledge (transient): the events go to the spool."""


@dataclass
class _Call:
    events: Sequence[EdgeEvent]
    done: asyncio.Future[None]


@dataclass
class _Record:
    topic: str
    partition: int
    values: list[bytes] = field(default_factory=list)
    key: bytes = b""
    size: int = 1  # the array's "[" and "]" (commas counted per value)
    calls: set[int] = field(default_factory=set)  # indexes of the calls with events in it


@lru_cache(maxsize=262_144)  # one visitor's events come many at a time; murmur2 is pure Python
def _partition(key: bytes, partitions: tuple[int, ...]) -> int:
    return partition_of(key, list(partitions))


def _transient(error: BaseException) -> bool:
    """Sending again later may succeed (the broker unreachable or slow)."""
    if isinstance(error, (asyncio.TimeoutError, KafkaTimeoutError, KafkaConnectionError, OSError)):
        return True
    return isinstance(error, KafkaError) and bool(getattr(error, "retriable", False))


class Delivery:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.spool = Spool(config.edge_spool_dir, config.edge_spool_max_bytes)
        self._producer: AIOKafkaProducer | None = None
        self._partitions: dict[str, tuple[int, ...]] = {}
        self._pending: list[_Call] = []
        self._pending_events = 0
        self._wakeup = asyncio.Event()
        self._group_sent = asyncio.Event()
        #: True while events go to the spool (Kafka unreachable, or the spool not yet replayed).
        self._spooling = True
        self._kafka_back = asyncio.Event()  # set when replay should try now
        self._stopping = False
        #: Held while events are appended to the spool and while replay decides the spool is
        #: empty, so no event is spooled after that decision (it would wait behind newer ones).
        self._spool_lock = asyncio.Lock()
        self._busy = False  # a group is being sent
        self._flusher: asyncio.Task[None] | None = None
        self._replayer: asyncio.Task[None] | None = None

    # --- what the probes and the metrics read --------------------------------------------

    @property
    def ready(self) -> bool:
        """Kafka reachable, or the spool has room."""
        return not self._spooling or self.spool.has_room()

    @property
    def spooling(self) -> bool:
        return self._spooling

    @property
    def spool_bytes(self) -> int:
        return self.spool.bytes

    @property
    def spool_events(self) -> int:
        return self.spool.events

    @property
    def spool_oldest_age_seconds(self) -> float:
        return self.spool.oldest_age_seconds()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.spool.open)
        # Read at each scrape (one Delivery per edge process).
        SPOOL_EVENTS.set_function(lambda: self.spool.events)
        SPOOL_BYTES.set_function(lambda: self.spool.bytes)
        SPOOL_OLDEST_AGE.set_function(self.spool.oldest_age_seconds)
        if not self.spool.empty:
            log.info("the spool holds %d events (%d bytes) from before: replaying them",
                     self.spool.events, self.spool.bytes)
        await self._connect()
        self._spooling = True  # the replay task turns direct sending on once the spool is empty
        self._flusher = asyncio.create_task(self._flush_loop(), name="edge-delivery-flush")
        self._replayer = asyncio.create_task(self._replay_loop(), name="edge-delivery-replay")
        if self.spool.empty and self._producer is not None:
            self._spooling = False

    async def stop(self) -> None:
        """Send what is gathered, replay the spool while Kafka takes it, then close."""
        self._stopping = True
        while self._pending or self._busy:
            self._wakeup.set()
            self._group_sent.clear()
            await self._group_sent.wait()
        if self._spooling and self._producer is not None and not self.spool.empty:
            self._kafka_back.set()
            deadline = time.monotonic() + STOP_DRAIN_SECONDS
            while self._spooling and not self.spool.empty and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        for task in (self._flusher, self._replayer):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._producer is not None:
            try:
                await asyncio.wait_for(self._producer.stop(), ACK_TIMEOUT_SECONDS)
            except (asyncio.TimeoutError, KafkaError):
                log.warning("the Kafka producer did not stop cleanly")
            self._producer = None
        await asyncio.to_thread(self.spool.close)
        if not self.spool.empty:
            log.warning("stopped with %d events spooled under %s: the next start replays them",
                        self.spool.events, self.config.edge_spool_dir)

    async def _connect(self) -> bool:
        if self._producer is not None:
            return True
        producer = kafka_clients.aio_producer(
            self.config, acks="all", linger_ms=5, client_id="attribution-edge",
            request_timeout_ms=int(ACK_TIMEOUT_SECONDS * 1000),
            max_request_size=1024 * 1024,
            # One producer batch per partition may hold several records (aiokafka's 16 KiB
            # default would send each record of a group alone, one after the other).
            max_batch_size=1024 * 1024,
        )
        try:
            await asyncio.wait_for(producer.start(), ACK_TIMEOUT_SECONDS * 2)
        except BaseException as error:  # a stop() cancelling the replay task as well
            try:
                await asyncio.wait_for(producer.stop(), ACK_TIMEOUT_SECONDS)
            except (asyncio.TimeoutError, KafkaError, OSError):
                pass
            if not isinstance(error, (asyncio.TimeoutError, KafkaError, OSError)):
                raise
            log.warning("Kafka is not reachable (%s): events are spooled", error)
            return False
        self._producer = producer
        return True

    # --- delivering --------------------------------------------------------------------------

    async def deliver(self, events: Sequence[EdgeEvent]) -> None:
        """Return once every event is acknowledged by Kafka or fsynced to the spool.

        Raises SpoolFull (answer 503 with its retry_after), ValueError for an event too large
        to ever be sent, KafkaError for an error Kafka will keep giving (the caller's error).
        """
        if not events:
            return
        for event in events:
            if len(event.value) > MAX_EVENT_BYTES:
                raise ValueError(f"an event of {len(event.value)} bytes is over the "
                                 f"{MAX_EVENT_BYTES} a batched record can hold")
        if self._flusher is None:
            raise RuntimeError("Delivery.start() was not called")
        call = _Call(events, asyncio.get_running_loop().create_future())
        self._pending.append(call)
        self._pending_events += len(events)
        self._wakeup.set()
        await call.done

    async def _flush_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            if self._pending and self._pending_events < GROUP_EVENTS and not self._stopping:
                await asyncio.sleep(LINGER_SECONDS)
            self._wakeup.clear()
            group, self._pending, self._pending_events = self._pending, [], 0
            self._busy = bool(group)
            if group:
                try:
                    await self._send_group(group)
                except Exception as error:  # never leave a caller waiting
                    log.exception("delivering a group of events failed")
                    _fail(group, error)
            self._busy = False
            self._group_sent.set()
            if self._pending:
                self._wakeup.set()

    async def _send_group(self, group: list[_Call]) -> None:
        if not self._spooling:
            failed = await self._send_direct(group)
            if not failed:
                return
            group = [group[index] for index in sorted(failed)]
            if not self._spooling:
                self._spooling = True
                log.warning("Kafka did not acknowledge %d events: spooling from now on until it "
                            "is back", sum(len(call.events) for call in group))
                self._kafka_back.set()
        async with self._spool_lock:
            await self._spool_group(group)

    async def _spool_group(self, group: list[_Call]) -> None:
        written = await asyncio.to_thread(self.spool.append, [call.events for call in group])
        for call in group[:written]:
            _succeed(call)
        for call in group[written:]:
            if not call.done.done():
                call.done.set_exception(SpoolFull(SPOOL_FULL_RETRY_AFTER_SECONDS))

    async def _send_direct(self, group: list[_Call]) -> set[int]:
        """Send the group; resolve the calls all of whose events were acknowledged and fail
        those with an error of their own. Returns the indexes of the calls to spool."""
        producer = self._producer
        assert producer is not None
        try:
            records = await self._records([(index, call.events) for index, call in enumerate(group)])
        except Exception as error:
            if _transient(error):
                return set(range(len(group)))
            raise
        results = await _send_records(producer, records)
        unsent: set[int] = set()
        errors: dict[int, BaseException] = {}
        for record, result in zip(records, results):
            if result is None:
                continue
            if _transient(result):
                unsent |= record.calls
            else:
                for index in record.calls:
                    errors.setdefault(index, result)
        for index, call in enumerate(group):
            if index in errors:
                if not call.done.done():
                    call.done.set_exception(errors[index])
            elif index not in unsent:
                _succeed(call)
        return unsent - errors.keys()

    async def _records(self, batches: list[tuple[int, Sequence[EdgeEvent]]]) -> list[_Record]:
        """The batched records of these events, per topic and partition, in order."""
        open_records: dict[tuple[str, int], _Record] = {}
        records: list[_Record] = []
        for index, events in batches:
            for event in events:
                topic = self.config.topic(event.topic)
                partitions = await self._partitions_of(topic)
                partition = _partition(event.key, partitions)
                record = open_records.get((topic, partition))
                if record is None or (record.size + len(event.value) + 1 > MAX_RECORD_BYTES
                                      or len(record.values) >= MAX_RECORD_EVENTS):
                    record = _Record(topic, partition, key=event.key)
                    open_records[(topic, partition)] = record
                    records.append(record)
                record.values.append(event.value)
                record.size += len(event.value) + 1
                record.calls.add(index)
        return records

    async def _partitions_of(self, topic: str) -> tuple[int, ...]:
        partitions = self._partitions.get(topic)
        if partitions is None:
            assert self._producer is not None
            found = await asyncio.wait_for(self._producer.partitions_for(topic),
                                           ACK_TIMEOUT_SECONDS)
            if not found:
                raise KafkaTimeoutError(f"no partitions known for {topic}")
            partitions = self._partitions[topic] = tuple(sorted(found))
        return partitions

    # --- replaying the spool ------------------------------------------------------------------

    async def _replay_loop(self) -> None:
        backoff = REPLAY_BACKOFF_SECONDS
        while True:
            if not self._spooling:
                self._kafka_back.clear()
                await self._kafka_back.wait()
                continue
            try:
                if await self._replay_once():
                    backoff = REPLAY_BACKOFF_SECONDS
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if not _transient(error):
                    log.exception("replaying the spool failed; trying again")
                else:
                    log.info("Kafka is still not taking the spool (%s)", error)
            self._kafka_back.clear()
            try:
                await asyncio.wait_for(self._kafka_back.wait(), backoff)
            except asyncio.TimeoutError:
                pass
            backoff = min(backoff * 2, REPLAY_BACKOFF_MAX_SECONDS)

    async def _replay_once(self) -> bool:
        """Send the oldest segment, or turn direct sending on when the spool is empty.
        True when it made progress."""
        if not await self._connect():
            return False
        async with self._spool_lock:
            oldest = await asyncio.to_thread(self.spool.oldest)
            if oldest is None:
                self._spooling = False  # under the lock: no event is being spooled meanwhile
                log.info("the spool is replayed: events go to Kafka directly again")
                return True
        sequence, batches = oldest
        records = await self._records(list(enumerate(batches)))
        producer = self._producer
        assert producer is not None
        results = await _send_records(producer, records)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        await asyncio.to_thread(self.spool.remove, sequence)
        log.info("replayed %d spooled events; %d left", sum(len(b) for b in batches),
                 self.spool.events)
        return True


async def _send_records(producer: AIOKafkaProducer,
                        records: list[_Record]) -> list[BaseException | None]:
    """Send the records and wait for their acknowledgements: None for each one acknowledged,
    else its error. They are handed to the producer one after the other (gathering the sends
    could reorder the records of a partition while they wait for room in its batch)."""
    acks: list[asyncio.Future[object] | BaseException] = []
    for record in records:
        value = b"[" + b",".join(record.values) + b"]"
        try:
            acks.append(await producer.send(record.topic, value=value, key=record.key,
                                            partition=record.partition))
        except KafkaError as error:
            acks.append(error)
    waiting = [ack for ack in acks if not isinstance(ack, BaseException)]
    if waiting:
        await asyncio.wait(waiting, timeout=ACK_TIMEOUT_SECONDS * 2)
    results: list[BaseException | None] = []
    for ack in acks:
        if isinstance(ack, BaseException):
            results.append(ack)
        elif not ack.done():
            results.append(KafkaTimeoutError("not acknowledged in time"))
        elif ack.cancelled():
            results.append(KafkaTimeoutError("cancelled"))
        else:
            results.append(ack.exception())
    return results


def _succeed(call: _Call) -> None:
    if not call.done.done():
        call.done.set_result(None)


def _fail(group: list[_Call], error: BaseException) -> None:
    for call in group:
        if not call.done.done():
            call.done.set_exception(error)
