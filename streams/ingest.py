"""Stage 1: validate raw input events, send rejects to dead-letters, route the rest.

A record on clicks, shares, orders or refunds carries one event or a JSON array of them (contract
§2): from here on every event travels alone, and an invalid element is dead-lettered alone.

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
from schemas.validation import InvalidEvent, decode_record, decode_review
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
        """The valid events of a batch of records, one `Valid` per event (contract §2: a record
        on an input topic may carry a JSON array of events; each element stands alone).

        A valid element's `raw` is its own JSON bytes, so the stages after this one only ever see
        single events. Every rejection is dead-lettered on its own.
        """
        if self.expected_type == "review":
            return await self._split_reviews(events)
        valid: list[Valid] = []
        append = valid.append
        expected_type = self.expected_type
        seen = 0
        for event in events:
            message = event.message
            raw = message.value if isinstance(message.value, bytes) else b""
            decoded = decode_record(raw, expected_type)
            seen += len(decoded)
            for item in decoded:
                if item.event is not None:
                    append(Valid(item.event, item.raw, message.key, message.partition,
                                 message.offset, message.timestamp))
                else:
                    assert item.error is not None
                    await self.dead_letter(message, item.error, item.index, item.raw)
        METRICS.events_consumed.labels(self.source).inc(seen)
        METRICS.events_valid.labels(self.source).inc(len(valid))
        return valid

    async def _split_reviews(self, events: Sequence[EventT]) -> list[Valid]:
        """Reviews are never batched: one decision per record."""
        valid: list[Valid] = []
        METRICS.events_consumed.labels(self.source).inc(len(events))
        for event in events:
            message = event.message
            raw = message.value if isinstance(message.value, bytes) else b""
            try:
                review = decode_review(raw)
            except InvalidEvent as exc:
                await self.dead_letter(message, exc)
                continue
            valid.append(
                Valid(review, raw, message.key, message.partition, message.offset,
                      message.timestamp)
            )
        METRICS.events_valid.labels(self.source).inc(len(valid))
        return valid

    async def dead_letter(
        self, message: Any, exc: InvalidEvent, element: int | None = None, raw: bytes | None = None
    ) -> None:
        """The raw bytes, untouched, with the cause and the source position in headers.

        An invalid element of a batched record goes alone: `raw` is its own bytes and the header
        `element` its index in the array. Anything else keeps the record's value.
        """
        headers = [
            ("reason", exc.reason.encode()),
            ("detail", exc.detail.encode()),
            ("source_topic", str(message.topic).encode()),
            ("source_partition", str(message.partition).encode()),
            ("source_offset", str(message.offset).encode()),
        ]
        value = message.value or b""
        if element is not None:
            headers.append(("element", str(element).encode()))
            value = raw if raw is not None else value
        await self.dead_letters.send(
            key=message.key, value=value, headers=headers,
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
