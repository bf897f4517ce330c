"""Stage 1 splits records, batched or not, into valid events and dead letters (`streams.ingest`)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import orjson

from schemas.events import Click
from sinks.metrics import METRICS
from streams.ingest import Validator


def click(n: int, **changes: Any) -> dict[str, Any]:
    return {"event_id": f"c{n}", "type": "click", "ts": "2026-11-02T10:00:00Z",
            "visitor_id": f"v{n}", "session_id": f"s{n}", "affiliate_id": "sally", **changes}


class DeadLetters:
    """Stands in for the Faust topic: records what would be sent."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, **kwargs: Any) -> None:
        self.sent.append(kwargs)


def record(value: bytes | None, offset: int) -> Any:
    message = SimpleNamespace(topic="t.clicks", partition=3, offset=offset, key=b"k",
                              value=value, timestamp=1_700_000_000.0)
    return SimpleNamespace(message=message)


def split(*values: bytes | None, expected_type: str = "click") -> tuple[list[Any], DeadLetters]:
    dead = DeadLetters()
    validator = Validator("clicks-test", expected_type, dead)  # type: ignore[arg-type]
    valid = asyncio.run(validator.split([record(v, n) for n, v in enumerate(values)]))
    return valid, dead


def test_a_single_object_record_is_one_valid_event_with_the_record_bytes() -> None:
    raw = orjson.dumps(click(1))
    [valid], dead = split(raw)
    assert isinstance(valid.event, Click) and valid.event.event_id == "c1"
    assert (valid.raw, valid.key, valid.partition, valid.offset) == (raw, b"k", 3, 0)
    assert valid.timestamp == 1_700_000_000.0
    assert dead.sent == []


def test_each_valid_element_of_an_array_is_its_own_event_with_its_own_bytes() -> None:
    elements = [click(1), click(2), click(3)]
    valid, dead = split(orjson.dumps(elements))
    assert [v.event.event_id for v in valid] == ["c1", "c2", "c3"]
    assert [v.raw for v in valid] == [orjson.dumps(e) for e in elements]
    assert {v.offset for v in valid} == {0}
    assert dead.sent == []


def test_an_invalid_element_goes_to_dead_letters_alone_with_its_index() -> None:
    bad = click(2, visitor_id=None)
    valid, dead = split(orjson.dumps([click(1), bad, 7, click(4)]))
    assert [v.event.event_id for v in valid] == ["c1", "c4"]
    assert [letter["value"] for letter in dead.sent] == [orjson.dumps(bad), b"7"]
    first, second = (dict(letter["headers"]) for letter in dead.sent)
    assert (first["reason"], first["element"]) == (b"missing_field", b"1")
    assert (second["reason"], second["element"]) == (b"not_object", b"2")
    for letter in dead.sent:
        headers = dict(letter["headers"])
        assert (headers["source_topic"], headers["source_partition"], headers["source_offset"]) == (
            b"t.clicks", b"3", b"0")
        assert letter["key"] == b"k"


def test_dead_letters_of_non_array_records_keep_the_value_and_have_no_element_header() -> None:
    values = [b"{not json", b"42", orjson.dumps(click(1, ts="yesterday")), None,
              orjson.dumps([click(n) for n in range(10_001)])]
    valid, dead = split(*values)
    assert valid == []
    assert [letter["value"] for letter in dead.sent] == [v or b"" for v in values]
    assert [dict(letter["headers"])["reason"] for letter in dead.sent] == [
        b"not_json", b"not_object", b"bad_timestamp", b"not_json", b"too_many_elements"]
    assert all("element" not in dict(letter["headers"]) for letter in dead.sent)
    assert [dict(letter["headers"])["source_offset"] for letter in dead.sent] == [
        b"0", b"1", b"2", b"3", b"4"]


def test_an_empty_array_yields_nothing() -> None:
    valid, dead = split(b"[]", b" [ ] ")
    assert (valid, dead.sent) == ([], [])


def test_events_are_counted_one_by_one_in_the_metrics() -> None:
    consumed = METRICS.events_consumed.labels("clicks-test")
    before = consumed._value.get()
    split(orjson.dumps([click(1), click(2), 3]), orjson.dumps(click(4)))
    assert consumed._value.get() - before == 4


def test_reviews_are_decoded_one_per_record() -> None:
    review = {"type": "review", "event_id": "rv1", "ts": "2026-11-02T10:00:00Z",
              "order_id": "o1", "decision": "release", "reviewer": "ann"}
    valid, dead = split(orjson.dumps(review), orjson.dumps([review]), expected_type="review")
    assert [v.event.event_id for v in valid] == ["rv1"]
    [letter] = dead.sent
    assert dict(letter["headers"])["reason"] == b"not_object"
    assert "element" not in dict(letter["headers"])
