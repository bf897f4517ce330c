"""Affiliates may carry a `payout_email` (contract §3, §9): optional, kept through the topic."""

from __future__ import annotations

import orjson
import pytest

from schemas.validation import InvalidReference, affiliate_to_json, parse_affiliate


def test_payout_email_is_optional_and_survives_the_reference_topic():
    plain = parse_affiliate({"affiliate_id": "sally", "program_id": "p"})
    assert plain.payout_email == ""
    paid = parse_affiliate({"affiliate_id": "sally", "program_id": "p",
                            "payout_email": " sally@example.com "})
    assert paid.payout_email == "sally@example.com"
    assert parse_affiliate(orjson.loads(affiliate_to_json(paid))) == paid


def test_payout_email_must_be_a_string():
    with pytest.raises(InvalidReference):
        parse_affiliate({"affiliate_id": "sally", "program_id": "p", "payout_email": 7})
