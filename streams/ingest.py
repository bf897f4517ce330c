"""Stage 1: validate raw input events, send rejects to dead-letters, route the rest.

Raw topics may be keyed any way a producer chose, so this stage re-keys what the later stages join
on: clicks and orders go to `visitor-events` (keyed by visitor_id, one topic, so a visitor's clicks
and orders keep one order), refunds to `ledger-events` (keyed by order_id). Shares join nothing
and are written to ClickHouse here. Invalid input is never retried and never stops the worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from faust.types import EventT, TopicT

from schemas.events import Event, Review
from schemas.validation import InvalidEvent, decode_event, decode_review
from sinks.metrics import METRICS

from .forwarding import Forwarder, Record


@dataclass(frozen=True, slots=True)
class Valid:
    event: Event | Review
    raw: bytes
    key: bytes | None
    partition: int
    offset: int
    timestamp: float  # Kafka record time, seconds


class Validator:
    """Splits a batch into valid events and dead letters (which it publishes)."""

    def __init__(self, source: str, expected_type: str, dead_letters: TopicT) -> None:
        self.source = source
        self.expected_type = expected_type
        self.dead_letters = dead_letters

    async def split(self, events: Sequence[EventT]) -> list[Valid]:
        valid: list[Valid] = []
        METRICS.events_consumed.labels(self.source).inc(len(events))
        for event in events:
            message = event.message
            raw = message.value if isinstance(message.value, bytes) else b""
            try:
                decoded: Event | Review = (
                    decode_review(raw) if self.expected_type == "review"
                    else decode_event(raw, self.expected_type)
                )
            except InvalidEvent as exc:
                await self.dead_letter(message, exc)
                continue
            valid.append(
                Valid(decoded, raw, message.key, message.partition, message.offset,
                      message.timestamp)
            )
        METRICS.events_valid.labels(self.source).inc(len(valid))
        return valid

    async def dead_letter(self, message: Any, exc: InvalidEvent) -> None:
        """The raw bytes, untouched, with the cause and the source position in headers."""
        headers = [
            ("reason", exc.reason.encode()),
            ("detail", exc.detail.encode()),
            ("source_topic", str(message.topic).encode()),
            ("source_partition", str(message.partition).encode()),
            ("source_offset", str(message.offset).encode()),
        ]
        await self.dead_letters.send(
            key=message.key, value=message.value or b"", headers=headers,
            key_serializer="raw", value_serializer="raw",
        )
        METRICS.events_invalid.labels(self.source, exc.reason).inc()
        METRICS.dead_letters.inc()


async def forward(forwarder: Forwarder, topic: str, items: Sequence[Valid], key_of: str) -> None:
    """Re-publish the raw bytes keyed by `key_of`, keeping the original record time."""
    await forwarder.send(
        topic,
        [Record(getattr(item.event, key_of).encode(), item.raw, item.timestamp) for item in items],
    )
