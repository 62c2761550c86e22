"""POST /v1/responses, GET and DELETE /v1/responses/{response_id}, GET /v1/responses/{response_id}/input_items."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.endpoints.edge import openapi_body, parse, read_json
from gateway.endpoints.responses.protocol import ResponsesRequest
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


@router.post("/v1/responses", openapi_extra=openapi_body(ResponsesRequest))
async def create_response(request: Request) -> Response:
    state: State = request.app.state.octoroute
    api_key = await state.admit(request)
    data = await read_json(request, state.config.server.max_body_bytes)
    if isinstance(data, dict) and isinstance(data.get("input"), list):  # count before validating each item
        state.check_limits(len(data["input"]), None)
    req = parse(ResponsesRequest, data)
    return await _service(request).create(req, api_key, request.state.request_id, request.receive)


@router.get("/v1/responses/{response_id}")
async def retrieve_response(request: Request, response_id: str) -> Response:
    state: State = request.app.state.octoroute
    api_key = await state.admit(request)
    return state.json(await _service(request).retrieve(api_key, response_id))


@router.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, response_id: str) -> Response:
    state: State = request.app.state.octoroute
    api_key = await state.admit(request)
    return state.json(await _service(request).delete(api_key, response_id))


@router.get("/v1/responses/{response_id}/input_items")
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
