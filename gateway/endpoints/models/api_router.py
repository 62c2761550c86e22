"""GET /v1/models: the virtual model ``auto`` and every expert by name."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.state import State

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    state: State = request.app.state.octoroute
    await state.admit(request)
    data = [{"id": name, "object": "model", "created": state.started_at, "owned_by": "octoroute"}
            for name in state.pipeline.model_names()]
    return state.json({"object": "list", "data": data})
