"""The tracking edge's HTTP side (contract §8): every route, its statuses, cookies and checks.

Browsers and store back ends talk to this; Kafka never sees a request. Each route turns what it
was sent into validated events (`schemas.validation.decode_event`, one element at a time, as the
worker would), keys them exactly as `attribution produce` does (`streams.publish.route`) and hands
them to `edge.delivery.Delivery`, answering `2xx` only once `deliver` returned (the events are in
Kafka or fsynced to the spool). This module must never:

- redirect anywhere but a configured link's `url` or a host in `allowed_redirect_hosts`;
- let `ip` or `user_agent` out unhashed (they are replaced by `keyed_hash(…, PII_KEY)` here);
- record anything from a postback whose signature is missing, wrong or stale (`edge.signing`),
  from a request refused by a rate limit (`edge.limits`), or a bot's click (`edge.bots`);
- log a secret, a cookie, an address or a body.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import signal
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from yarl import URL

from edge import metrics
from edge.bots import is_automated
from edge.delivery import EdgeEvent, SpoolFull
from edge.limits import RateLimiter
from edge.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature_problem
from schemas.config import Config
from schemas.pii import is_keyed_hash, keyed_hash
from schemas.reference import Link, ReferenceData
from schemas.validation import InvalidEvent, decode_event
from streams.publish import route as route_event
from streams.rules.abuse import host_matches

log = logging.getLogger(__name__)

#: Contract §8: a browser batch is at most 500 events and 256 KiB.
MAX_BROWSER_EVENTS = 500
MAX_BROWSER_BODY = 256 * 1024
#: A postback (one order or an array of them) from a store's back end: the same 500 events, in
#: up to 1 MiB (orders with many items are larger than clicks). Also the largest body the server
#: reads at all (aiohttp's client_max_size): anything larger is 413 before it is buffered.
MAX_POSTBACK_EVENTS = 500
MAX_POSTBACK_BODY = 1024 * 1024
#: Request line and each header at most 8 KiB (aiohttp's default, pinned), 100 headers at most.
MAX_LINE_BYTES = 8190
MAX_HEADER_BYTES = 8190
MAX_HEADERS = 100

VISITOR_COOKIE = "av"
SESSION_COOKIE = "as"
#: The visitor cookie lives a year (contract §8); the session cookie until the browser closes.
VISITOR_COOKIE_MAX_AGE = 365 * 24 * 3600
#: A cookie value taken as a visitor or session id: what the edge and t.js write (uuid4 hex),
#: with room for a store's own ids; anything else is replaced, never copied into an event.
_COOKIE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Host names an ad-hoc redirect may name: ASCII letters, digits, dots and hyphens only (an IDN
#: must come punycoded), so no percent-escape, backslash or userinfo can make a browser read a
#: host other than the one checked.
_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
#: Retry-After when delivery failed for a reason other than a full spool.
DELIVERY_FAILED_RETRY_AFTER = 5
#: t.js changes with releases: browsers and CDNs may keep it 5 minutes.
SNIPPET_CACHE_CONTROL = "public, max-age=300"
SNIPPET_PATH = Path(__file__).parent / "static" / "t.js"

BROWSER_TYPES = ("click", "share")


class References(Protocol):
    """What the edge needs of `streams.reference.ReferenceReader`."""

    snapshot: ReferenceData
    ready: asyncio.Event


class EventSink(Protocol):
    """What the edge needs of `edge.delivery.Delivery`."""

    async def deliver(self, events: Sequence[EdgeEvent]) -> None: ...

    @property
    def ready(self) -> bool: ...


def _utc_now_text(now: float) -> str:
    """The time the edge gives an event that has none: whole seconds, rounded down. A store
    whose order `ts` has whole seconds then never sees a click of the same second as later than
    its order (a click must be at or before the order to count), and ClickHouse keeps seconds."""
    return datetime.fromtimestamp(int(now), timezone.utc).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def _json(body: object, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, headers=headers,
                        content_type="application/json")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json({"error": message}, status, headers)


def with_query(url: str, **params: str) -> str:
    """`url` with `params` set in its query (replacing any of the same name), fragment kept."""
    return str(URL(url).update_query(params))


def redirect_target_problem(target: str, allowed_hosts: Sequence[str]) -> str | None:
    """None when an ad-hoc link may redirect to `target`; else why not.

    Only absolute http(s) URLs whose host is an allowed host or a subdomain of one. Anything a
    browser could read differently from `urlsplit` is refused outright: backslashes, control
    characters and spaces, userinfo (`https://shop.example@evil.com`), a host that is not a
    plain ASCII name (percent-escapes, IP literals), scheme-relative `//evil.com`.
    """
    if not target or any(c == "\\" or ord(c) <= 0x20 or ord(c) == 0x7F for c in target):
        return "not a plain URL"
    lowered = target.lower()
    if not (lowered.startswith("https://") or lowered.startswith("http://")):
        return "only http and https URLs"
    parts = urlsplit(target)
    if "@" in parts.netloc:
        return "user info in the URL"
    try:
        host = (parts.hostname or "").rstrip(".")
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return "bad host or port"
    if not _HOST_NAME.fullmatch(host):
        return "bad host"
    if not host_matches(host, allowed_hosts):
        return "host not allowed"
    return None


def origin_allowed(origin: str, allowed_hosts: Sequence[str]) -> bool:
    """Whether a page of `origin` (scheme://host[:port]) may post events."""
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or "@" in parts.netloc:
        return False
    try:
        host = (parts.hostname or "").rstrip(".")
    except ValueError:
        return False
    return bool(_HOST_NAME.fullmatch(host)) and host_matches(host, allowed_hosts)


def _trusted_networks(setting: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(item.strip(), strict=False)
                 for item in setting.split(",") if item.strip())


class Edge:
    """The routes, with what they share: config, reference data, delivery, limits, clock."""

    def __init__(self, config: Config, delivery: EventSink, references: References, *,
                 clock: Callable[[], float] = time.time,
                 snippet_path: Path = SNIPPET_PATH) -> None:
        if config.pii_key is None or config.edge_secret is None:
            raise ValueError("the edge needs PII_KEY and EDGE_SECRET")
        self.pii_key: bytes = config.pii_key
        self.edge_secret: bytes = config.edge_secret
        self.delivery = delivery
        self.references = references
        self.clock = clock
        self.snippet_path = snippet_path
        self.per_ip = RateLimiter(config.edge_rate_per_ip, config.edge_burst_per_ip)
        self.per_link = RateLimiter(config.edge_rate_per_link, config.edge_burst_per_link)
        self.trusted_proxies = _trusted_networks(config.edge_trusted_proxies)

    # --- the request's client -------------------------------------------------------------

    def client_address(self, request: web.Request) -> str:
        """The client's IP address: the peer's, or, when the peer is a trusted proxy, the last
        X-Forwarded-For hop that is not one (the ones before it could be made up)."""
        peer = request.remote or ""
        if not self.trusted_proxies or not self._is_trusted(peer):
            return peer
        hops = [hop.strip() for header in request.headers.getall("X-Forwarded-For", [])
                for hop in header.split(",")]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop
        return peer

    def is_https(self, request: web.Request) -> bool:
        """Whether the browser reached the edge over HTTPS (itself, or a trusted proxy says so)."""
        if request.secure:
            return True
        forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
        return forwarded == "https" and self._is_trusted(request.remote or "")

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted_proxies)

    def _rate_key(self, address: str) -> str:
        """An IPv6 client is limited by its /64: one host commonly holds the whole prefix."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address
        if ip.version == 6:
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(ip)

    def _limited(self, limiter: RateLimiter, key: str, limit: str) -> web.Response | None:
        wait = limiter.take(key)
        if not wait:
            return None
        metrics.RATE_LIMITED.labels(limit).inc()
        return _error(429, "too many requests", {"Retry-After": str(wait)})

    def _hashed(self, value: str) -> str:
        return keyed_hash(value.strip(), self.pii_key)

    # --- delivery ------------------------------------------------------------------------

    async def _deliver(self, events: list[EdgeEvent]) -> web.Response | None:
        """None once `events` are durable; else the 503 to answer."""
        if not events:
            return None
        try:
            await self.delivery.deliver(events)
        except SpoolFull as full:
            return _error(503, "spool full", {"Retry-After": str(max(1, int(full.retry_after)))})
        except Exception:
            log.exception("delivering %d events failed", len(events))
            return _error(503, "delivery failed", {"Retry-After": str(DELIVERY_FAILED_RETRY_AFTER)})
        for event in events:
            metrics.EVENTS_ACCEPTED.labels(event.topic).inc()
        return None

    def _event(self, element: dict[str, Any], expected_type: str, now: float) -> EdgeEvent:
        """The element as the EdgeEvent to deliver; InvalidEvent when it is not valid alone."""
        try:
            raw = orjson.dumps(element)
        except orjson.JSONEncodeError:
            raise InvalidEvent("too_deep", "nested deeper than the edge writes") from None
        max_future = self.references.snapshot.settings.max_future_seconds
        not_after = datetime.fromtimestamp(now, timezone.utc) + timedelta(seconds=max_future)
        decode_event(raw, expected_type, not_after=not_after)
        routed = route_event(raw)
        if isinstance(routed, str):  # cannot happen to a valid event; never send it unkeyed
            raise InvalidEvent("missing_field", routed)
        topic, key = routed
        return EdgeEvent(topic=topic, key=key, value=raw)

    def _admit(
        self, elements: list[Any], allowed_types: Sequence[str], now: float,
        complete: Callable[[dict[str, Any]], None],
    ) -> tuple[list[EdgeEvent], list[dict[str, object]]]:
        """Each element validated alone: the events to deliver and the rejected indexes."""
        events: list[EdgeEvent] = []
        rejected: list[dict[str, object]] = []
        for index, element in enumerate(elements):
            try:
                if not isinstance(element, dict):
                    raise InvalidEvent("not_object", "not a JSON object")
                event_type = element.get("type")
                if not isinstance(event_type, str) or event_type not in allowed_types:
                    known = event_type in ("click", "share", "order", "refund")
                    raise InvalidEvent("type_mismatch" if known else "unknown_type",
                                       f"{event_type!r} not accepted here")
                if element.get("event_id") is None:
                    element["event_id"] = uuid.uuid4().hex
                if element.get("ts") is None:
                    element["ts"] = _utc_now_text(now)
                complete(element)
                events.append(self._event(element, event_type, now))
            except InvalidEvent as invalid:
                metrics.EVENTS_REJECTED.labels(invalid.reason).inc()
                rejected.append({"index": index, "reason": invalid.reason})
        return events, rejected

    async def _admit_and_deliver(
        self, body: bytes, allowed_types: Sequence[str], max_events: int,
        complete: Callable[[dict[str, Any]], None], *, array_only: bool,
    ) -> web.Response:
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _error(400, "the body is not JSON")
        if isinstance(document, dict) and not array_only:
            document = [document]
        if not isinstance(document, list):
            return _error(400, "the body must be a JSON array of events")
        if len(document) > max_events:
            return _error(413, f"at most {max_events} events per request")
        now = self.clock()
        events, rejected = self._admit(document, allowed_types, now, complete)
        failed = await self._deliver(events)
        if failed is not None:
            return failed
        return _json({"accepted": len(events), "rejected": rejected}, 202)

    # --- tracking links ------------------------------------------------------------------

    async def follow_link(self, request: web.Request) -> web.Response:
        """GET /r/{link_id}: a configured tracking link."""
        address = self.client_address(request)
        refused = self._limited(self.per_ip, self._rate_key(address), "ip")
        if refused is not None:
            return refused
        link = self.references.snapshot.settings.link(request.match_info["link_id"])
        if link is None:
            return _error(404, "unknown link")
        return await self._click_and_redirect(request, link, address, f"link:{link.link_id}")

    async def follow_ad_hoc(self, request: web.Request) -> web.Response:
        """GET /r?aff=ID&to=URL[&channel=C]: an ad-hoc link to an allowed host."""
        address = self.client_address(request)
        refused = self._limited(self.per_ip, self._rate_key(address), "ip")
        if refused is not None:
            return refused
        affiliate_id = request.query.get("aff", "").strip()
        target = request.query.get("to", "")
        if not affiliate_id:
            return _error(400, "aff is required")
        settings = self.references.snapshot.settings
        problem = redirect_target_problem(target, settings.allowed_redirect_hosts)
        if problem is not None:
            return _error(400, f"to: {problem}")
        if affiliate_id not in self.references.snapshot.affiliates:
            return _error(404, "unknown affiliate")
        link = Link(link_id="", affiliate_id=affiliate_id, url=target,
                    channel=request.query.get("channel", "other") or "other")
        return await self._click_and_redirect(request, link, address, f"aff:{affiliate_id}")

    async def _click_and_redirect(self, request: web.Request, link: Link, address: str,
                                  link_key: str) -> web.Response:
        refused = self._limited(self.per_link, link_key, "link")
        if refused is not None:
            return refused
        user_agent = request.headers.get("User-Agent", "")
        if is_automated(user_agent):
            metrics.BOT_CLICKS.inc()
            return web.Response(status=302, headers={"Location": with_query(link.url),
                                                     "Cache-Control": "no-store"})
        visitor_id = request.cookies.get(VISITOR_COOKIE, "")
        if not _COOKIE_ID.fullmatch(visitor_id):
            visitor_id = uuid.uuid4().hex
        session_id = request.cookies.get(SESSION_COOKIE, "")
        if not _COOKIE_ID.fullmatch(session_id):
            session_id = uuid.uuid4().hex
        now = self.clock()
        click: dict[str, Any] = {
            "event_id": uuid.uuid4().hex, "type": "click", "ts": _utc_now_text(now),
            "visitor_id": visitor_id, "session_id": session_id,
            "affiliate_id": link.affiliate_id, "channel": link.channel,
            "landing_url": link.url, "ip": self._hashed(address),
            "user_agent": self._hashed(user_agent),
        }
        if link.link_id:
            click["link_id"] = link.link_id  # an extra field: ignored by the worker, kept in Kafka
        referrer = request.headers.get("Referer", "").strip()
        if referrer:
            click["referrer"] = referrer
        try:
            event = self._event(click, "click", now)
        except InvalidEvent as invalid:
            metrics.EVENTS_REJECTED.labels(invalid.reason).inc()
            return _error(400, f"this link cannot be recorded ({invalid.reason})")
        failed = await self._deliver([event])
        if failed is not None:
            return failed
        location = with_query(link.url, aclid=click["event_id"], av=visitor_id)
        response = web.Response(status=302, headers={"Location": location,
                                                     "Cache-Control": "no-store"})
        secure = self.is_https(request)
        response.set_cookie(VISITOR_COOKIE, visitor_id, path="/", max_age=VISITOR_COOKIE_MAX_AGE,
                            samesite="Lax", secure=secure)
        response.set_cookie(SESSION_COOKIE, session_id, path="/", samesite="Lax", secure=secure)
        return response

    # --- browser events ------------------------------------------------------------------

    def _cors_headers(self, request: web.Request) -> dict[str, str] | None:
        """The CORS headers for an allowed Origin; {} without one; None for a refused one."""
        origin = request.headers.get("Origin")
        if origin is None:
            return {}  # not a cross-origin browser request
        if not origin_allowed(origin, self.references.snapshot.settings.allowed_origins):
            return None
        return {"Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Credentials": "true", "Vary": "Origin"}

    async def events_preflight(self, request: web.Request) -> web.Response:
        """OPTIONS /v1/events: CORS preflight, allowed only for `allowed_origins`."""
        headers = self._cors_headers(request)
        if not headers:
            return _error(403, "origin not allowed", {"Vary": "Origin"})
        headers.update({"Access-Control-Allow-Methods": "POST, OPTIONS",
                        "Access-Control-Allow-Headers": "Content-Type",
                        "Access-Control-Max-Age": "600"})
        return web.Response(status=204, headers=headers)

    async def browser_events(self, request: web.Request) -> web.Response:
        """POST /v1/events: click and share events from a store's pages."""
        cors = self._cors_headers(request)
        if cors is None:
            return _error(403, "origin not allowed", {"Vary": "Origin"})
        try:
            response = await self._browser_events(request)
        except web.HTTPRequestEntityTooLarge:  # a body beyond client_max_size, sent chunked
            response = _error(413, f"at most {MAX_BROWSER_BODY} bytes")
        response.headers.update(cors)  # so that the page can read why it was refused
        return response

    async def _browser_events(self, request: web.Request) -> web.Response:
        address = self.client_address(request)
        refused = self._limited(self.per_ip, self._rate_key(address), "ip")
        if refused is not None:
            return refused
        if (request.content_length or 0) > MAX_BROWSER_BODY:
            return _error(413, f"at most {MAX_BROWSER_BODY} bytes")
        body = await request.read()
        if len(body) > MAX_BROWSER_BODY:
            return _error(413, f"at most {MAX_BROWSER_BODY} bytes")
        visitor_id = request.cookies.get(VISITOR_COOKIE, "")
        session_id = request.cookies.get(SESSION_COOKIE, "")
        ip = self._hashed(address)
        user_agent = request.headers.get("User-Agent", "")
        user_agent_hash = self._hashed(user_agent) if user_agent.strip() else None

        def complete(element: dict[str, Any]) -> None:
            # What the browser says about its own address is not believed: the request's is used.
            element.pop("ip", None)
            element.pop("user_agent", None)
            if element["type"] != "click":
                return
            if element.get("visitor_id") is None and _COOKIE_ID.fullmatch(visitor_id):
                element["visitor_id"] = visitor_id
            if element.get("session_id") is None and _COOKIE_ID.fullmatch(session_id):
                element["session_id"] = session_id
            element["ip"] = ip
            if user_agent_hash is not None:
                element["user_agent"] = user_agent_hash

        return await self._admit_and_deliver(body, BROWSER_TYPES, MAX_BROWSER_EVENTS, complete,
                                             array_only=True)

    # --- signed postbacks ----------------------------------------------------------------

    async def orders(self, request: web.Request) -> web.Response:
        """POST /v1/orders: signed orders from the store's back end."""
        return await self._postback(request, "order")

    async def refunds(self, request: web.Request) -> web.Response:
        """POST /v1/refunds: signed refunds from the store's back end."""
        return await self._postback(request, "refund")

    async def _postback(self, request: web.Request, event_type: str) -> web.Response:
        if (request.content_length or 0) > MAX_POSTBACK_BODY:
            return _error(413, f"at most {MAX_POSTBACK_BODY} bytes")
        body = await request.read()  # client_max_size: 413 beyond MAX_POSTBACK_BODY
        problem = signature_problem(self.edge_secret, request.headers.get(TIMESTAMP_HEADER),
                                    request.headers.get(SIGNATURE_HEADER), body, self.clock())
        if problem is not None:
            return _error(401, problem)

        def complete(element: dict[str, Any]) -> None:
            # The customer's address and browser, as the store saw them: hashed before they leave.
            for name in ("ip", "user_agent"):
                value = element.get(name)
                if isinstance(value, str) and value.strip() and not is_keyed_hash(value):
                    element[name] = self._hashed(value)

        return await self._admit_and_deliver(body, (event_type,), MAX_POSTBACK_EVENTS, complete,
                                             array_only=False)

    # --- the snippet and operations -------------------------------------------------------

    async def snippet(self, request: web.Request) -> web.StreamResponse:
        """GET /t.js: the browser snippet."""
        try:
            script = await asyncio.to_thread(self.snippet_path.read_bytes)
        except FileNotFoundError:
            return _error(404, "no snippet installed")
        return web.Response(body=script, content_type="application/javascript", charset="utf-8",
                            headers={"Cache-Control": SNIPPET_CACHE_CONTROL,
                                     "X-Content-Type-Options": "nosniff"})

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "alive"}, 200)

    async def readyz(self, request: web.Request) -> web.Response:
        reference_loaded = self.references.ready.is_set()
        delivery_ready = self.delivery.ready
        status = 200 if reference_loaded and delivery_ready else 503
        return _json({"reference_loaded": reference_loaded, "delivery_ready": delivery_ready},
                     status)

    async def metrics_page(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response


@web.middleware
async def observe(request: web.Request, handler: Any) -> web.StreamResponse:
    """Counts every answer by route pattern and status, and times it."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    started = time.perf_counter()
    status = 500
    try:
        response: web.StreamResponse = await handler(request)
        status = response.status
        return response
    except web.HTTPException as http_error:
        status = http_error.status
        raise
    finally:
        metrics.REQUESTS.labels(route, str(status)).inc()
        metrics.REQUEST_SECONDS.labels(route).observe(time.perf_counter() - started)


def build_app(config: Config, delivery: EventSink, references: References, *,
              clock: Callable[[], float] = time.time, snippet_path: Path = SNIPPET_PATH
              ) -> web.Application:
    """The edge's aiohttp application (no server, no Kafka: tests drive it with fakes)."""
    edge = Edge(config, delivery, references, clock=clock, snippet_path=snippet_path)
    app = web.Application(middlewares=[observe], client_max_size=MAX_POSTBACK_BODY)
    app.router.add_get("/r/{link_id}", edge.follow_link, allow_head=False)
    app.router.add_get("/r", edge.follow_ad_hoc, allow_head=False)
    app.router.add_post("/v1/events", edge.browser_events)
    app.router.add_route("OPTIONS", "/v1/events", edge.events_preflight)
    app.router.add_post("/v1/orders", edge.orders)
    app.router.add_post("/v1/refunds", edge.refunds)
    app.router.add_get("/t.js", edge.snippet)
    app.router.add_get("/healthz", edge.healthz)
    app.router.add_get("/readyz", edge.readyz)
    app.router.add_get("/metrics", edge.metrics_page)
    return app


#: How long a graceful stop waits for requests in flight before closing their connections.
SHUTDOWN_SECONDS = 10.0
#: Reading the reference topics again after a failure (e.g. they do not exist yet: the first
#: worker creates them): first wait, and the most it grows to.
REFERENCE_RETRY_SECONDS = 1.0
REFERENCE_RETRY_MAX_SECONDS = 30.0


async def keep_reading(references: Any) -> None:
    """`ReferenceReader.run()`, started again with backoff whenever it fails: an edge whose
    reference topics are missing or unreachable stays up and answers /readyz 503 until it has
    read them (what it already read stays in use meanwhile)."""
    wait = REFERENCE_RETRY_SECONDS
    while True:
        try:
            await references.run()
            return
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.warning("cannot read the reference topics (%s); trying again in %.0f s",
                        error, wait)
        await asyncio.sleep(wait)
        wait = min(wait * 2, REFERENCE_RETRY_MAX_SECONDS)


async def serve(config: Config, *, host: str = "0.0.0.0",
                stop: asyncio.Event | None = None) -> None:
    """Run the edge until SIGTERM/SIGINT (or `stop`): then stop accepting, finish the requests
    in flight, and drain the delivery (`Delivery.stop`) before returning."""
    from edge.delivery import Delivery
    from streams.reference import ReferenceReader

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    references = ReferenceReader(config)
    reference_task = asyncio.create_task(keep_reading(references), name="edge-reference")
    delivery = Delivery(config)
    await delivery.start()
    runner = web.AppRunner(build_app(config, delivery, references), access_log=None,
                           shutdown_timeout=SHUTDOWN_SECONDS, max_line_size=MAX_LINE_BYTES,
                           max_field_size=MAX_HEADER_BYTES, max_headers=MAX_HEADERS)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, config.edge_port)
        await site.start()
        log.info("edge listening on %s:%d", host, config.edge_port)
        await stop.wait()
        log.info("edge stopping: no new connections, finishing requests, draining delivery")
    finally:
        await runner.cleanup()
        await delivery.stop()
        reference_task.cancel()
        await asyncio.gather(reference_task, return_exceptions=True)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
