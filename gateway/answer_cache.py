"""Which answers are cached, under which key, and the lookups and stores with their metrics.

Only deterministic requests (``temperature: 0`` or a ``seed``, unless ``cache.deterministic_only`` is off)
are cached, one namespace per API key unless ``cache.shared``. A lookup serves only an entry that is a
complete response of the endpoint which a replay rebuilds field for field (``gateway.answers``); the
storage (``gateway.cache``) deletes anything else.
"""

from __future__ import annotations

from typing import Any

from gateway.answers import replayable
from gateway.auth import key_id
from gateway.cache import Cache, Lookup, cache_key, is_deterministic
from gateway.config import CacheConfig
from gateway.experts import Endpoint
from gateway.experts.wire import is_response
from gateway.metrics import Metrics


class AnswerCache:
    def __init__(self, config: CacheConfig, cache: Cache, metrics: Metrics) -> None:
        self.config = config
        self.cache = cache
        self.metrics = metrics

    def key(self, endpoint: Endpoint, body: dict[str, Any], api_key: str | None, expert: str) -> str | None:
        """The entry's key, or None when this request is not cached."""
        cfg = self.config
        if cfg.backend == "none" or (cfg.deterministic_only and not is_deterministic(body)):
            return None
        namespace = "shared" if cfg.shared else key_id(api_key)
        return cache_key(cfg.key_prefix, namespace, endpoint, expert, body)

    async def lookup(self, endpoint: Endpoint, key: str | None) -> tuple[Lookup, dict[str, Any] | None]:
        if key is None:
            return "bypass", None
        lookup, cached = await self.cache.get(key, lambda v: is_response(endpoint, v) and replayable(endpoint, v))
        self.metrics.cache.labels(lookup).inc()
        return lookup, cached

    async def store(self, key: str | None, endpoint: Endpoint, value: dict[str, Any]) -> None:
        if key is not None and replayable(endpoint, value) and await self.cache.set(key, value):
            self.metrics.cache.labels("store").inc()
