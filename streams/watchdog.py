"""Partition watchdog: finds input partitions Faust stopped fetching and never resumed.

Faust's flow control takes a partition out of the fetch set when its agent's queue passes 80 % and
puts it back when a queue read finds the queue drained (`on_buffer_drop`). After a restart with a
backlog we saw partitions (all of `orders`, one of `visitor-events`) left out of the fetch set for
good while their queues were empty and their lag was not: the worker stays up, commits, and does
nothing — a silent stall (README, "The restart stall"). Every few seconds this task looks for
assigned stream partitions that are not being fetched although their queues have room, outside
recovery and rebalancing; when one stays so for two checks in a row it logs what it found and
puts the partition back into the fetch set. Reading more records is always safe: offsets only
advance when agents ack what they processed.

It reaches into Faust's consumer and conductor (private attributes of faust-streaming 0.15); if
they change shape it logs once and stops, it never takes the worker down.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

#: 5 s: well above Faust's own resume path (the next queue read), well below an operator's patience.
INTERVAL_SECONDS = 5.0


def stalled_partitions(app: Any) -> dict[Any, str]:
    """Assigned stream partitions Faust does not fetch although their queues have room."""
    consumer = app.consumer
    active = consumer._active_partitions  # noqa: SLF001
    if active is None:  # Faust computes it lazily: nothing was taken out yet
        return {}
    buffered = consumer._buffered_partitions  # noqa: SLF001
    paused = consumer._paused_partitions  # noqa: SLF001
    index = app.topics._tp_index  # noqa: SLF001
    found: dict[Any, str] = {}
    for tp in consumer.assignment():
        if tp in active or consumer._is_changelog_tp(tp):  # noqa: SLF001
            continue
        queues = [channel.queue for channel in index.get(tp, ())]
        sizes = [queue.qsize() for queue in queues]
        if any(size > queue.pressure_drop_size for size, queue in zip(sizes, queues)):
            continue  # legitimately held back: its agent has plenty to do
        state = "buffered" if tp in buffered else "paused" if tp in paused else "inactive"
        found[tp] = f"{state}, queue sizes {sizes}"
    return found


def resume(app: Any, tp: Any) -> None:
    consumer = app.consumer
    consumer._buffered_partitions.discard(tp)  # noqa: SLF001
    if tp in consumer._paused_partitions:  # noqa: SLF001
        consumer.resume_partitions([tp])
    consumer._active_partitions.add(tp)  # noqa: SLF001


async def watch_partitions(app: Any, interval: float = INTERVAL_SECONDS) -> None:
    suspects: dict[Any, str] = {}
    while True:
        await asyncio.sleep(interval)
        try:
            if app.in_recovery or app.rebalancing or app.should_stop:  # Faust pauses all then
                suspects = {}
                continue
            found = stalled_partitions(app)
            for tp, why in found.items():
                if tp in suspects:
                    log.warning("partition %s/%s not fetched for %.0fs with room in its queue (%s):"
                                " resuming it", tp.topic, tp.partition, 2 * interval, why)
                    resume(app, tp)
            suspects = {tp: why for tp, why in found.items() if tp not in suspects}
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - diagnostics must never stop the worker
            log.warning("partition watchdog stopped: %r", exc)
            return

