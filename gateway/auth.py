"""Optional API keys (Bearer, or the api-key / x-api-key headers) and a per-key requests-per-minute limit.

Keys are compared in constant time (``hmac.compare_digest`` against every configured key) and
never logged: logs and cache namespaces only see ``key_id``, a short hash of the key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Mapping

import redis.asyncio as aioredis

from gateway.config import AuthConfig
from gateway.errors import OpenAIError

log = logging.getLogger("octoroute.auth")


def key_id(key: str | None) -> str:
    """A stable, non-reversible name for a key (cache namespace, rate-limit bucket, logs)."""
    if not key:
        return "anon"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# Which request headers may carry the key, in the order they are read (README, "Authentication"):
# OpenAI's `Authorization: Bearer <key>`, Azure OpenAI's `api-key: <key>`, and `x-api-key: <key>`
# (Anthropic-style clients, LiteLLM). The first one present is the one checked.
KEY_HEADERS = ("authorization", "api-key", "x-api-key")
HOW_TO_SEND = "send 'Authorization: Bearer <key>' (or 'api-key: <key>', or 'x-api-key: <key>')"
REALM = 'Bearer realm="octoroute"'


class Authenticator:
    def __init__(self, config: AuthConfig, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        keys = list(config.api_keys)
        if config.api_keys_env and env.get(config.api_keys_env):
            keys += [k.strip() for k in env[config.api_keys_env].split(",") if k.strip()]
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check_request(self, headers: Mapping[str, str]) -> str | None:
        """``check`` on whichever of ``KEY_HEADERS`` the request carries (a plain key becomes a Bearer one)."""
        authorization = headers.get("authorization")
        if authorization is None or not authorization.lower().startswith("bearer "):
            plain = headers.get("api-key") or headers.get("x-api-key")
            if plain:
                authorization = f"Bearer {plain}"
        return self.check(authorization)

    def check(self, authorization: str | None) -> str | None:
        """Returns the presented key (None when auth is off); raises a 401 in OpenAI's shape, with the
        ``WWW-Authenticate`` challenge of RFC 6750 §3."""
        if not self._keys:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise OpenAIError(401, f"Missing API key: {HOW_TO_SEND}.", "invalid_request_error", None,
                              "invalid_api_key", headers={"WWW-Authenticate": REALM})
        presented = token.strip().encode()
        match = False
        for candidate in self._keys:  # no early exit: time does not depend on which key matched
            match |= hmac.compare_digest(presented, candidate)
        if not match:
            raise OpenAIError(401, f"Incorrect API key provided; {HOW_TO_SEND} with a key this gateway knows.",
                              "invalid_request_error", None, "invalid_api_key",
                              headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'})
        return token.strip()


class RateLimiter:
    """Fixed one-minute windows per key. Redis-backed when given a client (shared by replicas),
    else in-process; a Redis failure falls back to the in-process count rather than refusing."""

    def __init__(self, per_minute: int, redis: aioredis.Redis | None = None, prefix: str = "octoroute",
                 timeout_s: float = 0.05) -> None:
        self.per_minute = per_minute
        self.redis = redis
        self.prefix = prefix
        self.timeout_s = timeout_s
        self._local: dict[tuple[str, int], int] = {}

    async def hit(self, key: str) -> None:
        window = int(time.time() // 60)
        count = await self._count(key, window)
        if count > self.per_minute:
            retry_after = max(1, int(60 - time.time() % 60))
            raise OpenAIError(429, f"Rate limit reached: {self.per_minute} requests per minute for this key.",
                              "rate_limit_error", None, "rate_limit_exceeded",
                              headers={"Retry-After": str(retry_after)})

    async def _count(self, key: str, window: int) -> int:
        if self.redis is not None:
            name = f"{self.prefix}:rl:{key}:{window}"
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.incr(name)
                    pipe.expire(name, 120)
                    count, _ = await pipe.execute()
                return int(count)
            except (aioredis.RedisError, OSError, TimeoutError) as exc:
                log.warning("rate limit: redis failed (%s); counting in-process", type(exc).__name__)
        if len(self._local) > 100_000:  # bounded: old windows go first
            self._local = {k: v for k, v in self._local.items() if k[1] >= window}
        self._local[(key, window)] = self._local.get((key, window), 0) + 1
        return self._local[(key, window)]
