"""Scale-out: two workers in one consumer group write the same ClickHouse rows as one worker.

The two workers start together while the traffic is published, so the group rebalances (one
member takes everything, then hands half over) with orders waiting at the barriers: the way a
second replica joins a running deployment.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import orjson
import pytest

from loadtests.generator import TrafficProfile, generate, sample_reference
from schemas.validation import parse_reference_document
from streams.publish import produce_lines, publish_reference
from test_resilience import publish, snapshot, undisturbed_run, wait_for_counts

pytestmark = pytest.mark.integration

PARTITIONS = 4  # ATTRIBUTION_PARTITIONS of every isolated environment (tests/conftest.py)

#: The worker's log line after each rebalance (partition p of every topic goes to one worker).
ASSIGNMENT = re.compile(r"assignment: partitions \[([0-9, ]*)\] of every topic")


def traffic(visitors: int, seed: int = 11) -> tuple[dict, list[bytes]]:
    reference = sample_reference(n_affiliates=20)
    events = [orjson.dumps(e) for e in generate(reference, TrafficProfile(visitors=visitors, seed=seed))]
    return reference, events


def final_assignment(log_path: Path, topic: str) -> set[int]:
    """The partitions of `topic` in the last assignment a worker's log shows."""
    log = log_path.read_text(errors="replace")
    assignments = ASSIGNMENT.findall(log)
    assert assignments, f"{log_path.name} never got an assignment:\n{log[-3000:]}"
    return {int(p) for p in assignments[-1].split(",") if p.strip()}


def row_key(table: str, row: tuple) -> tuple:
    return tuple(row[:2]) if table == "abuse_flags" else (row[0],)


def difference(expected: dict[str, list], actual: dict[str, list], examples: int = 5) -> str:
    """Per table: rows missing, extra, or changed (same id, other values), with a few of each."""
    lines = []
    for table, want in expected.items():
        want_by = {row_key(table, r): r for r in want}
        got_by = {row_key(table, r): r for r in actual.get(table, [])}
        missing = [want_by[k] for k in want_by.keys() - got_by.keys()]
        extra = [got_by[k] for k in got_by.keys() - want_by.keys()]
        changed = [(want_by[k], got_by[k]) for k in want_by.keys() & got_by.keys() if want_by[k] != got_by[k]]
        if missing or extra or changed:
            lines.append(f"{table}: {len(missing)} missing {sorted(missing, key=repr)[:examples]}, {len(extra)} extra"
                         f" {sorted(extra, key=repr)[:examples]}, {len(changed)} changed (one run / two workers)"
                         f" {sorted(changed, key=repr)[:examples]}")
    return "\n".join(lines) or "no difference"


def test_two_workers_in_one_group_give_the_same_rows_as_one(isolated_factory):
    reference, events = traffic(visitors=3000)
    expected_counts, expected_rows = undisturbed_run(isolated_factory, reference, events)
    assert expected_counts["commission_facts"] > 20

    scaled = isolated_factory()
    publish_reference(scaled.config, *parse_reference_document(orjson.dumps(reference)))
    w1 = scaled.worker("w1").start()  # each worker its own state directory (conftest)
    w2 = scaled.worker("w2").start()
    produce_lines(scaled.config, events)  # while the two workers are still rebalancing

    try:
        wait_for_counts(scaled, expected_counts, timeout=240)
    except AssertionError as exc:
        raise AssertionError(f"{difference(expected_rows, snapshot(scaled))}\n{exc}") from None
    rows = snapshot(scaled)
    assert rows == expected_rows, difference(expected_rows, rows)
    assert w1.alive() and w2.alive()

    clicks = scaled.env["TOPIC_PREFIX"] + "clicks"
    for worker in (w1, w2):  # the group may still be settling: the rows can all be in first
        wait_until_it_owns_some_of(worker, clicks)
    owned = {w.log_path.stem: final_assignment(w.log_path, clicks) for w in (w1, w2)}
    assert all(owned.values()), f"a worker owns no {clicks} partition: {owned}"
    assert owned["w1"].isdisjoint(owned["w2"]), owned
    assert owned["w1"] | owned["w2"] == set(range(PARTITIONS)), owned


def wait_until_it_owns_some_of(worker, topic: str, timeout: float = 60.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.assert_alive_or_expected()
        if ASSIGNMENT.search(worker.log_path.read_text(errors="replace")):
            owned = final_assignment(worker.log_path, topic)
            if owned:
                return owned
        time.sleep(0.2)
    raise AssertionError(f"{worker.log_path.name} got no partition of {topic} in {timeout:.0f}s")


def test_a_worker_joining_and_another_leaving_mid_stream_change_no_row(isolated_factory):
    """Partitions move twice while batches are in flight and orders wait at the barriers: a
    second worker joins a busy first one, then the first one stops while both are busy. Every
    row is as in a one-worker run."""
    reference, events = traffic(visitors=15000, seed=12)
    expected_counts, expected_rows = undisturbed_run(isolated_factory, reference, events)

    moved = isolated_factory()
    publish(moved, reference, events)  # a backlog: both workers are busy while partitions move
    clicks_topic = moved.env["TOPIC_PREFIX"] + "clicks"
    clicks = "SELECT count() FROM {db}.clicks FINAL"
    # Small batches: the backlog must still be busy while partitions move (same rows either way).
    small = {"ATTRIBUTION_BATCH_SIZE": "100"}
    w1 = moved.worker("w1", **small).start()
    moved.wait_for(clicks, lambda n: n >= 2000, timeout=120)
    w2 = moved.worker("w2", **small).start()
    wait_until_it_owns_some_of(w2, clicks_topic)
    done_when_joined = moved.query(clicks)[0][0]
    moved.wait_for(clicks, lambda n: n >= done_when_joined + 2000, timeout=120)
    w1.stop()  # graceful: its partitions go to w2 while w2 is busy
    assert moved.query(clicks)[0][0] < expected_counts["clicks"], "the backlog was done too soon"

    try:
        wait_for_counts(moved, expected_counts, timeout=240, fail_on_stall=90)
    except AssertionError as exc:
        raise AssertionError(f"{difference(expected_rows, snapshot(moved))}\n{exc}") from None
    rows = snapshot(moved)
    assert rows == expected_rows, difference(expected_rows, rows)
    assert w2.alive()
