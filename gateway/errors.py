"""OpenAI-shaped errors: every error the gateway emits is ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

from typing import Any

import orjson


class OpenAIError(Exception):
    """Raise anywhere in a request; the app turns it into the OpenAI error body and status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def sse_event(self) -> bytes:
        """The error as one SSE event, sent before a stream closes."""
        return b"data: " + orjson.dumps(self.body()) + b"\n\n"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str, known: list[str]) -> OpenAIError:
    return OpenAIError(
        404, f"The model '{model}' does not exist. Available models: {', '.join(known)}.",
        "invalid_request_error", "model", "model_not_found")


def overloaded(message: str, retry_after_s: int = 1, status: int = 429) -> OpenAIError:
    return OpenAIError(status, message, "rate_limit_error" if status == 429 else "server_error",
                       None, "rate_limit_exceeded" if status == 429 else "service_unavailable",
                       headers={"Retry-After": str(retry_after_s)})


def cannot_honour(expert: str, backend: str, fields: list[str], able: list[str]) -> OpenAIError:
    """A request field the chosen expert's backend cannot honour; suggests only experts that can (``able``)."""
    instead = (f"pin an expert that can: {', '.join(able)}" if able
               else "no expert of this gateway can honour it")
    return bad_request(f"expert {expert!r} ({backend} backend) cannot honour {', '.join(fields)}; remove the field "
                       f"({instead}).", param=fields[0])
