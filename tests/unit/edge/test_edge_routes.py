"""Every route and status of contract §8, against the edge with a fake Delivery."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
from aiohttp.test_utils import TestClient

from edge.signing import signature
from schemas.pii import keyed_hash

from edge_fakes import (
    EDGE_SECRET,
    NOW,
    PII_KEY,
    FakeDelivery,
    FakeReferences,
    run_edge,
    settings,
)

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/131.0.0.0 Safari/537.36")
BROWSER = {"User-Agent": CHROME}
Client = TestClient[Any, Any]


def hashed(value: str) -> str:
    return keyed_hash(value, PII_KEY.encode())


def signed(body: bytes, timestamp: float = NOW, secret: str = EDGE_SECRET) -> dict[str, str]:
    ts = str(int(timestamp))
    return {"X-Attribution-Timestamp": ts,
            "X-Attribution-Signature": signature(secret.encode(), ts, body),
            "Content-Type": "application/json"}


ORDER = {"type": "order", "event_id": "o-1", "ts": "2026-11-30T00:00:00Z", "order_id": "o-1",
         "visitor_id": "v-1", "customer_id": "c-1", "currency": "EUR", "total": "100.00",
         "ip": "203.0.113.9", "user_agent": CHROME}


# --- GET /r/{link_id} ---------------------------------------------------------------------


def test_tracking_link_redirects_with_click_id_and_visitor_and_records_the_click() -> None:
    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        response = await client.get("/r/summer", allow_redirects=False,
                                    headers={**BROWSER, "Referer": "https://blog.example/post"})
        assert response.status == 302
        location = urlsplit(response.headers["Location"])
        assert (location.scheme, location.netloc, location.path) == ("https", "shop.example", "/sale")
        assert location.fragment == "top"
        query = parse_qs(location.query)
        assert query["utm"] == ["x"]
        [click] = delivery.values()
        assert query["aclid"] == [click["event_id"]]
        assert query["av"] == [click["visitor_id"]]
        assert click["affiliate_id"] == "sally" and click["channel"] == "instagram"
        assert click["referrer"] == "https://blog.example/post"
        assert click["ip"] == hashed("127.0.0.1")
        assert click["user_agent"] == hashed(CHROME)
        assert click["ts"].endswith("Z") and click["ts"].startswith("2026-11-30T")
        [event] = delivery.events
        assert event.topic == "clicks" and event.key == click["visitor_id"].encode()

        cookies = response.headers.getall("Set-Cookie")
        visitor = next(c for c in cookies if c.startswith("av="))
        session = next(c for c in cookies if c.startswith("as="))
        assert f"av={click['visitor_id']}" in visitor
        assert "Max-Age=31536000" in visitor and "Path=/" in visitor
        assert "SameSite=Lax" in visitor
        assert f"as={click['session_id']}" in session and "Max-Age" not in session

    run_edge(scenario)


def test_tracking_link_keeps_the_visitor_and_session_cookies_it_was_sent() -> None:
    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        response = await client.get("/r/summer", allow_redirects=False, headers={
            **BROWSER, "Cookie": "av=visitor42; as=session7"})
        assert response.status == 302
        [click] = delivery.values()
        assert click["visitor_id"] == "visitor42" and click["session_id"] == "session7"
        assert parse_qs(urlsplit(response.headers["Location"]).query)["av"] == ["visitor42"]
        assert "referrer" not in click

    run_edge(scenario)


def test_a_malformed_visitor_cookie_is_replaced_not_copied() -> None:
    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        await client.get("/r/summer", allow_redirects=False,
                         headers={**BROWSER, "Cookie": 'av="<script>"'})
        [click] = delivery.values()
        assert len(click["visitor_id"]) == 32 and click["visitor_id"].isalnum()

    run_edge(scenario)


def test_unknown_link_is_404_and_records_nothing() -> None:
    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        response = await client.get("/r/nope", allow_redirects=False, headers=BROWSER)
        assert response.status == 404
        assert "Location" not in response.headers

    assert run_edge(scenario).events == []


@pytest.mark.parametrize("user_agent", [
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
    "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
    "curl/8.5.0",
    "python-requests/2.32.3",
    "",
])
def test_a_bot_is_redirected_but_its_click_not_recorded(user_agent: str) -> None:
    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        response = await client.get("/r/summer", allow_redirects=False,
                                    headers={"User-Agent": user_agent})
        assert response.status == 302
        location = response.headers["Location"]
        assert location.startswith("https://shop.example/sale") and "aclid" not in location

    assert run_edge(scenario).events == []


@pytest.mark.parametrize("user_agent", [
    CHROME,
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
    "Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 12; CUBOT KINGKONG 7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
    "Gecko) Mobile/15E148 [FBAN/FBIOS;FBAV/470.0.0.0]",
    "Mozilla/5.0 (Linux; Android 14) AppleWebKit/537.36 Chrome/126.0 Mobile Safari/537.36 "
    "Instagram 340.0.0.0",
])
def test_browsers_and_in_app_browsers_are_recorded(user_agent: str) -> None:
    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        response = await client.get("/r/summer", allow_redirects=False,
                                    headers={"User-Agent": user_agent})
        assert response.status == 302

    assert len(run_edge(scenario).events) == 1


# --- GET /r?aff=&to= ----------------------------------------------------------------------


@pytest.mark.parametrize("target", [
    "https://shop.example/product/1?x=1",
    "http://www.shop.example/",
    "HTTPS://SHOP.EXAMPLE/cart",
    "https://eu.shop.example:8443/a",
])
def test_ad_hoc_link_redirects_to_an_allowed_host_or_subdomain(target: str) -> None:
    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        response = await client.get("/r", params={"aff": "sally", "to": target, "channel": "email"},
                                    allow_redirects=False, headers=BROWSER)
        assert response.status == 302
        location = urlsplit(response.headers["Location"])
        assert location.hostname is not None and location.hostname.endswith("shop.example")
        [click] = delivery.values()
        assert click["affiliate_id"] == "sally" and click["channel"] == "email"
        assert parse_qs(location.query)["aclid"] == [click["event_id"]]

    run_edge(scenario)


@pytest.mark.parametrize("target", [
    "//evil.com",
    "//shop.example",
    "https://evil.com/",
    "https://shop.example.evil.com/",
    "https://evilshop.example/",
    "javascript:alert(1)",
    "JavaScript://shop.example/%0aalert(1)",
    "data:text/html,hi",
    "https://shop.example@evil.com/",
    "https://user:pw@shop.example/",
    "https://evil.com\\@shop.example/",
    "https:\\\\evil.com",
    "https:/\\evil.com/",
    "https://evil.com%2f.shop.example/",
    "https://evil.com%00.shop.example/",
    "https://evil.com#.shop.example",
    "https://evil.com?.shop.example",
    " https://evil.com",
    "https://ev\til.com",
    "https://shop.example:notaport/",
    "ftp://shop.example/",
    "/relative/path",
    "",
])
def test_ad_hoc_link_to_any_other_place_is_400_never_a_redirect(target: str) -> None:
    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        response = await client.get("/r", params={"aff": "sally", "to": target},
                                    allow_redirects=False, headers=BROWSER)
        assert response.status == 400
        assert "Location" not in response.headers

    assert run_edge(scenario).events == []


def test_ad_hoc_link_needs_a_known_affiliate() -> None:
    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        missing = await client.get("/r", params={"to": "https://shop.example/"},
                                   allow_redirects=False, headers=BROWSER)
        assert missing.status == 400
        unknown = await client.get("/r", params={"aff": "mallory", "to": "https://shop.example/"},
                                   allow_redirects=False, headers=BROWSER)
        assert unknown.status == 404

    assert run_edge(scenario).events == []


# --- POST /v1/events ------------------------------------------------------------------------


def test_browser_events_are_completed_validated_one_by_one_and_keyed_like_produce() -> None:
    body = [
        {"type": "click", "affiliate_id": "sally", "session_id": "s-1", "channel": "blog",
         "ip": "10.9.9.9", "user_agent": "made up"},
        {"type": "share", "affiliate_id": "sally", "share_id": "sh-1", "channel": "twitter"},
        {"type": "click", "session_id": "s-1"},  # no affiliate: rejected alone
        {"type": "order", "order_id": "x"},  # not from a browser
        "not an object",
        {"type": "click", "affiliate_id": "sally", "session_id": "s-1",
         "ts": "2030-01-01T00:00:00Z"},
    ]

    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        response = await client.post("/v1/events", data=orjson.dumps(body), headers={
            **BROWSER, "Cookie": "av=visitor42"})
        assert response.status == 202
        answer = await response.json()
        assert answer == {"accepted": 2, "rejected": [
            {"index": 2, "reason": "missing_field"}, {"index": 3, "reason": "type_mismatch"},
            {"index": 4, "reason": "not_object"}, {"index": 5, "reason": "ts_in_future"}]}
        click, share = delivery.values()
        assert click["visitor_id"] == "visitor42" and len(click["event_id"]) == 32
        assert click["ts"].startswith("2026-11-30T") and click["ts"].endswith("Z")
        assert click["ip"] == hashed("127.0.0.1") and click["user_agent"] == hashed(CHROME)
        assert "ip" not in share and "user_agent" not in share
        assert [(e.topic, e.key) for e in delivery.events] == [
            ("clicks", b"visitor42"), ("shares", b"sally")]

    run_edge(scenario)


def test_browser_events_keep_the_ids_and_times_they_were_given() -> None:
    body = [{"type": "click", "event_id": "e-7", "ts": "2026-11-30T01:00:00+01:00",
             "visitor_id": "v-own", "session_id": "s-1", "affiliate_id": "sally"}]

    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        response = await client.post("/v1/events", data=orjson.dumps(body),
                                     headers={**BROWSER, "Cookie": "av=other"})
        assert (await response.json())["accepted"] == 1
        [click] = delivery.values()
        assert (click["event_id"], click["ts"], click["visitor_id"]) == (
            "e-7", "2026-11-30T01:00:00+01:00", "v-own")

    run_edge(scenario)


@pytest.mark.parametrize("body", [b"{not json", b"", b'{"type": "click"}', b'"click"'])
def test_browser_events_that_are_not_a_json_array_are_400(body: bytes) -> None:
    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        response = await client.post("/v1/events", data=body, headers=BROWSER)
        assert response.status == 400

    assert run_edge(scenario).events == []


def test_browser_events_over_500_elements_or_256_kib_are_413() -> None:
    click = {"type": "click", "affiliate_id": "sally", "session_id": "s", "visitor_id": "v"}

    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        many = await client.post("/v1/events", data=orjson.dumps([click] * 501), headers=BROWSER)
        assert many.status == 413
        padded = dict(click, landing_url="https://shop.example/" + "x" * 60_000)
        large = await client.post("/v1/events", data=orjson.dumps([padded] * 5), headers=BROWSER)
        assert large.status == 413
        just_500 = await client.post("/v1/events", data=orjson.dumps([click] * 500),
                                     headers=BROWSER)
        assert just_500.status == 202

    assert len(run_edge(scenario).events) == 500


def test_cors_preflight_and_answers_only_for_allowed_origins() -> None:
    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        for origin in ("https://shop.example", "https://www.shop.example:8443"):
            preflight = await client.options("/v1/events", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type"})
            assert preflight.status == 204
            assert preflight.headers["Access-Control-Allow-Origin"] == origin
            assert preflight.headers["Access-Control-Allow-Credentials"] == "true"
            assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
            posted = await client.post("/v1/events", data=b"[]", headers={"Origin": origin})
            assert posted.status == 202
            assert posted.headers["Access-Control-Allow-Origin"] == origin
        for origin in ("https://evil.com", "https://shop.example.evil.com", "null",
                       "https://shop.example@evil.com"):
            preflight = await client.options("/v1/events", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST"})
            assert preflight.status == 403
            assert "Access-Control-Allow-Origin" not in preflight.headers
            posted = await client.post("/v1/events", headers={"Origin": origin}, data=orjson.dumps(
                [{"type": "share", "affiliate_id": "sally", "share_id": "s", "channel": "blog"}]))
            assert posted.status == 403
            assert "Access-Control-Allow-Origin" not in posted.headers

    assert run_edge(scenario).events == []


# --- POST /v1/orders, /v1/refunds --------------------------------------------------------


def test_a_signed_order_is_accepted_keyed_by_visitor_with_ip_and_user_agent_hashed() -> None:
    body = orjson.dumps(ORDER)

    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        response = await client.post("/v1/orders", data=body, headers=signed(body))
        assert response.status == 202
        assert await response.json() == {"accepted": 1, "rejected": []}
        [event] = delivery.events
        assert (event.topic, event.key) == ("orders", b"v-1")
        order = orjson.loads(event.value)
        assert order["ip"] == hashed("203.0.113.9") and order["user_agent"] == hashed(CHROME)
        assert order["total"] == "100.00"

    run_edge(scenario)


def test_signed_refunds_in_an_array_are_keyed_by_order_and_validated_alone() -> None:
    body = orjson.dumps([
        {"type": "refund", "order_id": "o-1", "amount": "10.00"},
        {"type": "refund", "order_id": "o-2", "amount": "-1"},
        dict(ORDER),
    ])

    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        response = await client.post("/v1/refunds", data=body, headers=signed(body))
        assert response.status == 202
        assert await response.json() == {"accepted": 1, "rejected": [
            {"index": 1, "reason": "out_of_range"}, {"index": 2, "reason": "type_mismatch"}]}
        [event] = delivery.events
        assert (event.topic, event.key) == ("refunds", b"o-1")

    run_edge(scenario)


@pytest.mark.parametrize("case", [
    "no headers", "no signature", "wrong secret", "body changed", "timestamp changed",
    "301 s old", "301 s ahead", "not a number", "bare hex",
])
def test_a_postback_not_signed_now_with_the_secret_is_401_and_records_nothing(case: str) -> None:
    body = orjson.dumps(ORDER)
    headers = signed(body)
    if case == "no headers":
        headers = {}
    elif case == "no signature":
        del headers["X-Attribution-Signature"]
    elif case == "wrong secret":
        headers = signed(body, secret="another-secret-0123456789")
    elif case == "body changed":
        body = body.replace(b"100.00", b"900.00")
    elif case == "timestamp changed":
        headers["X-Attribution-Timestamp"] = str(int(NOW) + 1)
    elif case == "301 s old":
        headers = signed(body, timestamp=NOW - 301)
    elif case == "301 s ahead":
        headers = signed(body, timestamp=NOW + 301)
    elif case == "not a number":
        headers["X-Attribution-Timestamp"] = "now"
    elif case == "bare hex":
        headers["X-Attribution-Signature"] = headers["X-Attribution-Signature"].removeprefix("sha256=")

    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        response = await client.post("/v1/orders", data=body, headers=headers)
        assert response.status == 401

    assert run_edge(scenario).events == []


def test_a_postback_signed_within_300_s_either_way_is_accepted() -> None:
    body = orjson.dumps(ORDER)

    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        for timestamp in (NOW - 300, NOW + 300):
            response = await client.post("/v1/orders", data=body,
                                         headers=signed(body, timestamp=timestamp))
            assert response.status == 202

    assert len(run_edge(scenario).events) == 2


def test_a_signed_postback_that_is_not_json_is_400_and_over_1_mib_is_413() -> None:
    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        response = await client.post("/v1/orders", data=b"{oops", headers=signed(b"{oops"))
        assert response.status == 400
        huge = orjson.dumps([ORDER] * 4000)
        assert len(huge) > 1024 * 1024
        response = await client.post("/v1/orders", data=huge, headers=signed(huge))
        assert response.status == 413

    assert run_edge(scenario).events == []


# --- a full spool -------------------------------------------------------------------------


def test_a_full_spool_answers_503_with_retry_after_on_every_recording_route() -> None:
    full = FakeDelivery()
    full.full = True
    body = orjson.dumps(ORDER)

    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        answers = [
            await client.get("/r/summer", allow_redirects=False, headers=BROWSER),
            await client.post("/v1/events", headers=BROWSER, data=orjson.dumps(
                [{"type": "share", "affiliate_id": "sally", "share_id": "s", "channel": "blog"}])),
            await client.post("/v1/orders", data=body, headers=signed(body)),
        ]
        for answer in answers:
            assert answer.status == 503
            assert answer.headers["Retry-After"] == "30"

    run_edge(scenario, delivery=full)


# --- rate limits --------------------------------------------------------------------------


def test_a_client_over_its_rate_gets_429_with_retry_after_and_nothing_is_recorded() -> None:
    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        statuses = [(await client.get("/r/summer", allow_redirects=False, headers=BROWSER)).status
                    for _ in range(5)]
        assert statuses == [302, 302, 302, 429, 429]
        refused = await client.get("/r/summer", allow_redirects=False, headers=BROWSER)
        assert int(refused.headers["Retry-After"]) >= 1
        events = await client.post("/v1/events", data=b"[]", headers=BROWSER)
        assert events.status == 429
        metrics = await (await client.get("/metrics")).text()
        assert 'attribution_edge_rate_limited_total{limit="ip"}' in metrics

    delivery = run_edge(scenario, EDGE_RATE_PER_IP="0.01", EDGE_BURST_PER_IP="3")
    assert len(delivery.events) == 3


def test_a_link_over_its_rate_gets_429_whoever_clicks() -> None:
    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        statuses = []
        for n in range(4):
            response = await client.get("/r/summer", allow_redirects=False,
                                        headers={**BROWSER, "X-Forwarded-For": f"198.51.100.{n}"})
            statuses.append(response.status)
        assert statuses == [302, 302, 429, 429]

    delivery = run_edge(scenario, EDGE_RATE_PER_LINK="0.01", EDGE_BURST_PER_LINK="2",
                        EDGE_TRUSTED_PROXIES="127.0.0.1")
    assert len(delivery.events) == 2


def test_forwarded_for_is_believed_only_from_a_trusted_proxy() -> None:
    headers = {**BROWSER, "X-Forwarded-For": "192.0.2.1, 198.51.100.7"}

    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        await client.get("/r/summer", allow_redirects=False, headers=headers)

    [trusted] = run_edge(scenario, EDGE_TRUSTED_PROXIES="127.0.0.0/8").values()
    assert trusted["ip"] == hashed("198.51.100.7")
    [untrusted] = run_edge(scenario).values()
    assert untrusted["ip"] == hashed("127.0.0.1")


# --- /t.js and operations ------------------------------------------------------------------


def test_the_snippet_is_served_as_javascript_with_a_short_cache(tmp_path: Path) -> None:
    script = tmp_path / "t.js"
    script.write_text("window.attribution={};")

    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        response = await client.get("/t.js")
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/javascript")
        assert response.headers["Cache-Control"] == "public, max-age=300"
        assert await response.text() == "window.attribution={};"

    run_edge(scenario, snippet_path=script)


def test_no_snippet_installed_is_404(tmp_path: Path) -> None:
    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        assert (await client.get("/t.js")).status == 404

    run_edge(scenario, snippet_path=tmp_path / "missing.js")


def test_healthz_is_200_and_readyz_follows_delivery_and_reference_data() -> None:
    async def alive_and_ready(client: Client, delivery: FakeDelivery) -> None:
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/readyz")).status == 200
        delivery.ready = False
        assert (await client.get("/readyz")).status == 503

    run_edge(alive_and_ready)

    async def not_loaded(client: Client, delivery: FakeDelivery) -> None:
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/readyz")).status == 503

    run_edge(not_loaded, references=FakeReferences(settings(), loaded=False))


def test_metrics_count_requests_by_route_pattern_events_and_rejections() -> None:
    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        await client.get("/r/summer", allow_redirects=False, headers=BROWSER)
        await client.get("/r/unknown-link-xyz", allow_redirects=False, headers=BROWSER)
        await client.post("/v1/events", data=b'[{"type": "click"}]', headers=BROWSER)
        await client.get("/nowhere")
        response = await client.get("/metrics")
        assert response.status == 200
        text = await response.text()
        assert 'attribution_edge_requests_total{route="/r/{link_id}",status="302"}' in text
        assert 'attribution_edge_requests_total{route="/r/{link_id}",status="404"}' in text
        assert 'route="unmatched",status="404"' in text
        assert "unknown-link-xyz" not in text
        assert 'attribution_edge_request_seconds_bucket{le="0.02",route="/r/{link_id}"}' in text
        assert 'attribution_edge_events_accepted_total{topic="clicks"}' in text
        assert 'attribution_edge_events_rejected_total{reason="missing_field"}' in text
        assert "attribution_edge_spool_events" in text
        assert "attribution_edge_spool_oldest_age_seconds" in text

    run_edge(scenario)


def test_a_delivery_that_fails_otherwise_is_503_with_retry_after() -> None:
    class BrokenDelivery(FakeDelivery):
        async def deliver(self, events: Any) -> None:
            raise RuntimeError("not authorized to write the topic")

    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        response = await client.get("/r/summer", allow_redirects=False, headers=BROWSER)
        assert response.status == 503
        assert response.headers["Retry-After"] == "5"
        assert "Location" not in response.headers

    run_edge(scenario, delivery=BrokenDelivery())


def test_a_chunked_browser_body_over_the_limit_is_413_with_cors_headers() -> None:
    async def chunks() -> Any:
        yield b"["
        for _ in range(300):
            yield b'{"type": "share", "affiliate_id": "sally", "padding": "' + b"x" * 4000 + b'"},'
        yield b"{}]"

    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        response = await client.post("/v1/events", data=chunks(),
                                     headers={**BROWSER, "Origin": "https://shop.example"})
        assert response.status == 413
        assert response.headers["Access-Control-Allow-Origin"] == "https://shop.example"

    assert run_edge(scenario).events == []


def test_cookies_are_secure_when_a_trusted_proxy_says_the_browser_used_https() -> None:
    headers = {**BROWSER, "X-Forwarded-Proto": "https"}

    async def scenario(client: Client, delivery: FakeDelivery) -> None:
        response = await client.get("/r/summer", allow_redirects=False, headers=headers)
        cookies = response.headers.getall("Set-Cookie")
        assert all("Secure" in cookie for cookie in cookies) == trusted

    trusted = True
    run_edge(scenario, EDGE_TRUSTED_PROXIES="127.0.0.1")
    trusted = False
    run_edge(scenario)
