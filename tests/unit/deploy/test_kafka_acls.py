"""The ACL table of the secured local broker (deploy.kafka_security.grants): exactly what each
principal needs for one TOPIC_PREFIX, named literally."""

from __future__ import annotations

import pytest

from deploy.kafka_security import Grant, grants, redact


def rights(principal: str, prefix: str = "p1.") -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for grant in grants(prefix):
        if grant.principal == principal:
            found.setdefault(f"{grant.resource}:{grant.name}", set()).add(grant.operation)
    return found


def test_the_producer_writes_the_four_input_topics_and_nothing_else() -> None:
    assert rights("producer") == {
        f"topic:p1.{topic}": {"WRITE", "DESCRIBE"}
        for topic in ("clicks", "shares", "orders", "refunds")
    }


def test_the_reviewer_writes_reviews_and_nothing_else() -> None:
    assert rights("reviewer") == {"topic:p1.reviews": {"WRITE", "DESCRIBE"}}


def test_the_worker_reads_inputs_writes_its_own_topics_and_uses_its_group() -> None:
    worker = rights("worker")

    for topic in ("clicks", "shares", "orders", "refunds", "reviews", "ref-programs",
                  "ref-affiliates", "ref-settings"):
        assert worker.pop(f"topic:p1.{topic}") == {"READ", "DESCRIBE", "CREATE"}, topic
    for topic in ("p1.visitor-events", "p1.ledger-events", "p1.code-events",
                  "attribution-p1-touches-changelog", "attribution-p1-order-ledgers-changelog",
                  "attribution-p1-code-redemptions-changelog"):
        assert worker.pop(f"topic:{topic}") == {"READ", "WRITE", "DESCRIBE", "CREATE"}, topic
    for topic in ("dead-letters", "abuse-flags"):
        assert worker.pop(f"topic:p1.{topic}") == {"WRITE", "DESCRIBE", "CREATE"}, topic
    assert worker == {"group:attribution-p1": {"READ", "DESCRIBE"}}


def test_admin_needs_no_acl_it_is_a_super_user() -> None:
    assert rights("admin") == {}


def test_without_a_prefix_the_names_are_the_contracts() -> None:
    names = {grant.name for grant in grants("")}

    assert {"clicks", "reviews", "attribution-touches-changelog", "attribution"} <= names
    assert not any(name.startswith(".") for name in names)


def test_a_prefix_kafka_cannot_name_is_refused() -> None:
    with pytest.raises(ValueError, match="TOPIC_PREFIX"):
        grants("bad prefix/")


def test_every_grant_is_listed_once() -> None:
    listed = grants("p1.")

    assert len(listed) == len(set(listed)) and all(isinstance(g, Grant) for g in listed)


def test_redact_masks_every_secret() -> None:
    assert redact("name=admin,password=abc123 and abc123", ["abc123", ""]) == (
        "name=admin,password=*** and ***")
