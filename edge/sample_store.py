"""A sample store integrated with the tracking edge (contract §8): what a shop's own code does.

    EDGE_SECRET=... python -m edge.sample_store --edge http://127.0.0.1:8080 --port 8000

It is the README's integration example and the store of tests/integration/test_browser.py, so it
stays small and never imports the pipeline: a store knows only the edge's URL and the secret.

- The product page includes the edge's snippet, `<script src="EDGE/t.js" async>`. The snippet
  keeps the visitor id in the store's own first-party cookie `av` (Path=/, SameSite=Lax, a year;
  its session in the session cookie `as`). An `av` in the landing URL, put there by the edge's
  `/r/{link_id}`, wins over the cookie: it is the visitor the click was recorded for.
- A landing with `aclid` came through `/r`, which recorded the click before redirecting: the
  snippet sends nothing then (a second click would count twice). A landing straight on the store,
  `?aff=ID[&channel=C][&share=S]`, sends its click to `EDGE/v1/events` once per tab and URL (a
  reload does not count again), by `navigator.sendBeacon`, else `fetch` with `keepalive`.
- `attribution.share(channel, shareId[, affiliateId])` records a share (the affiliate is the
  argument or the script tag's `data-affiliate`) and returns the store URL to share.
- The checkout back end (`POST /checkout`) reads the cookie `av` and sends the order to
  `EDGE/v1/orders` signed: `X-Attribution-Timestamp` (Unix seconds) and
  `X-Attribution-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" with EDGE_SECRET>`.
  Prices come from the store's catalogue, never from the form.

A real store would queue a postback the edge did not accept and send it again, signed afresh
(the edge refuses a timestamp more than 300 s old; orders are deduplicated by `order_id`).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import html
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal

from aiohttp import ClientError, ClientSession, ClientTimeout, web



@dataclass(frozen=True)
class Product:
    sku: str
    name: str
    category: str
    price: Decimal


PRODUCT = Product(sku="mug-1", name="Attribution mug", category="home", price=Decimal("24.00"))
CURRENCY = "EUR"
# A postback is a server-to-server call on the customer's checkout: wait a little, not forever.
POSTBACK_TIMEOUT = ClientTimeout(total=10)

EDGE_URL = web.AppKey("edge_url", str)
EDGE_SECRET = web.AppKey("edge_secret", str)


def signed_headers(secret: str, body: bytes, now: float | None = None) -> dict[str, str]:
    """The headers that prove to the edge that `body` comes from this store, now."""
    timestamp = str(int(time.time() if now is None else now))
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-Attribution-Timestamp": timestamp,
            "X-Attribution-Signature": f"sha256={digest}"}


async def product_page(request: web.Request) -> web.Response:
    edge = html.escape(request.app[EDGE_URL], quote=True)
    name = html.escape(PRODUCT.name)
    return web.Response(content_type="text/html", text=f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{name}</title>
<script src="{edge}/t.js" async></script></head>
<body><h1>{name}</h1><p>{PRODUCT.price} {CURRENCY}</p>
<form method="post" action="/checkout">
<label>Customer number <input name="customer" value="cust-1001"></label>
<label>Quantity <input name="quantity" type="number" value="1" min="1" max="99"></label>
<button id="checkout" type="submit">Buy now</button>
</form></body></html>
""")


async def checkout(request: web.Request) -> web.Response:
    form = await request.post()
    try:
        quantity = min(max(int(str(form.get("quantity", "1"))), 1), 99)
    except ValueError:
        quantity = 1
    price = PRODUCT.price
    order_id = f"o-{uuid.uuid4().hex[:12]}"
    order = {
        "event_id": f"order-{order_id}",
        "type": "order",
        "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "order_id": order_id,
        # The snippet's first-party cookie; a browser without it still buys, unattributed.
        "visitor_id": request.cookies.get("av") or f"store-{uuid.uuid4().hex}",
        "customer_id": str(form.get("customer") or "guest")[:128],
        "currency": CURRENCY,
        "total": str(price * quantity),
        "items": [{"sku": PRODUCT.sku, "category": PRODUCT.category,
                   "quantity": quantity, "price": str(price)}],
    }
    if request.cookies.get("as"):
        order["session_id"] = request.cookies["as"]
    body = json.dumps(order).encode()
    headers = signed_headers(request.app[EDGE_SECRET], body)
    try:
        async with ClientSession(timeout=POSTBACK_TIMEOUT) as session:
            async with session.post(f"{request.app[EDGE_URL]}/v1/orders", data=body,
                                    headers=headers) as answer:
                postback = f"{answer.status} {await answer.text()}"
    except (ClientError, TimeoutError) as exc:
        postback = f"not sent: {exc.__class__.__name__}"
    return web.Response(content_type="text/html", text=f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Thank you</title></head>
<body><h1>Thank you</h1><p>Order <span id="order">{order_id}</span>,
total {order["total"]} {CURRENCY}.</p>
<p>Postback to the edge: <span id="postback">{html.escape(postback)}</span></p></body></html>
""")


def make_app(edge_url: str, edge_secret: str) -> web.Application:
    app = web.Application()
    app[EDGE_URL] = edge_url.rstrip("/")
    app[EDGE_SECRET] = edge_secret
    app.router.add_get("/", product_page)
    app.router.add_get("/product", product_page)
    app.router.add_post("/checkout", checkout)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edge", required=True, help="the edge's base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    secret = os.environ.get("EDGE_SECRET", "").strip()
    if not secret:
        sys.exit("error: EDGE_SECRET is not set (the secret shared with the edge)")
    web.run_app(make_app(args.edge, secret), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
