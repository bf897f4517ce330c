"""Prometheus metrics of the tracking edge, served by the edge itself on `EDGE_PORT` `/metrics`.

Created once at import in the default registry (as `sinks.metrics` does for the worker). The HTTP
side (`edge.app`) counts requests, latency, events and refusals; the delivery (`edge.delivery`)
sets the spool gauges. Labels are bounded: `route` is the route's pattern (`/r/{link_id}`, never
the id), `reason` a fixed vocabulary.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

#: 1 ms to 10 s: the targets are a p99 of 20 ms (redirects) and 50 ms (event batches); a
#: request waiting on the broker's acks=all or a spool fsync shows in the upper buckets.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)

REQUESTS = Counter("attribution_edge_requests", "HTTP requests answered, by route and status",
                   ["route", "status"])
REQUEST_SECONDS = Histogram("attribution_edge_request_seconds",
                            "Time to answer an HTTP request, by route", ["route"],
                            buckets=REQUEST_BUCKETS)
EVENTS_ACCEPTED = Counter("attribution_edge_events_accepted",
                          "Events accepted and made durable, by topic", ["topic"])
EVENTS_REJECTED = Counter("attribution_edge_events_rejected",
                          "Events refused by validation, by reason", ["reason"])
RATE_LIMITED = Counter("attribution_edge_rate_limited",
                       "Requests refused with 429, by limit (ip | link)", ["limit"])
BOT_CLICKS = Counter("attribution_edge_bot_clicks",
                     "Tracking-link visits by known bots: redirected, not recorded")
# Set by edge.delivery: what waits in the local spool for the broker to come back.
SPOOL_EVENTS = Gauge("attribution_edge_spool_events", "Events in the local spool, not yet in Kafka")
SPOOL_BYTES = Gauge("attribution_edge_spool_bytes", "Bytes in the local spool")
SPOOL_OLDEST_AGE = Gauge("attribution_edge_spool_oldest_age_seconds",
                         "Age of the oldest event in the local spool (0 when empty)")
