"""GET /health (the process is alive), GET /ready (router loaded, an expert reachable), GET /metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from gateway.state import State

router = APIRouter()


@router.get("/health")
async def health() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/ready")
async def ready(request: Request) -> Response:
    state: State = request.app.state.octoroute
    names = list(state.experts)
    checks = await asyncio.gather(*(state.experts[n].expert.healthy() for n in names))
    experts = dict(zip(names, checks, strict=True))
    ok = any(checks) and not state.shutdown.draining
    body = {"status": "ready" if ok else "not ready", "router": state.router_kind, "experts": experts,
            "cache": await state.cache.ping(), "draining": state.shutdown.draining}
    return state.json(body, status=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state: State = request.app.state.octoroute
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
