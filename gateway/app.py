"""The FastAPI application: endpoints, OpenAI-shaped errors, request ids, start-up and shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from gateway import __version__
from gateway.config import GatewayConfig
from gateway.endpoints.chat_completions import api_router as chat_api
from gateway.endpoints.chat_completions.protocol import ChatCompletionRequest
from gateway.endpoints.completions import api_router as completions_api
from gateway.endpoints.completions.protocol import CompletionRequest
from gateway.endpoints.health import api_router as health_api
from gateway.endpoints.models import api_router as models_api
from gateway.endpoints.responses import api_router as responses_api
from gateway.endpoints.responses.protocol import ResponsesRequest
from gateway.endpoints.route import api_router as route_api
from gateway.endpoints.route.protocol import RouteRequest
from gateway.errors import OpenAIError
from gateway.experts import Expert
from gateway.middleware import ErrorBoundary, HttpConventions, OpsGuard, RequestIdMiddleware
from gateway.serving import error_response
from gateway.state import State
from router_model import Router

log = logging.getLogger("octoroute.app")
# Response headers a browser app may read across origins (CORS).
EXPOSED_HEADERS = ["x-request-id", "x-octoroute-expert", "x-octoroute-confidence", "x-octoroute-cache",
                   "x-octoroute-route-ms", "x-octoroute-fallback-from", "x-octoroute-fused",
                   "x-octoroute-fusion-refused", "retry-after"]
BODY_MODELS = (ChatCompletionRequest, CompletionRequest, RouteRequest, ResponsesRequest)
ENDPOINT_LABELS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/route": "route",
                   "/v1/models": "models", "/v1/responses": "responses"}


async def _log_readiness(state: State) -> None:
    """Say at start-up what /ready will say: ready, or which experts are down and why."""
    names = list(state.experts)
    problems = await asyncio.gather(*(state.experts[n].expert.health_problem() for n in names))
    down = {name: problem for name, problem in zip(names, problems, strict=True) if problem is not None}
    info = {"experts": names, "router": state.router_kind, "cache": state.config.cache.backend}
    why = "; ".join(f"{n}: {reason}" for n, reason in down.items())
    if not down:
        log.info("gateway ready", extra=info)
    elif len(down) < len(names):
        log.warning("gateway ready, but experts are down (requests for them fall back or fail): %s", why,
                    extra={**info, "experts_down": down})
    else:
        log.warning("gateway started but NOT ready (/ready answers 503): no expert is reachable; %s", why,
                    extra={**info, "experts_down": down})


def create_app(config: GatewayConfig, router: Router | None = None, experts: dict[str, Expert] | None = None,
               router_kind: str | None = None) -> FastAPI:
    """Build the gateway. ``router``/``experts`` replace the configured ones (tests, embedding);
    ``router_kind`` is how /ready describes a router passed in (default: its class name)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await State.build(config, router=router, experts=experts, router_kind=router_kind)
        app.state.octoroute = state
        state.metrics.set_models(state.pipeline.model_names())
        await _log_readiness(state)
        try:
            yield
        finally:
            await state.aclose()

    app = FastAPI(title="Octoroute", version=__version__, lifespan=lifespan, redirect_slashes=False,
                  description="OpenAI-compatible gateway that routes each query to a specialist model.")
    for module in (chat_api, completions_api, responses_api, models_api, route_api, health_api):
        app.include_router(module.router)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> Response:
        """Refusals at the edge (401, 413, 400, 429 ...): counted and logged like answered requests."""
        state: State | None = getattr(request.app.state, "octoroute", None)
        endpoint = ENDPOINT_LABELS.get(request.url.path, "other")
        if state is not None:
            state.metrics.requests.labels("none", "-", endpoint, str(exc.status)).inc()
        log.info("refused", extra={"request_id": getattr(request.state, "request_id", None), "endpoint": endpoint,
                                   "status": exc.status, "code": exc.code})
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        type_ = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(OpenAIError(exc.status_code, message, type_, None, None))

    def _openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in BODY_MODELS:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = _openapi  # type: ignore[method-assign]
    # Outermost last: request id -> CORS -> HEAD / trailing slash -> ops guard -> error boundary -> routes.
    app.add_middleware(ErrorBoundary)
    app.add_middleware(OpsGuard, protect=config.auth.protect_ops)
    app.add_middleware(HttpConventions)
    if config.cors.allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors.allow_origins),
                           allow_methods=["GET", "HEAD", "POST", "OPTIONS"],
                           allow_headers=list(config.cors.allow_headers), expose_headers=EXPOSED_HEADERS,
                           max_age=config.cors.max_age_s)
    app.add_middleware(RequestIdMiddleware)
    return app
