"""Per-key request limit: at most ``per_minute`` requests in any 60 seconds.

The algorithm and its storage come from ``limits`` (a maintained library, also behind Flask-Limiter
and SlowAPI): a *moving window* (every hit time is kept, up to the limit), so no burst of 2x the
limit can slip through at a window boundary as with fixed windows. With a Redis cache the counts live
in that Redis (``implementation="redispy"``, the client the gateway already uses), shared by all
replicas; otherwise in process memory.

A stalled or dead Redis costs at most one ``timeout_s`` deadline per request and then nothing: the
failure trips the back-off shared with the cache (``gateway.backoff``), and while it lasts the
configured outage policy applies:

- ``open`` (default): count in process memory, so the limit still holds per replica (N replicas admit
  up to N x the limit) and nobody is refused because Redis is down;
- ``closed``: refuse with ``503 service_unavailable`` and ``Retry-After``, for deployments where the
  limit is a hard quota.

Errors: ``OpenAIError`` 429 ``rate_limit_exceeded`` with ``Retry-After`` (seconds until the oldest
counted request leaves the window), or 503 under the closed policy.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Literal

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter

from gateway.backoff import Backoff
from gateway.errors import OpenAIError, overloaded

Outage = Literal["open", "closed"]


class RateLimiter:
    def __init__(self, per_minute: int, redis_url: str | None = None, prefix: str = "octoroute",
                 timeout_s: float = 0.05, backoff: Backoff | None = None, outage: Outage = "open") -> None:
        self.per_minute = per_minute
        self.item: RateLimitItem = RateLimitItemPerMinute(per_minute)
        self.timeout_s = timeout_s
        self.outage = outage
        self.backoff = backoff or Backoff(1.0, timeout_s)
        self._local = MovingWindowRateLimiter(MemoryStorage())
        self._shared: MovingWindowRateLimiter | None = None
        if redis_url is not None:
            storage = RedisStorage("async+" + redis_url, implementation="redispy", wrap_exceptions=True,
                                         key_prefix=f"{prefix}:rl", socket_timeout=timeout_s,
                                         socket_connect_timeout=timeout_s)
            self._shared = MovingWindowRateLimiter(storage)

    async def hit(self, key: str) -> None:
        """Count one request for ``key``; raises the 429 (or the outage 503) when it is over the limit."""
        limiter, allowed = self._local, None
        if self._shared is not None and self.backoff.allow():
            try:
                async with asyncio.timeout(self.timeout_s):
                    allowed = await self._shared.hit(self.item, key)
                limiter = self._shared
                self.backoff.ok()
            except Exception as exc:  # a timeout, or any storage error (limits wraps them as StorageError)
                self.backoff.trip("rate limit", exc)
        if allowed is None:
            if self._shared is not None and self.outage == "closed":
                raise overloaded("The rate limiter's store (Redis) is unreachable and this gateway is set to refuse "
                                 "requests it cannot count (auth.rate_limit_outage: closed); retry shortly.",
                                 retry_after_s=max(1, math.ceil(self.backoff.seconds)), status=503)
            allowed = await self._local.hit(self.item, key)
        if allowed:
            return
        retry_after = await self._retry_after(limiter, key)
        raise OpenAIError(429, f"Rate limit reached: {self.per_minute} requests per minute for this key; retry "
                          f"in {retry_after} s.", "rate_limit_error", None, "rate_limit_exceeded",
                          headers={"Retry-After": str(retry_after)})

    async def _retry_after(self, limiter: MovingWindowRateLimiter, key: str) -> int:
        """Seconds until the oldest counted request leaves the window (60 when the store cannot say in time)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                reset = (await limiter.get_window_stats(self.item, key)).reset_time
        except Exception:
            return 60
        return max(1, math.ceil(reset - time.time()))
