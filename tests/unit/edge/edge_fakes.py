"""Doubles for the edge's unit tests: a Delivery that keeps what it was given (or refuses it), and
reference data held in memory, plus a runner for aiohttp's test client without pytest plugins."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
from aiohttp.test_utils import TestClient, TestServer

from edge.app import build_app
from edge.delivery import EdgeEvent, SpoolFull
from schemas.config import Config
from schemas.reference import Affiliate, Link, ReferenceData, Settings

PII_KEY = "unit-test-pii-key-0123456789"
EDGE_SECRET = "unit-test-edge-secret-0123456789"
NOW = 1_796_000_000.0  # 2026-11-30T00:53:20Z, a fixed clock


class FakeDelivery:
    """Keeps every delivered event; `full` makes it answer like a full spool."""

    def __init__(self) -> None:
        self.events: list[EdgeEvent] = []
        self.full = False
        self.ready = True

    async def deliver(self, events: Sequence[EdgeEvent]) -> None:
        if self.full:
            raise SpoolFull(30)
        self.events.extend(events)

    def values(self) -> list[dict[str, Any]]:
        return [orjson.loads(event.value) for event in self.events]


class FakeReferences:
    def __init__(self, settings: Settings, affiliates: tuple[str, ...] = ("sally",),
                 loaded: bool = True) -> None:
        self.snapshot = ReferenceData(
            affiliates={a: Affiliate(affiliate_id=a, program_id="p") for a in affiliates},
            settings=settings)
        self.ready = asyncio.Event()
        if loaded:
            self.ready.set()


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        links=(Link("summer", "sally", "https://shop.example/sale?utm=x#top", "instagram"),),
        allowed_redirect_hosts=("shop.example",),
        allowed_origins=("shop.example",),
    )
    values.update(overrides)
    return Settings(**values)


def config(**env: str) -> Config:
    values: dict[str, Any] = {"PII_KEY": PII_KEY, "EDGE_SECRET": EDGE_SECRET, **env}
    return Config(**values)


def run_edge(
    scenario: Callable[[TestClient[Any, Any], FakeDelivery], Awaitable[None]],
    *, delivery: FakeDelivery | None = None, references: FakeReferences | None = None,
    clock: Callable[[], float] = lambda: NOW, snippet_path: Path | None = None,
    **env: str,
) -> FakeDelivery:
    """Runs `scenario` against an edge on a test server; the delivery it used."""
    used = delivery or FakeDelivery()

    async def main() -> None:
        refs = references or FakeReferences(settings())
        extra = {"snippet_path": snippet_path} if snippet_path is not None else {}
        app = build_app(config(**env), used, refs, clock=clock, **extra)
        async with TestClient(TestServer(app)) as client:
            await scenario(client, used)

    asyncio.run(main())
    return used
