"""Chat-completion chunks in, Responses API stream events out.

The order is the API reference's ("Streaming events"): ``response.created``, ``response.in_progress``; per
text message ``response.output_item.added``, ``response.content_part.added``, ``response.output_text.delta``
…, ``response.output_text.done``, ``response.content_part.done``, ``response.output_item.done``; per tool call
``response.output_item.added``, ``response.function_call_arguments.delta`` … ``.done``,
``response.output_item.done``; then ``response.completed`` (or ``response.incomplete`` when the output was
cut by ``max_output_tokens``, or ``response.failed`` with an ``error`` when the expert broke off). Every
event carries ``sequence_number`` (0, 1, 2 …); each is sent as ``event: <type>`` + ``data: <json>``, and there
is no ``[DONE]`` sentinel.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.endpoints.responses import translate
from gateway.endpoints.responses.protocol import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    Event,
    FunctionCall,
    ItemStatus,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    ResponseError,
    ResponseEvent,
    ResponseObject,
    TextDeltaEvent,
    TextDoneEvent,
)


class StreamTranslator:
    """Builds ``response`` from the chunks as they come and says so in events (SSE bytes)."""

    def __init__(self, response: ResponseObject) -> None:
        self.response = response
        self.sequence = 0
        self.message: OutputMessage | None = None  # the text message being written, if any
        self.calls: dict[int, FunctionCall] = {}  # open tool calls by their chunk index
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def _sse(self, event: Event) -> bytes:
        self.sequence += 1
        return b"event: " + event.type.encode() + b"\ndata: " + orjson.dumps(event.model_dump(mode="json")) + b"\n\n"

    def _n(self) -> int:
        return self.sequence

    def _response_event(self, kind: str) -> bytes:
        return self._sse(ResponseEvent(type=kind, sequence_number=self._n(), response=self.response))

    def start(self) -> bytes:
        return self._response_event("response.created") + self._response_event("response.in_progress")

    def _index(self, item: OutputMessage | FunctionCall) -> int:
        return next(i for i, o in enumerate(self.response.output) if o is item)

    def _add(self, item: OutputMessage | FunctionCall) -> bytes:
        self.response.output.append(item)
        return self._sse(OutputItemEvent(type="response.output_item.added", sequence_number=self._n(),
                                         output_index=len(self.response.output) - 1, item=item))

    def _text(self, delta: str) -> bytes:
        out = b""
        if self.message is None:
            self.message = OutputMessage(id=translate.new_id("msg"), status="in_progress", content=[])
            out += self._add(self.message)
            self.message.content.append(OutputText(text="", logprobs=[]))
            out += self._sse(ContentPartEvent(
                type="response.content_part.added", sequence_number=self._n(), item_id=self.message.id,
                output_index=self._index(self.message), content_index=0, part=OutputText(text="", logprobs=[])))
        self.message.content[0].text += delta
        return out + self._sse(TextDeltaEvent(sequence_number=self._n(), item_id=self.message.id,
                                              output_index=self._index(self.message), content_index=0, delta=delta))

    def _close_message(self, status: ItemStatus) -> bytes:
        message, self.message = self.message, None
        if message is None:
            return b""
        index, part = self._index(message), message.content[0]
        message.status = status
        return (self._sse(TextDoneEvent(sequence_number=self._n(), item_id=message.id, output_index=index,
                                        content_index=0, text=part.text))
                + self._sse(ContentPartEvent(type="response.content_part.done", sequence_number=self._n(),
                                             item_id=message.id, output_index=index, content_index=0, part=part))
                + self._sse(OutputItemEvent(type="response.output_item.done", sequence_number=self._n(),
                                            output_index=index, item=message)))

    def _tool_call(self, delta: dict[str, Any]) -> bytes:
        out = b""
        key, fn = int(delta.get("index") or 0), delta.get("function") or {}
        call = self.calls.get(key)
        if call is None:
            out += self._close_message("completed")
            call = FunctionCall(id=translate.new_id("fc"), call_id=delta.get("id") or translate.new_id("call"),
                                name=fn.get("name") or "", arguments="", status="in_progress")
            self.calls[key] = call
            out += self._add(call)
        if fn.get("arguments"):
            call.arguments += fn["arguments"]
            out += self._sse(ArgumentsDeltaEvent(sequence_number=self._n(), item_id=call.id,
                                                 output_index=self._index(call), delta=fn["arguments"]))
        return out

    def feed(self, chunk: dict[str, Any]) -> bytes:
        """One chat-completion chunk (choice 0: the Responses API has one output)."""
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if chunk.get("model") and self.response.model != chunk["model"]:
            self.response.model = chunk["model"]
        out = b""
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out += self._text(delta["content"])
            for call in delta.get("tool_calls") or ():
                out += self._tool_call(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return out

    def finish(self) -> bytes:
        """Close what is open; ``response.completed``, or ``response.incomplete`` with its reason."""
        translate.finish(self.response, self.finish_reason, self.usage)
        status: ItemStatus = "completed" if self.response.status == "completed" else "incomplete"
        out = self._close_message(status)
        for call in self.calls.values():
            call.status = status
            index = self._index(call)
            out += self._sse(ArgumentsDoneEvent(sequence_number=self._n(), item_id=call.id, output_index=index,
                                                name=call.name, arguments=call.arguments))
            out += self._sse(OutputItemEvent(type="response.output_item.done", sequence_number=self._n(),
                                             output_index=index, item=call))
        self.calls = {}
        return out + self._response_event(f"response.{self.response.status}")

    def fail(self, error: dict[str, Any]) -> bytes:
        """``response.failed`` carrying the error (``server_error`` unless it was a rate limit)."""
        code = "rate_limit_exceeded" if error.get("code") == "rate_limit_exceeded" else "server_error"
        detail = f" ({error['code']})" if error.get("code") and error.get("code") != code else ""
        self.response.status = "failed"
        self.response.error = ResponseError(code=code, message=f"{error.get('message', 'expert failed')}{detail}")
        self.response.usage = translate.usage(self.usage)
        return self._response_event("response.failed")
