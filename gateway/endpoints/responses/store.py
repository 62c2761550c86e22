"""Stored responses (``store: true``): what ``GET /v1/responses/{id}`` returns and ``previous_response_id`` continues.

One entry per response, under ``<cache.key_prefix>:responses:<key_id(api key)>:<response id>``: the namespace is
the API key's id as in the cache, so another key (or no key) finds nothing and gets a 404. Stored responses are
never shared across keys, whatever ``cache.shared`` says: they are conversations, not reusable answers.

An entry (JSON) holds ``response`` (the response object), ``input_items`` (this request's input, with ids) and
``conversation`` (the chat messages up to and including this response's output, instructions left out as the
API does for chains), so a follow-up turn is one read however long the chain.

Backends: Redis when the cache is Redis (its client and time-outs; entries expire with ``responses.ttl_s``),
else an in-process LRU bounded by ``responses.max_entries`` / ``max_bytes`` with the same TTL. Entries larger
than ``responses.max_entry_bytes`` are not stored (logged). A Redis that fails is a 503 on reads (the client
can retry) and a logged, skipped write.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any

import orjson
import redis.asyncio as aioredis

from gateway.auth import key_id
from gateway.cache import Cache, RedisCache
from gateway.config import GatewayConfig, ResponsesConfig
from gateway.errors import OpenAIError

log = logging.getLogger("octoroute.responses")


class StoreUnavailable(Exception):
    """The backend failed: reads become a 503, writes are skipped."""


class Backend(ABC):
    @abstractmethod
    async def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def set(self, key: str, blob: bytes) -> None: ...

    @abstractmethod
    async def delete(self, key: str) -> bool: ...


class MemoryBackend(Backend):
    """LRU with a TTL: at most ``max_entries`` entries and ``max_bytes`` bytes; ``clock`` for tests."""

    def __init__(self, config: ResponsesConfig, clock: Any = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.bytes = 0

    async def get(self, key: str) -> bytes | None:
        item = self.entries.get(key)
        if item is None or item[0] < self.clock():
            await self.delete(key)
            return None
        self.entries.move_to_end(key)
        return item[1]

    async def set(self, key: str, blob: bytes) -> None:
        await self.delete(key)
        self.entries[key] = (self.clock() + self.config.ttl_s, blob)
        self.bytes += len(blob)
        while len(self.entries) > self.config.max_entries or self.bytes > self.config.max_bytes:
            _, (_, old) = self.entries.popitem(last=False)
            self.bytes -= len(old)

    async def delete(self, key: str) -> bool:
        item = self.entries.pop(key, None)
        if item is not None:
            self.bytes -= len(item[1])
        return item is not None


class RedisBackend(Backend):
    def __init__(self, client: aioredis.Redis, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self._call(self.client.get(key))
        return value

    async def set(self, key: str, blob: bytes) -> None:
        await self._call(self.client.set(key, blob, ex=self.ttl_s))

    async def delete(self, key: str) -> bool:
        return bool(await self._call(self.client.delete(key)))


def _is_entry(value: Any) -> bool:
    """The shape ``ResponsesService`` writes: anything else (a planted or truncated value) is treated as absent."""
    return (isinstance(value, dict) and isinstance(value.get("response"), dict)
            and isinstance(value.get("input_items"), list) and isinstance(value.get("conversation"), list))


class ResponseStore:
    def __init__(self, backend: Backend, prefix: str, max_entry_bytes: int) -> None:
        self.backend = backend
        self.prefix = prefix
        self.max_entry_bytes = max_entry_bytes

    @classmethod
    def build(cls, config: GatewayConfig, cache: Cache) -> ResponseStore:
        backend: Backend = (RedisBackend(cache.client, config.responses.ttl_s) if isinstance(cache, RedisCache)
                            else MemoryBackend(config.responses))
        return cls(backend, config.cache.key_prefix, config.responses.max_entry_bytes)

    def _key(self, api_key: str | None, response_id: str) -> str:
        return f"{self.prefix}:responses:{key_id(api_key)}:{response_id}"

    async def get(self, api_key: str | None, response_id: str) -> dict[str, Any] | None:
        """The entry, or None when it is unknown, expired, another key's, or unreadable."""
        try:
            blob = await self.backend.get(self._key(api_key, response_id))
        except StoreUnavailable as exc:
            log.warning("response store read failed: %s", exc)
            raise OpenAIError(503, "Stored responses are unavailable right now (the store did not answer); "
                                   "retry shortly.", "server_error", None, "service_unavailable",
                              headers={"Retry-After": "1"}) from None
        if blob is None:
            return None
        try:
            entry = orjson.loads(blob)
        except orjson.JSONDecodeError:
            entry = None
        if not _is_entry(entry):
            log.warning("ignoring an unreadable stored response: %s", response_id)
            return None
        return entry

    async def put(self, api_key: str | None, response_id: str, entry: dict[str, Any]) -> bool:
        blob = orjson.dumps(entry)
        if len(blob) > self.max_entry_bytes:
            log.warning("response %s not stored: %d bytes exceed responses.max_entry_bytes (%d)",
                        response_id, len(blob), self.max_entry_bytes)
            return False
        try:
            await self.backend.set(self._key(api_key, response_id), blob)
        except StoreUnavailable as exc:
            log.warning("response %s not stored: %s", response_id, exc)
            return False
        return True

    async def delete(self, api_key: str | None, response_id: str) -> bool:
        try:
            return await self.backend.delete(self._key(api_key, response_id))
        except StoreUnavailable as exc:
            raise OpenAIError(503, f"Stored responses are unavailable right now ({exc}); retry shortly.",
                              "server_error", None, "service_unavailable", headers={"Retry-After": "1"}) from None
