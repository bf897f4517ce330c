"""Rate limits at the door: in-memory token buckets per client IP and per tracking link.

A refused request is answered `429` with `Retry-After`, counted, and not recorded: one address
cannot flood clicks into an affiliate's numbers, nor one link be hammered from many. The buckets
live in one process (each edge replica limits on its own; behind a load balancer the effective
limit is the per-replica one times the replicas). The number of buckets is bounded: the least
recently used is forgotten first (a forgotten bucket comes back full, which only ever lets a
client through, never refuses one wrongly).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

#: Buckets kept per limiter: ~100 bytes each, so 100,000 keys cost ~10 MB at most.
MAX_BUCKETS = 100_000


class RateLimiter:
    """`rate` requests per second per key, in bursts of up to `burst`."""

    def __init__(self, rate: float, burst: float, *, max_buckets: int = MAX_BUCKETS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._max_buckets = max_buckets
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key: (tokens, at)

    def take(self, key: str) -> int:
        """0 when the request may go ahead (one token taken), else the seconds to wait (≥ 1)."""
        now = self._clock()
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            wait = 0
        else:
            self._buckets[key] = (tokens, now)
            wait = max(1, math.ceil((1 - tokens) / self.rate))
        if len(self._buckets) > self._max_buckets:
            self._buckets.popitem(last=False)
        return wait
