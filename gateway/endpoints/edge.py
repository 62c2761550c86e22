"""Reading and validating request bodies at the edge: size limit, JSON, UTF-8, pydantic model."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from gateway.errors import OpenAIError, bad_request

M = TypeVar("M", bound=BaseModel)


async def read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise OpenAIError(413, f"Request body is {declared} bytes; the limit is {limit}.",
                          "invalid_request_error", None, "request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise OpenAIError(413, f"Request body exceeds the limit of {limit} bytes.",
                              "invalid_request_error", None, "request_too_large")
    if not body:
        raise bad_request("Request body is empty; send a JSON object.")
    try:
        data = orjson.loads(body)  # rejects invalid UTF-8 and documents nested over 1,024 levels
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"Request body is not valid JSON: {exc}") from None
    try:
        # orjson re-encodes at most 254 levels, and the cache key / upstream body wrap the request in a few
        # more: refuse here what the gateway could not forward (else a 500 later, e.g. a deep `tools` schema).
        orjson.dumps([[[[data]]]])
    except orjson.JSONEncodeError:
        raise bad_request("Request body is nested too deeply.") from None
    return data


def parse(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise bad_request("Request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise bad_request(f"Unrecognized request argument supplied: {loc}", param=loc) from None
        msg = first["msg"].removeprefix("Value error, ")
        raise bad_request(f"Invalid value for '{loc}': {msg}", param=loc or None) from None


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI requestBody for handlers that validate by hand (so errors keep OpenAI's shape).

    The schema itself is registered under components by ``gateway.app`` (see ``_openapi``)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}
