"""GET /v1/models (the virtual models ``auto`` and ``fusion``, and every expert by name) and GET /v1/models/{model}."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.errors import model_not_found
from gateway.state import State

router = APIRouter()


def _model(state: State, name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": state.started_at, "owned_by": "octoroute"}


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    state: State = request.app.state.octoroute
    await state.admit(request)
    return state.json({"object": "list", "data": [_model(state, n) for n in state.pipeline.model_names()]})


@router.get("/v1/models/{model:path}")
async def retrieve_model(request: Request, model: str) -> Response:
    """What ``client.models.retrieve(name)`` calls (some frameworks do, to check a model exists)."""
    state: State = request.app.state.octoroute
    await state.admit(request)
    names = state.pipeline.model_names()
    if model not in names:
        raise model_not_found(model, names)
    return state.json(_model(state, model))
