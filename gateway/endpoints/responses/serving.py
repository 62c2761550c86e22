"""``/v1/responses`` on top of the chat-completions pipeline.

A request is rebuilt into a chat-completions call (``translate``): the stored conversation of
``previous_response_id`` (one store read), then ``instructions`` as a system message, then the new input items.
That call goes through the same ``Pipeline.serve`` as ``/v1/chat/completions``, so routing (``auto`` sees the
whole conversation), pinning, ``fusion``, the cache, guards, fallbacks, metrics (``endpoint="responses"``) and the
``x-octoroute-*`` headers behave as there. Its answer is translated back: a JSON chat completion into the
response object, a chat-completion SSE stream into Responses stream events (``events``). Errors the pipeline
returns before any output keep their status and OpenAI error shape (fields renamed to the Responses API's).
The response, its input items and the conversation are stored when ``store`` is true and it did not fail.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive

from gateway.endpoints.responses import translate
from gateway.endpoints.responses.events import StreamTranslator
from gateway.endpoints.responses.protocol import (
    DeletedResponse,
    InputItemList,
    ResponseObject,
    ResponsesRequest,
)
from gateway.endpoints.responses.store import ResponseStore
from gateway.errors import OpenAIError, bad_request
from gateway.relay import EventStream
from gateway.serving import Call
from gateway.state import State

log = logging.getLogger("octoroute.responses")


def not_found(response_id: str, param: str | None = None) -> OpenAIError:
    if param == "previous_response_id":
        return OpenAIError(404, f"Previous response with id '{response_id}' not found (unknown, expired, deleted, "
                                "stored with store=false, or created with another API key).",
                           "invalid_request_error", param, "previous_response_not_found")
    return OpenAIError(404, f"Response with id '{response_id}' not found.", "invalid_request_error", None,
                       "response_not_found")


def _renamed(err: OpenAIError) -> OpenAIError:
    """A chat-completions refusal in the Responses API's terms (``max_tokens`` → ``max_output_tokens`` ...)."""
    old = err.param.split(".")[0] if err.param else None
    new = translate.RESPONSES_PARAM.get(old or "")
    if old is None or new is None:
        return err
    return OpenAIError(err.status, err.message.replace(old, new), err.type, new, err.code, err.headers)


def _error_answer(answer: Response) -> Response:
    try:
        inner = orjson.loads(bytes(answer.body))["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return answer  # e.g. 499: the client left
    renamed = _renamed(OpenAIError(answer.status_code, inner.get("message", ""), inner.get("type", ""),
                                   inner.get("param"), inner.get("code")))
    if renamed.param == inner.get("param"):
        return answer
    headers = {k: v for k, v in answer.headers.items() if k.lower() not in ("content-length", "content-type")}
    return Response(orjson.dumps(renamed.body()), answer.status_code, headers, media_type="application/json")


@dataclass
class Turn:
    """One request's conversation, to store with its response."""

    api_key: str | None
    request_id: str
    conversation: list[translate.ChatMessage]  # previous turns + this input (no instructions)
    input_items: list[translate.Item]
    store: bool


class ResponsesService:
    def __init__(self, state: State) -> None:
        self.state = state
        self.store = ResponseStore.build(state.config, state.cache)

    async def create(self, req: ResponsesRequest, api_key: str | None, request_id: str,
                     receive: Receive | None) -> Response:
        conversation: list[translate.ChatMessage] = []
        if req.previous_response_id is not None:
            previous = await self.store.get(api_key, req.previous_response_id)
            if previous is None:
                raise not_found(req.previous_response_id, "previous_response_id")
            conversation = list(previous["conversation"])
        conversation += translate.chat_messages(req)
        messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + conversation
        try:
            self.state.check_limits(len(messages), req.max_output_tokens)
        except OpenAIError as err:
            raise _renamed(err) from None
        translate.check_tool_outputs(messages)
        call = Call(endpoint="chat", model=req.model, body=translate.chat_body(req, messages),
                    messages=translate.router_view(messages), stream=req.stream, include_usage=True,
                    api_key=api_key, request_id=request_id, receive=receive, label="responses")
        answer = await self.state.pipeline.serve(call)
        if answer.status_code != 200:
            return _error_answer(answer)
        headers = {k: v for k, v in answer.headers.items() if k.lower().startswith("x-")}
        turn = Turn(api_key, request_id, conversation, translate.stored_items(req), req.store)
        response_id = translate.new_id("resp")
        if not req.stream:
            completion = orjson.loads(bytes(answer.body))
            response = translate.skeleton(req, response_id, completion.get("model") or req.model)
            choice = (completion.get("choices") or [{}])[0]
            translate.finish(response, choice.get("finish_reason"), completion.get("usage"))
            response.output = translate.output_items(
                choice.get("message") or {}, "completed" if response.status == "completed" else "incomplete")
            await self._save(turn, response)
            return Response(orjson.dumps(response.model_dump(mode="json")), headers=headers,
                            media_type="application/json")
        response = translate.skeleton(req, response_id, req.model)
        # The pipeline's slow-reader bound holds here too: a stalled write closes this stream and so the relay.
        return EventStream(self._events(answer, turn, response), headers, self.state.config.server.slow_reader_s,
                           on_stalled=getattr(answer, "on_stalled", None))

    async def _events(self, answer: Response, turn: Turn, response: ResponseObject) -> AsyncIterator[bytes]:
        """The pipeline's chat-completion SSE (relayed live, or a cached replay in one body) as Responses events."""
        source: AsyncIterator[Any] = (answer.body_iterator if isinstance(answer, StreamingResponse)  # type: ignore[assignment]
                                      else _once(bytes(answer.body)))
        translator = StreamTranslator(response)
        started = False
        buffer = bytearray()
        try:
            async for raw in source:
                buffer += raw if isinstance(raw, bytes | bytearray | memoryview) else str(raw).encode()
                for payload in _payloads(buffer):
                    if payload == b"[DONE]":
                        continue
                    chunk = orjson.loads(payload)
                    if not started:  # the first chunk names the model that answers
                        started = True
                        response.model = chunk.get("model") or response.model
                        yield translator.start()
                    if isinstance(chunk.get("error"), dict):
                        yield translator.fail(chunk["error"])
                        self._log(turn, response, stored=False)
                        return
                    out = translator.feed(chunk)
                    if out:
                        yield out
            if not started:
                yield translator.start()
            tail = translator.finish()
            await self._save(turn, response)
            yield tail
        finally:
            close = getattr(source, "aclose", None)
            if close is not None:
                await close()

    async def _save(self, turn: Turn, response: ResponseObject) -> None:
        stored = False
        if turn.store:
            entry = {"response": response.model_dump(mode="json"), "input_items": turn.input_items,
                     "conversation": turn.conversation + translate.assistant_turn(response.output)}
            stored = await self.store.put(turn.api_key, response.id, entry)
        self._log(turn, response, stored)

    @staticmethod
    def _log(turn: Turn, response: ResponseObject, stored: bool) -> None:
        log.info("response", extra={"request_id": turn.request_id, "response_id": response.id,
                                    "previous_response_id": response.previous_response_id,
                                    "status": response.status, "stored": stored})

    # -- stored responses ---------------------------------------------------------------------------------
    async def _entry(self, api_key: str | None, response_id: str) -> dict[str, Any]:
        entry = await self.store.get(api_key, response_id)
        if entry is None:
            raise not_found(response_id)
        return entry

    async def retrieve(self, api_key: str | None, response_id: str) -> dict[str, Any]:
        response: dict[str, Any] = (await self._entry(api_key, response_id))["response"]
        return response

    async def delete(self, api_key: str | None, response_id: str) -> dict[str, Any]:
        if not await self.store.delete(api_key, response_id):
            raise not_found(response_id)
        return DeletedResponse(id=response_id).model_dump()

    async def input_items(self, api_key: str | None, response_id: str, limit: int, order: str,
                          after: str | None) -> dict[str, Any]:
        """A page of the response's input items (``order`` asc|desc, default desc as in the API)."""
        items: list[dict[str, Any]] = list((await self._entry(api_key, response_id))["input_items"])
        if order == "desc":
            items.reverse()
        if after is not None:
            ids = [i["id"] for i in items]
            if after not in ids:
                raise bad_request(f"No input item with id '{after}' in response '{response_id}'.", param="after")
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        return InputItemList(data=page, first_id=page[0]["id"] if page else None,
                             last_id=page[-1]["id"] if page else None, has_more=len(items) > limit).model_dump()


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


def _payloads(buffer: bytearray) -> list[bytes]:
    """Take the complete events out of ``buffer``: the pipeline's own chat SSE, one ``data:`` line per event."""
    out: list[bytes] = []
    while (end := buffer.find(b"\n\n")) >= 0:
        event = bytes(buffer[:end])
        del buffer[: end + 2]
        out += [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return out
