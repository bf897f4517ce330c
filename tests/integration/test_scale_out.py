"""Scale-out: two workers in one consumer group write the same ClickHouse rows as one worker.

The two workers start together while the traffic is published, so the group rebalances (one
member takes everything, then hands half over) with orders waiting at the barriers: the way a
second replica joins a running deployment.
"""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest

from loadtests.generator import TrafficProfile, generate, sample_reference
from schemas.validation import parse_reference_document
from streams.publish import produce_lines, publish_reference
from test_resilience import snapshot, undisturbed_run, wait_for_counts

pytestmark = pytest.mark.integration

PARTITIONS = 4  # ATTRIBUTION_PARTITIONS of every isolated environment (tests/conftest.py)

#: aiokafka logs every assignment; Faust renders a non-empty one as a table of topic | {partitions}
#: (ranges folded: "{0-1, 3}") and an empty one as "set()".
ASSIGNMENT = re.compile(r"Setting newly assigned partitions (.*?) for group", re.DOTALL)


def traffic(visitors: int, seed: int = 11) -> tuple[dict, list[bytes]]:
    reference = sample_reference(n_affiliates=20)
    events = [orjson.dumps(e) for e in generate(reference, TrafficProfile(visitors=visitors, seed=seed))]
    return reference, events


def parse_partition_set(text: str) -> set[int]:
    """`{0-1, 3}` -> {0, 1, 3}."""
    partitions: set[int] = set()
    for part in text.strip().strip("{}").split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        partitions.update(range(int(low), int(high or low) + 1))
    return partitions


def final_assignment(log_path: Path, topic: str) -> set[int]:
    """The partitions of `topic` in the last assignment a worker's log shows."""
    log = log_path.read_text(errors="replace")
    assignments = ASSIGNMENT.findall(log)
    assert assignments, f"{log_path.name} never got an assignment:\n{log[-3000:]}"
    row = re.search(rf"^\|\s*{re.escape(topic)}\s*\|\s*(\{{[^}}]*\}})\s*\|", assignments[-1], re.MULTILINE)
    return parse_partition_set(row.group(1)) if row else set()


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


@pytest.mark.xfail(
    strict=False,
    reason="known defect, issue 5: when partitions move between two live workers, rows can go"
    " missing or a partition stops advancing (faust-streaming offset/gap handling on rebalance,"
    " not understood yet). Passed in about half of the runs; README 'Scaling out' says run one"
    " worker.",
)
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
    owned = {w.log_path.stem: final_assignment(w.log_path, clicks) for w in (w1, w2)}
    assert all(owned.values()), f"a worker owns no {clicks} partition: {owned}"
    assert owned["w1"].isdisjoint(owned["w2"]), owned
    assert owned["w1"] | owned["w2"] == set(range(PARTITIONS)), owned
