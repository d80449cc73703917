"""A token bucket shared by every connection of one job: its bandwidth, both directions together."""
from __future__ import annotations

import asyncio
import time

MIN_BURST_BYTES = 64 * 1024  # one relay chunk: smaller would stall every read


class TokenBucket:
    """`take(n)` waits until n bytes fit the rate; debt carries over, so concurrent takers share it."""

    def __init__(self, rate_bytes_per_s: float, burst_s: float = 0.05) -> None:
        self.rate = float(rate_bytes_per_s)
        self.burst = max(MIN_BURST_BYTES, self.rate * burst_s)
        self.tokens = self.burst
        self.updated = time.monotonic()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return  # no limit
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        self.tokens -= n
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)
