"""POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.endpoints.completions.protocol import CompletionRequest
from gateway.endpoints.edge import openapi_body, parse, read_json
from gateway.serving import Call
from gateway.state import State
from router_model import Message

router = APIRouter()


@router.post("/v1/completions", openapi_extra=openapi_body(CompletionRequest))
async def completions(request: Request) -> Response:
    state: State = request.app.state.octoroute
    api_key = await state.admit(request)
    req = parse(CompletionRequest, await read_json(request, state.config.server.max_body_bytes))
    state.check_limits(1, req.token_budget)
    text = req.prompt_text()
    call = Call(endpoint="completions", model=req.model, body=req.wire(),
                messages=[Message("user", text)] if text else [], stream=bool(req.stream),
                include_usage=req.include_usage, api_key=api_key, request_id=request.state.request_id,
                receive=request.receive)
    return await state.pipeline.serve(call)
