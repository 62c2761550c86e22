"""Response cache: exact match on a canonical hash of (expert, input, output-changing parameters).

Two backends behind one small interface: an in-memory LRU (the embedded default) and Redis
(``redis.asyncio``). A cache that is down or slow is *bypassed*: the request goes on, the failure is
counted, and Redis is left alone for a short back-off (``gateway.backoff``, shared with the rate limiter).

Entries are not trusted because they are found: anyone who can write to the Redis could plant one.
Each entry is sealed with an HMAC-SHA256 keyed by a secret (``cache.secret_env``; without one, a
random per-process key: entries then live as long as the process and replicas do not share them),
and a lookup also checks the entry's shape with the caller's test (a complete response object of
the endpoint). An entry that fails either, or a key of the wrong Redis type, is deleted and the
lookup is a miss: one bad entry never disables the cache for anyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis

from gateway.backoff import Backoff
from gateway.config import CacheConfig

log = logging.getLogger("octoroute.cache")

# Fields that never change what the model answers, so they stay out of the key.
_NOT_IN_KEY = frozenset({"model", "stream", "stream_options", "user"})

Lookup = Literal["hit", "miss", "bypass"]


def is_deterministic(body: dict[str, Any]) -> bool:
    """Greedy decoding, or sampling with a fixed seed, gives the same answer twice."""
    return body.get("temperature") == 0 or body.get("seed") is not None


def cache_key(prefix: str, namespace: str, endpoint: str, expert: str, body: dict[str, Any]) -> str:
    """Canonical key: sorted-key JSON of the output-changing fields, hashed with the expert's name."""
    material = {k: v for k, v in body.items() if k not in _NOT_IN_KEY}
    digest = hashlib.sha256(
        orjson.dumps([endpoint, expert, material], option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"{prefix}:resp:{namespace}:{digest}"


def cache_secret(config: CacheConfig, environ: dict[str, str] | None = None) -> bytes:
    """The HMAC key: the value of ``config.secret_env``, else a random key for this process."""
    env = os.environ if environ is None else environ
    value = env.get(config.secret_env) if config.secret_env else None
    if value:
        return value.encode()
    if config.backend == "redis":
        log.warning("cache: %s is not set; sealing entries with a per-process key (replicas will not share "
                    "entries, and a restart starts cold)", config.secret_env or "cache.secret_env")
    return secrets.token_bytes(32)


class Sealer:
    """``mac|payload`` with an HMAC-SHA256 over the payload."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).hexdigest().encode()

    def seal(self, value: dict[str, Any]) -> bytes:
        payload = orjson.dumps(value)
        return self._mac(payload) + b"|" + payload

    def unseal(self, blob: bytes) -> dict[str, Any] | None:
        mac, sep, payload = blob.partition(b"|")
        if not sep or not hmac.compare_digest(mac, self._mac(payload)):
            return None
        try:
            value = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None


class CacheUnavailable(Exception):
    """The backend failed or was too slow: bypass the cache for this request."""


class BadEntry(Exception):
    """The key holds something that is not an entry (e.g. a Redis hash): delete it, count a miss."""


class Cache(ABC):
    """get/set raw sealed bytes; subclasses only move bytes."""

    def __init__(self, config: CacheConfig, secret: bytes | None = None) -> None:
        self.config = config
        self.sealer = Sealer(secret if secret is not None else cache_secret(config))

    @abstractmethod
    async def _get(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def _set(self, key: str, blob: bytes) -> None: ...

    @abstractmethod
    async def _delete(self, key: str) -> None: ...

    async def get(self, key: str, valid: Callable[[dict[str, Any]], bool] = lambda _: True
                  ) -> tuple[Lookup, dict[str, Any] | None]:
        """Look ``key`` up; ``valid`` judges the entry's shape (False: deleted, a miss)."""
        try:
            blob = await self._get(key)
        except CacheUnavailable:
            return "bypass", None
        except BadEntry:
            blob = b""
        if blob is None:
            return "miss", None
        value = self.sealer.unseal(blob)
        if value is None or not valid(value):
            log.warning("dropping a cache entry that fails its seal or shape check: %s", key)
            with contextlib.suppress(CacheUnavailable):
                await self._delete(key)
            return "miss", None
        return "hit", value

    async def set(self, key: str, value: dict[str, Any]) -> bool:
        blob = self.sealer.seal(value)
        if len(blob) > self.config.max_entry_bytes:
            return False
        try:
            await self._set(key, blob)
        except (CacheUnavailable, BadEntry):
            return False
        return True

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


class NullCache(Cache):
    async def _get(self, key: str) -> bytes | None:
        raise CacheUnavailable

    async def _set(self, key: str, blob: bytes) -> None:
        raise CacheUnavailable

    async def _delete(self, key: str) -> None:
        return None


class MemoryCache(Cache):
    """Bounded LRU with TTL, for one process: at most ``max_entries`` entries and ``max_bytes`` bytes."""

    def __init__(self, config: CacheConfig, secret: bytes | None = None) -> None:
        super().__init__(config, secret)
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0

    async def _get(self, key: str) -> bytes | None:
        item = self._entries.get(key)
        if item is None:
            return None
        expires, blob = item
        if expires < time.monotonic():
            await self._delete(key)
            return None
        self._entries.move_to_end(key)
        return blob

    async def _set(self, key: str, blob: bytes) -> None:
        await self._delete(key)
        self._entries[key] = (time.monotonic() + self.config.ttl_s, blob)
        self._bytes += len(blob)
        while len(self._entries) > self.config.max_entries or self._bytes > self.config.max_bytes:
            _, (_, old) = self._entries.popitem(last=False)
            self._bytes -= len(old)

    async def _delete(self, key: str) -> None:
        item = self._entries.pop(key, None)
        if item is not None:
            self._bytes -= len(item[1])


class RedisCache(Cache):
    """Redis with a hard per-call deadline (``timeout_ms``) and the shared back-off (no 5xx, ever)."""

    def __init__(self, config: CacheConfig, backoff: Backoff, secret: bytes | None = None) -> None:
        super().__init__(config, secret)
        timeout = config.timeout_ms / 1000
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            config.url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry_on_timeout=False, health_check_interval=0)
        self.backoff = backoff

    async def _call(self, op: str, coro: Any) -> Any:
        if not self.backoff.allow():
            coro.close()
            raise CacheUnavailable
        try:
            async with asyncio.timeout(self.config.timeout_ms / 1000):
                result = await coro
        except aioredis.ResponseError as exc:
            if str(exc).startswith("WRONGTYPE"):  # this key is bad; Redis is fine
                self.backoff.ok()
                raise BadEntry from exc
            self.backoff.trip(op, exc)
            raise CacheUnavailable from exc
        except (TimeoutError, aioredis.RedisError, OSError) as exc:
            self.backoff.trip(op, exc)
            raise CacheUnavailable from exc
        self.backoff.ok()
        return result

    async def _get(self, key: str) -> bytes | None:
        value: bytes | None = await self._call("GET", self.client.get(key))
        return value

    async def _set(self, key: str, blob: bytes) -> None:
        await self._call("SET", self.client.set(key, blob, ex=self.config.ttl_s))

    async def _delete(self, key: str) -> None:
        await self._call("DEL", self.client.delete(key))

    async def ping(self) -> bool:
        try:
            return bool(await self._call("PING", self.client.ping()))
        except (CacheUnavailable, BadEntry):
            return False

    async def aclose(self) -> None:
        await self.client.aclose()


def build_cache(config: CacheConfig, backoff: Backoff) -> Cache:
    if config.backend == "redis":
        return RedisCache(config, backoff)
    if config.backend == "memory":
        return MemoryCache(config)
    return NullCache(config)
