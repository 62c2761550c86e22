"""POST /v1/route: the router's probability per expert, the chosen expert(s), timings."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.endpoints.edge import openapi_body, parse, read_json
from gateway.endpoints.route.protocol import RouteRequest
from gateway.state import State
from router_model import Message

router = APIRouter()


@router.post("/v1/route", openapi_extra=openapi_body(RouteRequest))
async def route(request: Request) -> Response:
    state: State = request.app.state.octoroute
    await state.admit(request)
    data = await read_json(request, state.config.server.max_body_bytes)
    if isinstance(data, dict) and isinstance(data.get("messages"), list):  # count before validating each one
        state.check_limits(len(data["messages"]), None)
    req = parse(RouteRequest, data)
    state.check_limits(len(req.messages), None)
    decision = await state.routing.decide([Message(m.role, m.text()) for m in req.messages])
    return state.json({
        "router": state.router_kind,
        "experts": list(decision.experts),
        "mode": "single" if len(decision.experts) == 1 else "multi",
        "confidence": decision.confidence,
        "probabilities": decision.probs,
        "label_probabilities": decision.label_probs,
        "rewrite": decision.rewrite,
        "policy": {"tau": state.routing.tau, "mass": state.routing.mass},
        "timings": {"route_ms": decision.route_ms, "cached": decision.cached},
    })
