"""The sample store (edge/sample_store.py) and the snippet file, without a browser or a broker."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from edge.sample_store import make_app
from edge.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature_problem

SECRET = "a-shared-secret-of-the-store-and-edge"
SNIPPET = Path(__file__).resolve().parents[3] / "edge" / "static" / "t.js"


async def checkout_through_a_fake_edge(cookies: dict[str, str], form: dict[str, str]) -> dict[str, Any]:
    """POST /checkout on the store; what a stand-in edge received from the store's back end."""
    received: dict[str, Any] = {}

    async def orders(request: web.Request) -> web.Response:
        received["body"] = await request.read()
        received["headers"] = dict(request.headers)
        return web.json_response({"accepted": 1, "rejected": []}, status=202)

    fake_edge = web.Application()
    fake_edge.router.add_post("/v1/orders", orders)
    async with TestServer(fake_edge) as edge_server:
        store = make_app(str(edge_server.make_url("/")), SECRET)
        async with TestClient(TestServer(store)) as client:
            client.session.cookie_jar.update_cookies(cookies)
            page = await (await client.get("/product")).text()
            received["page"] = page
            answer = await client.post("/checkout", data=form)
            received["confirmation"] = await answer.text()
    return received


def test_checkout_sends_the_visitor_cookie_as_a_signed_order_the_edge_accepts() -> None:
    received = asyncio.run(checkout_through_a_fake_edge(
        {"av": "visitor-1", "as": "session-1"}, {"customer": "cust-7", "quantity": "2"}))

    body, headers = received["body"], received["headers"]
    assert signature_problem(SECRET.encode(), headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER],
                             body, time.time()) is None
    order = orjson.loads(body)
    assert (order["type"], order["visitor_id"], order["session_id"], order["customer_id"]) == (
        "order", "visitor-1", "session-1", "cust-7")
    assert (order["total"], order["currency"], order["items"][0]["quantity"]) == ("48.00", "EUR", 2)
    assert order["event_id"] == f"order-{order['order_id']}"
    assert "202" in received["confirmation"] and order["order_id"] in received["confirmation"]
    assert '/t.js" async></script>' in received["page"]


def test_the_price_comes_from_the_catalogue_and_a_browser_without_the_cookie_still_buys() -> None:
    received = asyncio.run(checkout_through_a_fake_edge(
        {}, {"customer": "cust-8", "quantity": "1000", "total": "0.01"}))
    order = orjson.loads(received["body"])
    assert order["total"] == str(24 * 99) + ".00"  # quantity capped, form's total ignored
    assert order["visitor_id"].startswith("store-") and "session_id" not in order


def test_the_snippet_is_under_3_kb() -> None:
    assert len(SNIPPET.read_bytes()) < 3 * 1024


def test_the_snippet_parses() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the snippet's syntax check needs it")
    done = subprocess.run([node, "--check", str(SNIPPET)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
