"""What a batch decided to do, before any of it is done.

The stages fill one `Effects` per batch; the runner makes them in the commit order (ClickHouse
rows, then records to Kafka, then state, then offsets). Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

#: Internal topics a stage forwards to (before the prefix).
VISITOR = "visitor-events"
CODE = "code-events"
LEDGER = "ledger-events"
ABUSE = "abuse-flags"
DEAD = "dead-letters"


@dataclass(frozen=True, slots=True)
class Forward:
    """One item for an internal topic: its partition follows `key` (Kafka's default partitioner),
    and items for one partition travel together as one JSON-array record."""

    topic: str
    key: bytes
    item: bytes  # one JSON object
    timestamp_ms: int | None = None
    partition: int | None = None  # explicit, instead of the key's


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A rejected input: its bytes untouched, why, and where it came from."""

    key: bytes | None
    value: bytes
    reason: str
    detail: str
    source_topic: str
    source_partition: int
    source_offset: int
    element: int | None = None  # index in a batched record

    def headers(self) -> list[tuple[str, bytes]]:
        headers = [
            ("reason", self.reason.encode()),
            ("detail", self.detail.encode()),
            ("source_topic", self.source_topic.encode()),
            ("source_partition", str(self.source_partition).encode()),
            ("source_offset", str(self.source_offset).encode()),
        ]
        if self.element is not None:
            headers.append(("element", str(self.element).encode()))
        return headers


@dataclass
class Effects:
    rows: dict[str, list[Sequence[Any]]] = field(default_factory=dict)
    forwards: list[Forward] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    #: (key, value) of flag messages for the `abuse-flags` topic.
    flags: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: Record times (epoch seconds) of events whose rows this batch writes, per table.
    latency_from: dict[str, list[float]] = field(default_factory=dict)

    def row(self, table: str, row: Sequence[Any]) -> None:
        self.rows.setdefault(table, []).append(row)

    def forward(self, topic: str, key: bytes, item: bytes, timestamp_ms: int | None = None,
                *, partition: int | None = None) -> None:
        self.forwards.append(Forward(topic, key, item, timestamp_ms, partition))
