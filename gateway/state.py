"""Everything a request handler needs, built once at start-up and closed at shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import Authenticator, key_id
from gateway.backoff import BACKOFF_S, Backoff
from gateway.cache import Cache, build_cache
from gateway.config import ConfigError, GatewayConfig
from gateway.errors import bad_request
from gateway.experts import Expert, ExpertHandle, build_expert
from gateway.metrics import Metrics
from gateway.ratelimit import RateLimiter
from gateway.routing import RoutingService
from gateway.serving import Pipeline
from gateway.shutdown import Shutdown
from router_model import KeywordRouter, Router

log = logging.getLogger("octoroute.state")


def load_configured_router(config: GatewayConfig) -> tuple[Router, str]:
    """The router named by the config, and how /ready should describe it.

    An explicit checkpoint path that fails to load is an error. When the *bundled* checkpoint is
    missing, the gateway starts on the keyword fallback and says so in the log and on /ready.
    """
    if config.router.kind == "keyword":
        return KeywordRouter(), "keyword"
    try:
        from router_model import load_router

        router: Router = load_router(config.router.path, threads=config.router.threads)
        return router, "functional_token"
    except (ImportError, FileNotFoundError, OSError) as exc:
        if config.router.path is not None:
            raise ConfigError(f"router.path: cannot load a router checkpoint from {config.router.path}: {exc}") from exc
        log.warning("bundled router checkpoint unavailable (%s); routing with the keyword fallback", exc)
        return KeywordRouter(), "keyword (fallback: bundled checkpoint unavailable)"


@dataclass
class State:
    config: GatewayConfig
    metrics: Metrics
    routing: RoutingService
    pipeline: Pipeline
    experts: dict[str, ExpertHandle]
    cache: Cache
    auth: Authenticator
    rate_limiter: RateLimiter | None
    router_kind: str
    shutdown: Shutdown
    started_at: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    async def build(cls, config: GatewayConfig, router: Router | None = None,
                    experts: dict[str, Expert] | None = None, router_kind: str | None = None) -> State:
        """Assemble the gateway; ``router``/``experts`` may be passed in (tests, embedding)."""
        metrics = Metrics()
        if router is None:
            active, kind = await asyncio.to_thread(load_configured_router, config)
        else:
            active, kind = router, router_kind or type(router).__name__
        if experts is None:
            built = await asyncio.gather(*(asyncio.to_thread(build_expert, e) for e in config.experts))
            experts = dict(zip((e.name for e in config.experts), built, strict=True))
        handles = {e.name: ExpertHandle.create(experts[e.name], e, metrics) for e in config.experts}
        routing = RoutingService(active, config)
        await routing.start()
        redis_backoff = Backoff(BACKOFF_S, config.cache.timeout_ms / 1000,
                                on_error=lambda: metrics.cache.labels("error").inc())
        cache = build_cache(config.cache, redis_backoff)
        limiter = None
        if config.auth.rate_limit_per_minute:
            limiter = RateLimiter(config.auth.rate_limit_per_minute,
                                  config.cache.url if config.cache.backend == "redis" else None,
                                  config.cache.key_prefix, config.cache.timeout_ms / 1000, redis_backoff,
                                  config.auth.rate_limit_outage)
        shutdown = Shutdown()
        pipeline = Pipeline(config, routing, handles, cache, metrics, shutdown)
        await pipeline.detect_fusion()
        return cls(config, metrics, routing, pipeline, handles, cache, Authenticator(config.auth), limiter, kind,
                   shutdown)

    async def aclose(self) -> None:
        self.shutdown.draining = True
        await self.routing.stop()
        await asyncio.gather(*(h.expert.aclose() for h in self.experts.values()), return_exceptions=True)
        await self.cache.aclose()

    async def admit(self, request: Request) -> str | None:
        """Authenticate and rate-limit; returns the API key (None when auth is off)."""
        api_key = self.auth.check_request(request.headers)
        if self.rate_limiter is not None:
            try:
                await self.rate_limiter.hit(key_id(api_key))
            except Exception:
                self.metrics.rejected.labels("rate_limited").inc()
                raise
        return api_key

    def check_limits(self, n_messages: int, max_tokens: int | None) -> None:
        server = self.config.server
        if n_messages > server.max_messages:
            raise bad_request(f"Too many messages: {n_messages} (limit {server.max_messages}).", param="messages")
        if max_tokens is not None and max_tokens > server.max_tokens_limit:
            raise bad_request(f"max_tokens {max_tokens} exceeds this gateway's limit of {server.max_tokens_limit}.",
                              param="max_tokens")

    @staticmethod
    def json(content: Any, status: int = 200) -> Response:
        return Response(orjson.dumps(content), status_code=status, media_type="application/json")
