"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.endpoints.chat_completions.protocol import ChatCompletionRequest
from gateway.endpoints.edge import openapi_body, parse, read_json
from gateway.serving import Call
from gateway.state import State
from router_model import Message

router = APIRouter()


@router.post("/v1/chat/completions", openapi_extra=openapi_body(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    state: State = request.app.state.octoroute
    api_key = await state.admit(request)
    data = await read_json(request, state.config.server.max_body_bytes)
    if isinstance(data, dict) and isinstance(data.get("messages"), list):  # count before validating each one
        state.check_limits(len(data["messages"]), None)
    req = parse(ChatCompletionRequest, data)
    state.check_limits(len(req.messages), req.token_budget)
    call = Call(endpoint="chat", model=req.model, body=req.wire(),
                messages=[Message(m.role, m.text()) for m in req.messages], stream=bool(req.stream),
                include_usage=req.include_usage, api_key=api_key, request_id=request.state.request_id,
                receive=request.receive)
    return await state.pipeline.serve(call)
