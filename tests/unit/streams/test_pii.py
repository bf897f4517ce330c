"""Personal data (`schemas.pii`, `streams.pii`): the keyed hash, and `scrub`, which every copy of
an input record beyond its input topic goes through (contract §1)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import Click
from schemas.pii import is_keyed_hash, keyed_digest
from schemas.validation import decode_event
from streams.pii import REDACTED, keyed_hash, scrub

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
IP = "203.0.113.7"
UA = "Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0"

CLICK = {
    "event_id": "c1", "type": "click", "ts": "2026-11-02T10:15:00Z", "visitor_id": "v1",
    "session_id": "s1", "affiliate_id": "sally", "channel": "blog", "ip": IP, "user_agent": UA,
    "landing_url": "https://shop.example/?utm=1",
}


# --- the keyed hash ------------------------------------------------------------------------


def test_keyed_hash_is_hmac_sha256_hex_marked_h1() -> None:
    expected = hmac.new(KEY, IP.encode(), hashlib.sha256).hexdigest()
    assert keyed_hash(IP, KEY) == "h1:" + expected
    assert is_keyed_hash(keyed_hash(IP, KEY))


def test_keyed_hash_is_the_same_for_the_same_value_and_key_only() -> None:
    assert keyed_hash(IP, KEY) == keyed_hash(IP, KEY)
    assert keyed_hash(IP, KEY) != keyed_hash(IP, OTHER_KEY)
    assert keyed_hash(IP, KEY) != keyed_hash("203.0.113.8", KEY)


def test_keyed_hash_of_a_lone_surrogate_does_not_raise() -> None:
    assert is_keyed_hash(keyed_hash("\ud800", KEY))


def test_keyed_digest_of_bytes_is_the_keyed_hash_of_their_text() -> None:
    assert keyed_digest(IP.encode(), KEY) == keyed_hash(IP, KEY)


def test_a_keyed_hash_needs_a_key() -> None:
    with pytest.raises(ValueError):
        keyed_hash(IP, b"")


@pytest.mark.parametrize("value", ["", "h1:", "h1:" + "0" * 63, "h1:" + "A" * 64, "h2:" + "0" * 64,
                                   " h1:" + "0" * 64, 7, None])
def test_only_h1_and_64_lower_case_hex_digits_is_a_keyed_hash(value: Any) -> None:
    assert not is_keyed_hash(value)


# --- scrub: JSON ---------------------------------------------------------------------------


def test_ip_and_user_agent_of_an_event_become_their_keyed_hash_and_nothing_else_changes() -> None:
    scrubbed = orjson.loads(scrub(orjson.dumps(CLICK), KEY))
    assert scrubbed == {**CLICK, "ip": keyed_hash(IP, KEY), "user_agent": keyed_hash(UA, KEY)}
    assert list(scrubbed) == list(CLICK)  # members keep their places


def test_without_a_key_ip_and_user_agent_are_removed() -> None:
    scrubbed = orjson.loads(scrub(orjson.dumps(CLICK), None))
    assert scrubbed == {k: v for k, v in CLICK.items() if k not in ("ip", "user_agent")}


def test_a_value_is_hashed_stripped_as_validation_strips_it() -> None:
    scrubbed = orjson.loads(scrub(orjson.dumps({**CLICK, "ip": f"  {IP}\n"}), KEY))
    assert scrubbed["ip"] == keyed_hash(IP, KEY)


def test_a_scrubbed_event_is_still_a_valid_event_carrying_the_hashes() -> None:
    event = decode_event(scrub(orjson.dumps(CLICK), KEY), "click")
    assert isinstance(event, Click)
    assert (event.ip, event.user_agent) == (keyed_hash(IP, KEY), keyed_hash(UA, KEY))
    assert event.visitor_id == "v1"


def test_every_object_of_a_batched_record_is_scrubbed_and_other_elements_kept() -> None:
    raw = orjson.dumps([CLICK, 5, "ip", [{"ip": IP}], {"event_id": "c2"}])
    assert orjson.loads(scrub(raw, KEY)) == [
        {**CLICK, "ip": keyed_hash(IP, KEY), "user_agent": keyed_hash(UA, KEY)},
        5, "ip", [{"ip": keyed_hash(IP, KEY)}], {"event_id": "c2"},
    ]


def test_nested_objects_are_scrubbed_too() -> None:
    raw = orjson.dumps({"event_id": "o1", "context": {"ip": IP, "page": {"user_agent": UA}}})
    assert orjson.loads(scrub(raw, KEY)) == {
        "event_id": "o1",
        "context": {"ip": keyed_hash(IP, KEY), "page": {"user_agent": keyed_hash(UA, KEY)}},
    }


def test_nesting_deeper_than_pythons_recursion_limit_is_scrubbed() -> None:
    depth = 250  # orjson writes 255 levels at most
    raw = b"[" * depth + orjson.dumps({"ip": IP}) + b"]" * depth
    scrubbed = scrub(raw, KEY)
    assert IP.encode() not in scrubbed and keyed_hash(IP, KEY).encode() in scrubbed


def test_nesting_deeper_than_orjson_writes_is_redacted() -> None:
    depth = 1000  # orjson reads 1024 levels, writes 255
    raw = b"[" * depth + orjson.dumps({"ip": IP}) + b"]" * depth
    assert scrub(raw, KEY) == redacted(raw, KEY)
    clean = b"[" * depth + b"]" * depth
    assert scrub(clean, KEY) is clean


@pytest.mark.parametrize("value", [None, "", "   "])
def test_a_null_or_empty_value_holds_nothing_and_is_kept(value: Any) -> None:
    raw = orjson.dumps({"ip": value, "event_id": "e"})
    assert scrub(raw, KEY) == raw
    assert scrub(raw, None) == raw


@pytest.mark.parametrize("value", [3405803783, ["203.0.113.7"], {"v4": "203.0.113.7"}, True, 1.5])
def test_a_value_of_another_type_is_hashed_as_its_json_or_removed(value: Any) -> None:
    raw = orjson.dumps({"ip": value, "event_id": "e"})
    assert orjson.loads(scrub(raw, KEY)) == {
        "ip": keyed_hash(orjson.dumps(value).decode(), KEY), "event_id": "e"}
    assert orjson.loads(scrub(raw, None)) == {"event_id": "e"}


def test_a_repeated_member_keeps_neither_raw_value() -> None:
    raw = b'{"ip":"198.51.100.1","ip":"198.51.100.2"}'
    scrubbed = scrub(raw, KEY)
    assert b"198.51.100" not in scrubbed
    assert orjson.loads(scrubbed) == {"ip": keyed_hash("198.51.100.2", KEY)}


def test_a_member_name_spelled_with_an_escape_is_the_same_member() -> None:
    scrubbed = scrub(b'{"\\u0069p":"198.51.100.1"}', KEY)
    assert orjson.loads(scrubbed) == {"ip": keyed_hash("198.51.100.1", KEY)}


def test_a_record_without_personal_members_comes_back_byte_for_byte() -> None:
    raw = b'{ "event_id" : "e1", "total": 129.90, "referrer": "https://x.example/ip" }'
    assert scrub(raw, KEY) is raw


def test_an_already_hashed_value_is_not_hashed_again() -> None:
    once = scrub(orjson.dumps(CLICK), KEY)
    assert scrub(once, KEY) is once
    assert scrub(once, OTHER_KEY) is once


# Any JSON value without members named ip or user_agent.
JSON_LEAVES = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8).filter(lambda k: k not in ("ip", "user_agent")),
                      children, max_size=4),
    max_leaves=20,
)
PERSONAL = st.one_of(st.ip_addresses().map(str), st.sampled_from([UA, "curl/8.5.0", " x "]),
                     st.text(max_size=30), st.integers(-(2**63), 2**63 - 1), st.none())


@given(JSON_VALUES)
def test_json_without_personal_members_is_never_changed(value: Any) -> None:
    raw = orjson.dumps(value)
    assert scrub(raw, KEY) == raw
    assert scrub(raw, None) == raw


@given(st.dictionaries(st.sampled_from(["event_id", "visitor_id", "ts", "total", "x"]), JSON_VALUES,
                       max_size=5),
       st.dictionaries(st.sampled_from(["ip", "user_agent"]), PERSONAL, min_size=1))
def test_scrubbed_objects_keep_every_other_member_and_no_raw_personal_value(
    other: dict[str, Any], personal: dict[str, Any]
) -> None:
    event = {**other, **personal}
    for key in (KEY, None):
        scrubbed = orjson.loads(scrub(orjson.dumps(event), key))
        assert {k: v for k, v in scrubbed.items() if k not in personal} == other
        for name, value in personal.items():
            kept = value is None or (isinstance(value, str) and not value.strip())
            if kept:
                assert scrubbed[name] == value
            elif key is None:
                assert name not in scrubbed
            else:
                assert is_keyed_hash(scrubbed[name])


@given(st.dictionaries(st.sampled_from(["event_id", "ip", "user_agent", "a"]), PERSONAL | JSON_VALUES,
                       max_size=5),
       st.sampled_from([KEY, None]))
def test_scrubbing_twice_is_scrubbing_once(event: dict[str, Any], key: bytes | None) -> None:
    once = scrub(orjson.dumps([event, event]), key)
    assert scrub(once, key) == once


# --- scrub: what is not JSON -----------------------------------------------------------------


def redacted(raw: bytes, key: bytes | None) -> bytes:
    digest = keyed_digest(raw, key) if key else "sha256:" + hashlib.sha256(raw).hexdigest()
    return orjson.dumps({"redacted": REDACTED,
                         "reason": "cannot be scrubbed field by field, may hold ip or user_agent",
                         "bytes": len(raw), "digest": digest})


@pytest.mark.parametrize("raw", [
    orjson.dumps(CLICK)[:-20],  # truncated
    b'{"event_id":"e1","ip":"198.51.100.1",}',  # trailing comma
    b'{"event_id":"e1","IP":198.51.100.1}',
    b'{"event_id":"e1","client_ip":"x"',
    b"\xef\xbb\xbf" + orjson.dumps(CLICK),  # BOM
    orjson.dumps(CLICK) + b"\xff",  # not UTF-8
    orjson.dumps(CLICK).decode().encode("utf-16"),
    orjson.dumps(CLICK).decode().encode("utf-32-be"),
    b'{"\\u0069p": "198.51.100.1"',
    b"e1,click,v1,198.51.100.1",  # CSV: no field name, an address
    b"e1,click,v1,[2001:db8::7]:443",
    b"e1,click,v1,::ffff:198.51.100.1",
    b"e1 click v1 Mozilla/5.0 (iPhone)",
    b"User-Agent: curl/8.5.0",
    b"userAgent=x",
])
def test_what_is_not_json_but_may_hold_an_ip_or_user_agent_is_redacted(raw: bytes) -> None:
    assert scrub(raw, KEY) == redacted(raw, KEY)
    assert scrub(raw, None) == redacted(raw, None)


@pytest.mark.parametrize("raw", [
    b"",
    b"not json",
    b'{"event_id":"e1","type":"click","ts":"2026-11-02T10:15:00+01:00",',
    b'{"event_id":"e1","total":129.90,"shipping":"zip 12345", "v":"1.2.3"',
    b"\xff\xfe\x00garbage",
])
def test_what_is_not_json_and_holds_nothing_personal_is_kept_byte_for_byte(raw: bytes) -> None:
    assert scrub(raw, KEY) is raw


def test_the_redaction_marker_is_json_and_stays_as_it_is() -> None:
    marker = scrub(b'{"ip":"198.51.100.1"', KEY)
    assert orjson.loads(marker)["redacted"] == REDACTED
    assert scrub(marker, KEY) is marker


@settings(max_examples=300)
@given(st.ip_addresses(), st.sampled_from([UA, "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1)"]),
       st.data())
def test_no_cut_or_corruption_of_an_event_lets_its_ip_or_user_agent_through(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, agent: str, data: st.DataObject
) -> None:
    ip = str(address)
    raw = orjson.dumps({**CLICK, "ip": ip, "user_agent": agent})
    cut = data.draw(st.integers(0, len(raw)))
    tail = data.draw(st.sampled_from([b"", b"}", b",", b"\xff", b"garbage"]))
    corrupted = raw[:cut] + tail
    for key in (KEY, None):
        scrubbed = scrub(corrupted, key)
        assert ip.encode() not in scrubbed
        assert agent.encode() not in scrubbed


@given(st.binary(max_size=200), st.sampled_from([KEY, None]))
def test_any_bytes_are_scrubbed_without_raising_and_scrubbing_twice_is_once(
    raw: bytes, key: bytes | None
) -> None:
    once = scrub(raw, key)
    assert isinstance(once, bytes)
    assert scrub(once, key) == once
