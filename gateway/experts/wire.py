"""What an expert's answer must look like, checked where it enters the gateway.

An upstream is a separate program (any OpenAI-compatible server): a bug or version skew there must
reach the client as ``502 upstream_protocol`` (or that SSE error event) and count against the
*expert* (breaker, ``octoroute_upstream_errors_total{kind="protocol"}``), never as a gateway 500 or a
stream cut without a word. So every JSON object from an upstream, and every cache entry before it is
served, is validated here against the shape of the OpenAI API reference:

- chat: ``chat.completion`` and ``chat.completion.chunk``
  (https://platform.openai.com/docs/api-reference/chat/object, ``…/chat-streaming``)
- completions: ``text_completion`` (https://platform.openai.com/docs/api-reference/completions/object)

Types are strict (a count is an ``int`` >= 0, ``choices`` a list of objects, text a string or null).
Fields the reference does not list pass through untouched (``extra="allow"``): backends add their
own (vLLM's ``stop_reason``, ``prompt_logprobs``) and the gateway must not drop them. The validated
object is the parsed dict itself; the models only judge it.

Errors: ``UpstreamError("protocol", ...)`` whose message names the first bad field.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.experts.base import JSON, Endpoint, UpstreamError

Count = Annotated[int, Field(ge=0)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class Usage(_Open):
    prompt_tokens: Count
    completion_tokens: Count = 0
    total_tokens: Count | None = None


class _Envelope(_Open):
    id: str
    created: int
    model: str
    usage: Usage | None = None


class FunctionDelta(_Open):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Open):
    index: Count
    id: str | None = None
    type: str | None = None
    function: FunctionDelta | None = None


class Delta(_Open):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class _Choice(_Open):
    index: Count
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatChunkChoice(_Choice):
    delta: Delta = Delta()  # some servers leave it out of the finishing chunk; it carries nothing there


class ChatChunk(_Envelope):
    choices: list[ChatChunkChoice]


class TextChoice(_Choice):
    text: str


class CompletionChunk(_Envelope):
    choices: list[TextChoice]


class Function(_Open):
    name: str
    arguments: str


class ToolCall(_Open):
    id: str
    type: str
    function: Function


class Message(_Open):
    role: str
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Choice):
    message: Message


class ChatCompletion(_Envelope):
    choices: list[ChatChoice]


class Completion(_Envelope):
    choices: list[TextChoice]


_CHUNKS: dict[Endpoint, type[_Envelope]] = {"chat": ChatChunk, "completions": CompletionChunk}
_RESPONSES: dict[Endpoint, type[_Envelope]] = {"chat": ChatCompletion, "completions": Completion}
_NAMES = {ChatChunk: "chat.completion.chunk", CompletionChunk: "text_completion chunk",
          ChatCompletion: "chat.completion", Completion: "text_completion"}


def problem(model: type[_Envelope], value: Any) -> str | None:
    """Why ``value`` is not a valid ``model`` (first bad field, in API terms), or None when it is."""
    if not isinstance(value, dict):
        return f"expected a JSON object, got {type(value).__name__}"
    try:
        model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        return f"{where}: {first['msg'].lower()}"
    return None


def _checked(model: type[_Envelope], expert: str, value: Any, before_first_byte: bool) -> JSON:
    reason = problem(model, value)
    if reason is not None:
        raise UpstreamError("protocol", f"expert {expert} sent an invalid {_NAMES[model]} ({reason})", 502,
                            before_first_byte=before_first_byte)
    assert isinstance(value, dict)
    return value


def parse_chunk(endpoint: Endpoint, expert: str, data: str, before_first_byte: bool) -> JSON:
    """One SSE ``data`` payload as a validated chunk. An ``{"error": ...}`` event (vLLM sends one when
    generation fails mid-stream) becomes ``UpstreamError("stream_error")`` carrying the upstream's message."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamError("protocol", f"expert {expert} sent a stream event that is not JSON", 502,
                            before_first_byte=before_first_byte) from None
    if isinstance(value, dict) and "error" in value:
        inner = value["error"]
        message = inner.get("message") if isinstance(inner, dict) else inner
        raise UpstreamError("stream_error", f"expert {expert} failed mid-answer: {str(message)[:300]}", 502,
                            before_first_byte=before_first_byte)
    return _checked(_CHUNKS[endpoint], expert, value, before_first_byte)


def parse_response(endpoint: Endpoint, expert: str, content: bytes) -> JSON:
    """A non-streamed answer body as a validated response object."""
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError:
        raise UpstreamError("protocol", f"expert {expert} sent a response that is not JSON", 502) from None
    return _checked(_RESPONSES[endpoint], expert, value, True)


def is_response(endpoint: Endpoint, value: Any) -> bool:
    """Whether ``value`` has the shape of a complete non-streamed answer (cache entries are checked so)."""
    return problem(_RESPONSES[endpoint], value) is None
