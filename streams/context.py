"""Pointing Faust's table machinery at the right partition while we work on a whole batch.

Faust decides which partition a table key lives in (its RocksDB shard and its changelog partition)
from the stream's *current event*. We read and write table keys for a batch of events at once, after
the batch's rows are safely in ClickHouse, so for each key we make the event that touched it (or a
stand-in naming the same topic and partition) current while we touch the table.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

from faust.streams import _current_event


class _StandInEvent:
    """Just enough of a Faust event for table access: `.message.topic` and `.message.partition`."""

    __slots__ = ("message", "__weakref__")

    def __init__(self, topic: str, partition: int) -> None:
        self.message = SimpleNamespace(topic=topic, partition=partition)


@contextmanager
def in_partition(topic: str, partition: int) -> Iterator[None]:
    """Make table reads and writes inside the block go to `partition` (of `topic`'s tables)."""
    stand_in = _StandInEvent(topic, partition)
    token = _current_event.set(weakref.ref(stand_in))  # type: ignore[arg-type]
    try:
        yield
    finally:
        _current_event.reset(token)
