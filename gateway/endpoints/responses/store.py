"""Stored responses (``store: true``): what ``GET /v1/responses/{id}`` returns and ``previous_response_id`` continues.

One entry per response, under ``<cache.key_prefix>:responses:<key_id(api key)>:<response id>``: the namespace is
the API key's id as in the cache, so another key (or no key) finds nothing and gets a 404. Stored responses are
never shared across keys, whatever ``cache.shared`` says: they are conversations, not reusable answers.

An entry holds ``response`` (the response object), ``input_items`` (this request's input, with ids) and
``conversation`` (the chat messages up to and including this response's output, instructions left out as the
API does for chains), so a follow-up turn is one read however long the chain.

The entries are kept by the cache's own machinery (``gateway.cache``), with the ``responses`` TTL and caps: in
Redis when the cache is Redis (its client, deadline and back-off), else in an in-process LRU. So they are sealed
with the cache's HMAC (``cache.secret_env``: replicas need the same secret to continue each other's chains) and
shape-checked: a planted, truncated or foreign-shaped value reads as absent. An entry larger than
``responses.max_entry_bytes`` is not stored (logged). A Redis that fails is a 503 on reads (retry) and a logged,
skipped write.
"""

from __future__ import annotations

import logging
from typing import Any

from gateway.auth import key_id
from gateway.cache import Cache, CacheUnavailable, MemoryCache, RedisCache
from gateway.config import GatewayConfig
from gateway.errors import OpenAIError

log = logging.getLogger("octoroute.responses")


def unavailable() -> OpenAIError:
    return OpenAIError(503, "Stored responses are unavailable right now (the store did not answer); retry shortly.",
                       "server_error", None, "service_unavailable", headers={"Retry-After": "1"})


class MemoryEntries(MemoryCache):
    async def delete(self, key: str) -> bool:
        """Remove ``key``; whether it was there (and unexpired)."""
        found = await self._get(key) is not None
        await self._delete(key)
        return found


class RedisEntries(RedisCache):
    async def delete(self, key: str) -> bool:
        """Remove ``key``; whether it was there. Raises ``CacheUnavailable``."""
        return bool(await self._call("DEL", self.client.delete(key)))


def _is_entry(value: dict[str, Any]) -> bool:
    """The shape ``ResponsesService`` writes."""
    return (isinstance(value.get("response"), dict) and isinstance(value.get("input_items"), list)
            and isinstance(value.get("conversation"), list))


class ResponseStore:
    def __init__(self, entries: MemoryEntries | RedisEntries, prefix: str) -> None:
        self.entries = entries
        self.prefix = prefix

    @classmethod
    def build(cls, config: GatewayConfig, cache: Cache) -> ResponseStore:
        r = config.responses
        limits = {"ttl_s": r.ttl_s, "max_entries": r.max_entries, "max_bytes": r.max_bytes,
                  "max_entry_bytes": r.max_entry_bytes}
        entries: MemoryEntries | RedisEntries
        if isinstance(cache, RedisCache):
            entries = RedisEntries(config.cache.model_copy(update=limits), cache.backoff)
            entries.client = cache.client  # one connection pool and one back-off per Redis
        else:
            entries = MemoryEntries(config.cache.model_copy(update={**limits, "backend": "memory"}))
        return cls(entries, config.cache.key_prefix)

    def _key(self, api_key: str | None, response_id: str) -> str:
        return f"{self.prefix}:responses:{key_id(api_key)}:{response_id}"

    async def get(self, api_key: str | None, response_id: str) -> dict[str, Any] | None:
        """The entry, or None when it is unknown, expired, deleted, another key's, or unreadable."""
        lookup, entry = await self.entries.get(self._key(api_key, response_id), valid=_is_entry)
        if lookup == "bypass":
            raise unavailable()
        return entry

    async def put(self, api_key: str | None, response_id: str, entry: dict[str, Any]) -> bool:
        stored = await self.entries.set(self._key(api_key, response_id), entry)
        if not stored:
            log.warning("response %s not stored: larger than responses.max_entry_bytes (%d), or the store did "
                        "not answer", response_id, self.entries.config.max_entry_bytes)
        return stored

    async def delete(self, api_key: str | None, response_id: str) -> bool:
        try:
            return await self.entries.delete(self._key(api_key, response_id))
        except CacheUnavailable:
            raise unavailable() from None
