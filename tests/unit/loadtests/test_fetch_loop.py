"""The pure parts of `loadtests.fetch_loop`: the line its child prints and how it is read."""

from __future__ import annotations

import math

import pytest

from loadtests.fetch_loop import parse_rate_line, rate_line


def test_the_rate_line_reads_back() -> None:
    line = rate_line(295_000, 36.875, 41.234, "first-batch")
    assert line == "RATE 8000 RECORDS 295000 SECONDS 36.875 CPU 41.23 FROM first-batch"
    assert parse_rate_line(f"noise\n{line}\n") == (8000.0, 295_000, 36.875, 41.23, "first-batch")


def test_the_last_rate_line_counts_and_a_prefix_on_the_line_does_not_matter() -> None:
    output = ("[2026-12-01 10:00:00] RATE 10 RECORDS 1 SECONDS 0.1 CPU 1 FROM rebalance\n"
              "[warn] x RATE 20 RECORDS 2 SECONDS 0.1 CPU 2 FROM first-batch")
    assert parse_rate_line(output) == (20.0, 2, 0.1, 2.0, "first-batch")


def test_an_old_style_rate_line_has_the_rate_only() -> None:
    assert parse_rate_line("RATE 8204") == (8204.0, 0, 0.0, 0.0, "unknown")


@pytest.mark.parametrize("output", ["", "no rate here", "RATE many", "RATE"])
def test_no_rate_is_none(output: str) -> None:
    assert parse_rate_line(output) is None


def test_a_rate_over_no_time_is_not_a_number() -> None:
    rate = float(rate_line(10, 0.0, 0.0, "rebalance").split()[1])
    assert math.isnan(rate)
