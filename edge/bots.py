"""Known automated user agents: their visits to a tracking link are redirected, never recorded.

A click is evidence that a person followed an affiliate's link; crawlers, link-preview fetchers
(a chat app unfurling a shared link) and scripted HTTP clients are not, and would inflate clicks
and hand out last-click credit. The list is short on purpose: a browser wrongly taken for a bot
loses an affiliate a real click, so only tokens no browser sends are here.

- `bot`, `crawl`, `spider`, `slurp` (Googlebot, bingbot, Slackbot, Twitterbot, AhrefsBot, Yahoo!
  Slurp, Baiduspider, …), but not `cubot`: CUBOT is a phone maker whose browsers say so.
- link previews that do not say bot: `facebookexternalhit`, `embedly`, `whatsapp/` (the
  preview fetcher; WhatsApp opens links in the phone's browser).
- headless and scripted clients: `headlesschrome`, `lighthouse`, `curl/`, `wget/`,
  `python-requests`, `python-urllib`, `aiohttp/`, `go-http-client`, `libwww-perl`, `java/`.
- an empty or missing user agent: every browser sends one.

In-app browsers (`FBAN`, `Instagram`, `TikTok`, `LinkedInApp`) are people and are recorded.
"""

from __future__ import annotations

import re

_AUTOMATED = re.compile(
    r"(?<!cu)bot|crawl|spider|slurp|facebookexternalhit|embedly|whatsapp/|headlesschrome"
    r"|lighthouse|curl/|wget/|python-requests|python-urllib|aiohttp/|go-http-client|libwww-perl"
    r"|java/",
    re.IGNORECASE,
)


def is_automated(user_agent: str | None) -> bool:
    """Whether a request with this User-Agent is a known bot or script rather than a person."""
    if not user_agent or not user_agent.strip():
        return True
    return _AUTOMATED.search(user_agent) is not None
