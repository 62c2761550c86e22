"""POST /v1/responses, GET and DELETE /v1/responses/{response_id}, GET /v1/responses/{response_id}/input_items."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

from gateway.endpoints.edge import openapi_body, parse, read_json
from gateway.endpoints.responses.protocol import DeletedResponse, InputItemList, ResponseObject, ResponsesRequest
from gateway.endpoints.responses.serving import ResponsesService
from gateway.errors import bad_request
from gateway.state import State

router = APIRouter()


def _service(request: Request) -> ResponsesService:
    """One service per running app, made on first use (it holds the response store)."""
    state: State = request.app.state.octoroute
    service: ResponsesService | None = getattr(request.app.state, "octoroute_responses", None)
    if service is None or service.state is not state:
        service = request.app.state.octoroute_responses = ResponsesService(state)
    return service


def _returns(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI: the 200 body's schema (handlers build their responses themselves)."""
    return {200: {"model": model}}


@router.post("/v1/responses", openapi_extra=openapi_body(ResponsesRequest), responses={200: {
    "model": ResponseObject, "description": "The response object, or with stream: true Responses stream events",
    "content": {"text/event-stream": {}}}})
async def create_response(request: Request) -> Response:
    state: State = request.app.state.octoroute
    api_key = await state.admit(request)
    data = await read_json(request, state.config.server.max_body_bytes)
    if isinstance(data, dict) and isinstance(data.get("input"), list):  # count before validating each item
        state.check_limits(len(data["input"]), None)
    req = parse(ResponsesRequest, data)
    return await _service(request).create(req, api_key, request.state.request_id, request.receive)


@router.get("/v1/responses/{response_id}", responses=_returns(ResponseObject))
async def retrieve_response(request: Request, response_id: str) -> Response:
    state: State = request.app.state.octoroute
    api_key = await state.admit(request)
    return state.json(await _service(request).retrieve(api_key, response_id))


@router.delete("/v1/responses/{response_id}", responses=_returns(DeletedResponse))
async def delete_response(request: Request, response_id: str) -> Response:
    state: State = request.app.state.octoroute
    api_key = await state.admit(request)
    return state.json(await _service(request).delete(api_key, response_id))


@router.get("/v1/responses/{response_id}/input_items", responses=_returns(InputItemList), openapi_extra={
    "parameters": [
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
        {"name": "order", "in": "query", "schema": {"type": "string", "enum": ["asc", "desc"], "default": "desc"}},
        {"name": "after", "in": "query", "schema": {"type": "string"}}]})
async def list_input_items(request: Request, response_id: str) -> Response:
    """Query: ``limit`` (1-100, default 20), ``order`` (asc | desc, default desc), ``after`` (an item id)."""
    state: State = request.app.state.octoroute
    api_key = await state.admit(request)
    query = request.query_params
    limit, order = query.get("limit", "20"), query.get("order", "desc")
    if not limit.isdigit() or not 1 <= int(limit) <= 100:
        raise bad_request(f"Invalid value for 'limit': {limit!r}; send an integer from 1 to 100.", param="limit")
    if order not in ("asc", "desc"):
        raise bad_request(f"Invalid value for 'order': {order!r}; send 'asc' or 'desc'.", param="order")
    return state.json(await _service(request).input_items(api_key, response_id, int(limit), order,
                                                          query.get("after")))
