"""The commit ledger: which offsets this worker may commit, decided by us, not by Faust's acks.

Faust commits what its streams *acknowledged*, and it acknowledges things we did not process:
`take_events` acks a batch however the batch ended; records dropped from cleared queues on a
rebalance leave a "gap" that Faust later commits across; for a partition with no committed
offset yet, Faust commits the first run of acked offsets even when it does not start at the
beginning (seen: the first four records of a `code-events` partition committed, never
processed, four orders lost after two workers rebalanced). So the commit offset of every stream
partition an agent reads is ours:

- A partition's *next* offset starts at the group's committed offset (or the log start) when a
  batch first meets it after a (re)assignment. A batch is *admitted* record by record: a record
  below next was done already (a re-delivery) and is skipped; a record at next is admitted and
  next moves on; a record beyond next is a gap. A gap is accepted only when the broker, read from
  next, has no record before it (transaction markers, compaction); otherwise the rest of the
  partition's batch is dropped and the consumer is sent back to next.
- After the batch's rows are in ClickHouse, its forwards acknowledged and its table writes made,
  the stage marks it *done*: only then does the commit offset move. Faust commits it with its
  own timer, after flushing its producer (changelogs), as before.
- A rebalance fences every batch that began before it: `check_fence()`, called before each
  effect (ClickHouse flush, forward, table write) and while waiting at a barrier, raises
  `Rebalanced` once a rebalance started. The batch is dropped without effects and without
  moving the commit offset; the partition's next owner (maybe this worker) reads it again.
  So no batch of a worker that lost its partitions writes stale state into a changelog another
  worker has already restored, and no barrier waits through a rebalance that stopped the very
  stages it waits for. A worker shutting down fences its batches the same way (Faust waits for
  in-flight batches after it stopped fetching: a batch at a barrier would hold the stop until
  the process is killed, and the group would wait a session timeout for it).

This module must never let an offset be committed that a stage has not marked done.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

from sinks.metrics import METRICS

log = logging.getLogger(__name__)

#: After sending the consumer back to a partition's next offset, records of that partition that
#: were fetched before the seek still arrive; do not seek again for them for this long. Faust's
#: fetch loop also lets such a late record raise its read offset again and then silently drops
#: the re-read records below it, so a partition still not back at its next offset this long after
#: a seek is sent back again (`reseek_stalled`, on a timer).
RESEEK_SECONDS = 5.0


#: The faust-streaming versions whose commit path `install` hooks (pyproject pins the same).
SUPPORTED_FAUST = "0.15."


class Rebalanced(Exception):
    """The batch began before a rebalance (or the worker is stopping): drop it, write nothing,
    commit nothing."""


class OffsetSource(Protocol):
    """What the ledger asks Kafka (implemented in `streams.kafka_meta.GroupOffsets`)."""

    async def starting_offsets(self, tps: Sequence[Any]) -> dict[Any, int]:
        """Per partition: the group's committed offset, else the log start offset."""
        ...

    async def first_offset_from(self, tp: Any, offset: int) -> int | None:
        """The offset of the first record at or after `offset` (None: there is none yet)."""
        ...


class Fence:
    """One batch's view of rebalances."""

    __slots__ = ("ledger", "epoch")

    def __init__(self, ledger: "OffsetLedger") -> None:
        self.ledger = ledger
        self.epoch = ledger.epoch

    def check(self) -> None:
        if self.ledger.interrupted() or self.ledger.epoch != self.epoch:
            raise Rebalanced("a rebalance started while the batch was in flight")


_current_fence: contextvars.ContextVar[Fence | None] = contextvars.ContextVar(
    "attribution_batch_fence", default=None
)


def check_fence() -> None:
    """Raise `Rebalanced` if the current agent's batch began before a rebalance (no-op outside)."""
    fence = _current_fence.get()
    if fence is not None:
        fence.check()


class OffsetLedger:
    def __init__(
        self, source: OffsetSource, interrupted: Any = lambda: False, owned: Any = None,
    ) -> None:
        self.source = source
        # () -> set of partitions: this worker's assignment now (None: every partition). A record
        # of a partition another worker owns now is never admitted, however it got here.
        self.owned = owned
        # () -> bool: the app is rebalancing or shutting down right now. Either way Faust waits
        # for in-flight batches ("wait for streams") while the stages they wait for are stopped.
        self.interrupted = interrupted
        self.epoch = 0  # +1 on every revocation: batches from before it are fenced
        self._next: dict[Any, int] = {}  # partition -> next offset to process
        self._committable: dict[Any, int] = {}  # partition -> offset Faust may commit
        self._seeks: dict[Any, tuple[int, float]] = {}  # partition -> (offset, when)

    # -- batches ---------------------------------------------------------------------------

    def fence(self) -> Fence:
        return Fence(self)

    def enter(self, fence: Fence) -> contextvars.Token[Fence | None]:
        return _current_fence.set(fence)

    def leave(self, token: contextvars.Token[Fence | None]) -> None:
        _current_fence.reset(token)

    async def admit(self, events: Sequence[Any], seek: Any, fence: Fence) -> list[Any]:
        """The events of a batch that continue each partition exactly where it stands.

        `seek(tp, offset)` (async) sends the consumer back to `offset` of a partition.
        """
        if self.owned is not None:
            assignment = self.owned()
            events = [e for e in events if e.message.tp in assignment]
        tps = list(dict.fromkeys(e.message.tp for e in events))
        unknown = [tp for tp in tps if tp not in self._next]
        if unknown:
            starts = await self.source.starting_offsets(unknown)
            fence.check()
            for tp in unknown:
                self._next.setdefault(tp, starts[tp])
        cursor = {tp: self._next[tp] for tp in tps}
        blocked: set[Any] = set()
        admitted = []
        for event in events:
            message = event.message
            tp, offset = message.tp, message.offset
            if tp in blocked or offset < cursor[tp]:
                continue
            if offset > cursor[tp]:
                pending = self._seeks.get(tp)
                if pending is not None and pending[0] == cursor[tp]:
                    blocked.add(tp)  # a re-read from there is under way: drop, do not ask again
                    continue
                first = await self.source.first_offset_from(tp, cursor[tp])
                fence.check()
                if first is None or first < offset:  # records before this one exist: re-read them
                    blocked.add(tp)
                    await self._seek_back(tp, cursor[tp], offset, seek)
                    continue
                log.warning("%s/%s: offsets %d-%d hold no records (transaction markers or"
                            " compaction): continuing at %d", tp.topic, tp.partition,
                            cursor[tp], offset - 1, offset)
            admitted.append(event)
            cursor[tp] = offset + 1
        for tp in tps:
            if cursor[tp] > self._next[tp]:
                self._seeks.pop(tp, None)  # its re-read (if any) has begun
        return admitted

    async def _seek_back(self, tp: Any, offset: int, seen: int, seek: Any) -> None:
        last = self._seeks.get(tp)
        now = time.monotonic()
        if last is not None and last[0] == offset and now - last[1] < RESEEK_SECONDS:
            return  # records fetched before that seek are still draining
        log.warning("%s/%s: got offset %d while %d is next (records not delivered): reading"
                    " again from %d", tp.topic, tp.partition, seen, offset, offset)
        await self._send_back(tp, offset, now, seek)

    async def reseek_stalled(self, seek: Any) -> None:
        """Seek again every partition whose re-read has not begun RESEEK_SECONDS after its seek."""
        now = time.monotonic()
        for tp, (offset, when) in list(self._seeks.items()):
            if now - when >= RESEEK_SECONDS and self._next.get(tp) == offset:
                log.warning("%s/%s: still not back at offset %d %.0fs after a seek: seeking again",
                            tp.topic, tp.partition, offset, now - when)
                await self._send_back(tp, offset, now, seek)

    async def _send_back(self, tp: Any, offset: int, now: float, seek: Any) -> None:
        """Seek `tp` to `offset` and remember when, for `reseek_stalled`."""
        self._seeks[tp] = (offset, now)
        METRICS.partition_rereads.labels(tp.topic).inc()
        try:
            await seek(tp, offset)
        except Exception as exc:  # noqa: BLE001 - e.g. no longer assigned: the next owner reads it
            log.warning("%s/%s: seek to %d failed: %r", tp.topic, tp.partition, offset, exc)

    def done(self, admitted: Iterable[Any], fence: Fence) -> None:
        """The batch's effects are all made: its offsets may be committed."""
        fence.check()
        for event in admitted:
            message = event.message
            tp = message.tp
            if message.offset + 1 > self._next.get(tp, -1):
                self._next[tp] = message.offset + 1
                self._committable[tp] = message.offset + 1

    # -- what Faust may commit ---------------------------------------------------------------

    def committable(self, tp: Any) -> int | None:
        return self._committable.get(tp)

    def partitions(self) -> Iterator[Any]:
        return iter(list(self._committable))

    def next_offset(self, tp: Any) -> int:
        """For the barriers: this worker's stages are done below this offset of `tp`."""
        return self._next.get(tp, 0)

    def revoked(self, tps: Iterable[Any]) -> None:
        """Partitions left this worker (or a rebalance reassigns everything): forget them."""
        self.epoch += 1
        for tp in tps:
            self._next.pop(tp, None)
            self._committable.pop(tp, None)
            self._seeks.pop(tp, None)


def install(consumer: Any, ledger: OffsetLedger, topics: set[str]) -> None:
    """Make Faust's consumer commit, for `topics`, exactly what the ledger allows.

    Faust (0.15) picks the offsets to commit in `_filter_committable_offsets`, for the partitions
    `_filter_tps_with_pending_acks` lists. Both are replaced on this consumer instance; other
    topics (none today) keep Faust's rules. Faust's own ack lists of our topics are emptied on
    every commit so they do not grow.
    """
    import faust

    version = getattr(faust, "__version__", "")
    hooks = ("_new_offset", "_filter_tps_with_pending_acks", "_filter_committable_offsets",
             "_should_commit", "_acked", "_acked_index", "_gap", "perform_seek", "seek_wait")
    if not version.startswith(SUPPORTED_FAUST) or not all(hasattr(consumer, h) for h in hooks):
        # Exactness rests on this hook: better no worker than one that commits Faust's acks.
        raise RuntimeError(f"faust-streaming {version} is not supported: the commit ledger hooks"
                           f" the commit path of faust-streaming {SUPPORTED_FAUST}x")
    faust_new_offset = consumer._new_offset  # noqa: SLF001
    faust_pending = consumer._filter_tps_with_pending_acks  # noqa: SLF001

    def pending(topics_filter: Any = None) -> Iterator[Any]:
        seen = set()
        for tp in faust_pending(topics_filter):
            seen.add(tp)
            yield tp
        for tp in ledger.partitions():
            if tp not in seen and (topics_filter is None or tp in topics_filter
                                   or tp.topic in topics_filter):
                yield tp

    def committable(tps: Iterable[Any]) -> dict[Any, int]:
        offsets = {}
        for tp in tps:
            if tp.topic in topics:
                consumer._acked[tp].clear()  # noqa: SLF001
                consumer._acked_index[tp].clear()  # noqa: SLF001
                consumer._gap.pop(tp, None)  # noqa: SLF001
                offset = ledger.committable(tp)
            else:
                offset = faust_new_offset(tp)
            if offset is not None and consumer._should_commit(tp, offset):  # noqa: SLF001
                offsets[tp] = offset
        return offsets

    faust_perform_seek = consumer.perform_seek

    async def perform_seek() -> None:
        """Faust's seek to the committed offsets, then every stream partition to where the
        ledger starts it: the group's committed offset, or the log start if there is none.

        Faust leaves a partition the group never committed wherever its fetcher happened to be
        (seen after a kill -9 restart: `clicks/0` resumed at 2,100 with nothing committed and
        nothing of it processed, an `orders` partition fetched nothing at all). The ledger
        would catch a record delivered past its next offset, but not a partition from which
        nothing is delivered, so the consumer is made to start exactly where the ledger does.
        """
        await faust_perform_seek()
        mine = [tp for tp in consumer.assignment() if tp.topic in topics]
        if mine:
            starts = await ledger.source.starting_offsets(mine)
            await consumer.seek_wait(starts)

    consumer._filter_tps_with_pending_acks = pending  # noqa: SLF001
    consumer._filter_committable_offsets = committable  # noqa: SLF001
    consumer.perform_seek = perform_seek
