"""The postback signature and the token buckets, alone."""

from __future__ import annotations

import hashlib
import hmac

from edge.limits import RateLimiter
from edge.signing import MAX_SKEW_SECONDS, signature, signature_problem

SECRET = b"a-shared-secret-of-enough-length"


def test_the_signature_is_hex_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"type":"order"}'
    expected = hmac.new(SECRET, b"1796000000." + body, hashlib.sha256).hexdigest()
    assert signature(SECRET, 1796000000, body) == "sha256=" + expected


def test_a_fresh_correct_signature_passes_and_upper_case_hex_too() -> None:
    body = b"[]"
    signed = signature(SECRET, "1000", body)
    assert signature_problem(SECRET, "1000", signed, body, now=1000 + MAX_SKEW_SECONDS) is None
    assert signature_problem(SECRET, "1000", signed.upper().replace("SHA256=", "sha256="), body,
                             now=1000) is None


def test_stale_future_missing_and_wrong_signatures_are_refused() -> None:
    body = b"[]"
    signed = signature(SECRET, "1000", body)
    assert signature_problem(SECRET, "1000", signed, body, now=1000 + MAX_SKEW_SECONDS + 1)
    assert signature_problem(SECRET, "1000", signed, body, now=1000 - MAX_SKEW_SECONDS - 1)
    assert signature_problem(SECRET, None, signed, body, now=1000)
    assert signature_problem(SECRET, "1000", None, body, now=1000)
    assert signature_problem(SECRET, "-1000", signed, body, now=1000)
    assert signature_problem(SECRET, "1000", signed, body + b" ", now=1000)
    assert signature_problem(SECRET, "1000", "sha256=é", body, now=1000)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_its_burst_then_its_rate_and_says_how_long_to_wait() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2, burst=4, clock=clock)
    assert [limiter.take("a") for _ in range(5)] == [0, 0, 0, 0, 1]
    assert limiter.take("b") == 0  # another key has its own bucket
    clock.now = 0.5  # one token back at 2/s
    assert limiter.take("a") == 0
    assert limiter.take("a") == 1
    clock.now = 100
    assert [limiter.take("a") for _ in range(5)] == [0, 0, 0, 0, 1]  # refilled to the burst only


def test_slow_rates_ask_for_a_longer_wait() -> None:
    limiter = RateLimiter(rate=0.1, burst=1, clock=Clock())
    assert limiter.take("a") == 0
    assert limiter.take("a") == 10


def test_the_number_of_buckets_is_bounded_forgetting_the_least_recent() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1, burst=1, max_buckets=2, clock=clock)
    limiter.take("a")
    limiter.take("b")
    limiter.take("c")  # "a" forgotten: it comes back with a full bucket
    assert limiter.take("a") == 0
    assert limiter.take("c") == 1
