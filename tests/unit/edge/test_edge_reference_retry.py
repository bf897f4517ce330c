"""The edge keeps reading its reference topics until it can (it never dies of their absence)."""

from __future__ import annotations

import asyncio

import pytest

from edge import app


class FlakyReader:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.runs = 0

    async def run(self) -> None:
        self.runs += 1
        if self.runs <= self.failures:
            raise RuntimeError("topic 'ref-programs' does not exist")


def test_a_failing_reference_reader_is_started_again_with_backoff(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app, "REFERENCE_RETRY_SECONDS", 0.001)
    reader = FlakyReader(failures=3)
    asyncio.run(app.keep_reading(reader))
    assert reader.runs == 4
