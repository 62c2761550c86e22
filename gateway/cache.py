"""Response cache: exact match on a canonical hash of (expert, input, output-changing parameters).

Two backends behind one small interface: an in-memory LRU (the embedded default) and Redis
(``redis.asyncio``). Entries are stored with a checksum, so a truncated or corrupt entry is
dropped instead of served. A cache that is down or slow is *bypassed*: the request goes on,
the failure is counted, and Redis is left alone for a short back-off before the next try.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis

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


def _seal(value: dict[str, Any]) -> bytes:
    payload = orjson.dumps(value)
    return hashlib.sha256(payload).hexdigest()[:16].encode() + b"|" + payload


def _unseal(blob: bytes) -> dict[str, Any] | None:
    check, sep, payload = blob.partition(b"|")
    if not sep or hashlib.sha256(payload).hexdigest()[:16].encode() != check:
        return None
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class Cache(ABC):
    """get/set raw sealed bytes; subclasses only move bytes."""

    def __init__(self, config: CacheConfig) -> None:
        self.config = config

    @abstractmethod
    async def _get(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def _set(self, key: str, blob: bytes) -> None: ...

    @abstractmethod
    async def _delete(self, key: str) -> None: ...

    async def get(self, key: str) -> tuple[Lookup, dict[str, Any] | None]:
        try:
            blob = await self._get(key)
        except CacheUnavailable:
            return "bypass", None
        if blob is None:
            return "miss", None
        value = _unseal(blob)
        if value is None:
            log.warning("dropping corrupt cache entry %s", key)
            with contextlib.suppress(CacheUnavailable):
                await self._delete(key)
            return "miss", None
        return "hit", value

    async def set(self, key: str, value: dict[str, Any]) -> bool:
        blob = _seal(value)
        if len(blob) > self.config.max_entry_bytes:
            return False
        try:
            await self._set(key, blob)
        except CacheUnavailable:
            return False
        return True

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


class CacheUnavailable(Exception):
    """The backend failed or was too slow: bypass the cache for this request."""


class NullCache(Cache):
    async def _get(self, key: str) -> bytes | None:
        raise CacheUnavailable

    async def _set(self, key: str, blob: bytes) -> None:
        raise CacheUnavailable

    async def _delete(self, key: str) -> None:
        return None


class MemoryCache(Cache):
    """Bounded LRU with TTL, for one process: at most ``max_entries`` entries and ``max_bytes`` bytes."""

    def __init__(self, config: CacheConfig) -> None:
        super().__init__(config)
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
    """Redis with a hard per-call deadline and a back-off after failures (no 5xx, ever)."""

    BACKOFF_S = 1.0

    def __init__(self, config: CacheConfig, on_error: Any = None) -> None:
        super().__init__(config)
        timeout = config.timeout_ms / 1000
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            config.url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry_on_timeout=False, health_check_interval=0)
        self._down_until = 0.0
        self._on_error = on_error

    async def _call(self, op: str, coro: Any) -> Any:
        if time.monotonic() < self._down_until:
            coro.close()
            raise CacheUnavailable
        try:
            async with asyncio.timeout(self.config.timeout_ms / 1000):
                return await coro
        except (TimeoutError, aioredis.RedisError, OSError) as exc:
            self._down_until = time.monotonic() + self.BACKOFF_S
            log.warning("redis %s failed (%s: %s); bypassing the cache for %.1fs",
                        op, type(exc).__name__, exc, self.BACKOFF_S)
            if self._on_error:
                self._on_error()
            raise CacheUnavailable from exc

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
        except CacheUnavailable:
            return False

    async def aclose(self) -> None:
        await self.client.aclose()


def build_cache(config: CacheConfig, on_error: Any = None) -> Cache:
    if config.backend == "redis":
        return RedisCache(config, on_error=on_error)
    if config.backend == "memory":
        return MemoryCache(config)
    return NullCache(config)
