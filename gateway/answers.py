"""Complete answers: rebuilt from streamed chunks, and replayed as a stream or a JSON body (the cache).

The cache stores one shape, the non-streamed response object (``chat.completion`` /
``text_completion``), whichever way the answer arrived, and serves it to streamed and non-streamed
requests alike. That only works if the conversion is lossless for everything a client can see, so
both directions know every field of the OpenAI API reference
(https://platform.openai.com/docs/api-reference/chat/streaming and ``…/chat/object``) plus the
vLLM extensions that clients read:

- text fields concatenated across deltas: ``content``, ``reasoning_content`` / ``reasoning`` (vLLM
  reasoning parsers), ``refusal``; completions ``text``
- ``tool_calls`` merged by index (``id``, ``type``, ``function.name`` once, ``function.arguments`` joined)
- ``logprobs`` lists joined per key (chat ``content``/``refusal``; completions ``tokens``,
  ``token_logprobs``, ``top_logprobs``, ``text_offset``)
- ``finish_reason``, vLLM's ``stop_reason``; top level ``system_fingerprint``, ``service_tier``, ``usage``

An answer carrying any other non-null field is not cacheable (a replay would silently lose it), nor
is one whose choices did not all end normally (``stop``, ``length``, ``tool_calls``). A replay gets a
new ``id`` and the current ``created``: the cached part is the answer, not the response's identity.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from typing import Any

import orjson

from gateway.experts import Endpoint

JSON = dict[str, Any]
TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")
FINISHED = frozenset({"stop", "length", "tool_calls"})
_TOP = frozenset({"id", "object", "created", "model", "choices", "usage", "system_fingerprint", "service_tier"})
_CARRIED_TOP = ("system_fingerprint", "service_tier")
_CHOICE = frozenset({"index", "logprobs", "finish_reason", "stop_reason"})
_MESSAGE = frozenset({"role", *TEXT_FIELDS, "tool_calls"})
_TOOL_CALL = frozenset({"index", "id", "type", "function"})
_FUNCTION = frozenset({"name", "arguments"})


def _unknown(obj: JSON, known: frozenset[str]) -> bool:
    """Whether ``obj`` carries a non-null field outside ``known`` (one a replay would not reproduce)."""
    return any(v is not None and v != [] for k, v in obj.items() if k not in known)


def new_identity(endpoint: Endpoint) -> JSON:
    """A fresh ``id`` and the current ``created`` for a response served from the cache."""
    prefix = "chatcmpl-" if endpoint == "chat" else "cmpl-"
    return {"id": prefix + uuid.uuid4().hex, "created": int(time.time())}


class _Choice:
    """One choice being rebuilt from its deltas."""

    def __init__(self) -> None:
        self.role: str | None = None
        self.texts: dict[str, list[str]] = {}
        self.tools: dict[int, JSON] = {}
        self.logprobs: dict[str, list[Any]] | None = None
        self.finish_reason: str | None = None
        self.stop_reason: Any = None

    def add_logprobs(self, logprobs: JSON) -> bool:
        """Join the lists of a chunk's logprobs; False when they hold something else (not replayable)."""
        self.logprobs = self.logprobs or {}
        for key, value in logprobs.items():
            if value is None:
                self.logprobs.setdefault(key, None)  # type: ignore[arg-type]
            elif isinstance(value, list):
                self.logprobs[key] = (self.logprobs.get(key) or []) + value
            else:
                return False
        return True

    def add_tool_call(self, delta: JSON) -> bool:
        call = self.tools.setdefault(int(delta["index"]), {"id": None, "type": None, "name": None, "arguments": []})
        function = delta.get("function") or {}
        if _unknown(delta, _TOOL_CALL) or _unknown(function, _FUNCTION):
            return False
        for key in ("id", "type"):
            call[key] = delta.get(key) or call[key]
        call["name"] = function.get("name") or call["name"]
        if function.get("arguments"):
            call["arguments"].append(function["arguments"])
        return True

    def message(self) -> JSON:
        message: JSON = {"role": self.role or "assistant"}
        for key in TEXT_FIELDS:  # content and refusal always (null when absent), reasoning only when sent
            if key in self.texts or key in ("content", "refusal"):
                message[key] = "".join(self.texts[key]) if key in self.texts else None
        if self.tools:
            message["tool_calls"] = [
                {"id": c["id"], "type": c["type"] or "function",
                 "function": {"name": c["name"], "arguments": "".join(c["arguments"])}}
                for _, c in sorted(self.tools.items())]
        return message


class Assembler:
    """Rebuilds the non-streamed response from validated streamed chunks (every choice, by index)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.choices: dict[int, _Choice] = defaultdict(_Choice)
        self.usage: JSON | None = None
        self.head: JSON = {}
        self.cacheable = True

    def add(self, chunk: JSON) -> None:
        if not self.head:
            self.head = {k: chunk.get(k) for k in ("id", "created", "model")}
            self.head |= {k: chunk[k] for k in _CARRIED_TOP if chunk.get(k) is not None}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if _unknown(chunk, _TOP):
            self.cacheable = False
        for raw in chunk.get("choices") or ():
            choice = self.choices[int(raw.get("index") or 0)]
            if self.endpoint == "chat":
                delta = raw.get("delta") or {}
                if _unknown(raw, _CHOICE | {"delta"}) or _unknown(delta, _MESSAGE):
                    self.cacheable = False
                choice.role = delta.get("role") or choice.role
                for key in TEXT_FIELDS:
                    if isinstance(delta.get(key), str):
                        choice.texts.setdefault(key, []).append(delta[key])
                for call in delta.get("tool_calls") or ():
                    self.cacheable &= choice.add_tool_call(call)
            else:
                if _unknown(raw, _CHOICE | {"text"}):
                    self.cacheable = False
                choice.texts.setdefault("text", []).append(raw.get("text") or "")
            if raw.get("logprobs") is not None:
                self.cacheable &= choice.add_logprobs(raw["logprobs"])
            choice.finish_reason = raw.get("finish_reason") or choice.finish_reason
            if raw.get("stop_reason") is not None:
                choice.stop_reason = raw["stop_reason"]

    @property
    def complete(self) -> bool:
        """Every choice seen ended normally: an answer worth caching."""
        return bool(self.choices) and all(c.finish_reason in FINISHED for c in self.choices.values())

    def response(self) -> JSON:
        choices: list[JSON] = []
        for index, c in sorted(self.choices.items()):
            body: JSON = ({"message": c.message()} if self.endpoint == "chat"
                          else {"text": "".join(c.texts.get("text", []))})
            choice = {"index": index, **body, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
            if c.stop_reason is not None:
                choice["stop_reason"] = c.stop_reason
            choices.append(choice)
        obj = "chat.completion" if self.endpoint == "chat" else "text_completion"
        return {**self.head, "object": obj, "choices": choices, "usage": self.usage}


def replayable(endpoint: Endpoint, result: JSON) -> bool:
    """Whether ``replay_stream`` rebuilds ``result`` with every field a client sees, every choice finished.
    Only such answers are cached, so a hit serves a stream and a JSON answer alike."""
    choices = result.get("choices") or []
    if _unknown(result, _TOP):
        return False
    for choice in choices:
        if choice.get("finish_reason") not in FINISHED:
            return False
        logprobs = choice.get("logprobs")
        if logprobs is not None and not all(v is None or isinstance(v, list) for v in logprobs.values()):
            return False
        if endpoint == "chat":
            message = choice.get("message") or {}
            if _unknown(choice, _CHOICE | {"message"}) or _unknown(message, _MESSAGE):
                return False
            for call in message.get("tool_calls") or ():
                if _unknown(call, _TOOL_CALL) or _unknown(call.get("function") or {}, _FUNCTION):
                    return False
        elif _unknown(choice, _CHOICE | {"text"}):
            return False
    return bool(choices)


def _replay_chunks(endpoint: Endpoint, cached: JSON, identity: JSON, include_usage: bool) -> list[JSON]:
    base = {"id": identity["id"], "object": "chat.completion.chunk" if endpoint == "chat" else "text_completion",
            "created": identity["created"], "model": cached.get("model")}
    base |= {k: cached[k] for k in _CARRIED_TOP if cached.get(k) is not None}
    if include_usage:
        base["usage"] = None  # as OpenAI: every chunk but the last carries "usage": null
    chunks: list[JSON] = []
    for choice in cached["choices"]:
        index, finish = choice.get("index", 0), choice.get("finish_reason")
        if endpoint == "chat":
            message = choice.get("message") or {}
            delta: JSON = {"role": message.get("role") or "assistant"}
            delta |= {k: message[k] for k in TEXT_FIELDS if message.get(k) is not None}
            if message.get("tool_calls"):
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
            first: JSON = {"index": index, "delta": delta}
            last: JSON = {"index": index, "delta": {}}
        else:
            first, last = {"index": index, "text": choice.get("text") or ""}, {"index": index, "text": ""}
        first |= {"logprobs": choice.get("logprobs"), "finish_reason": None}
        last |= {"logprobs": None, "finish_reason": finish}
        if choice.get("stop_reason") is not None:
            last["stop_reason"] = choice["stop_reason"]
        chunks += [{**base, "choices": [first]}, {**base, "choices": [last]}]
    if include_usage and cached.get("usage"):
        chunks.append({**base, "choices": [], "usage": cached["usage"]})
    return chunks


def replay_stream(endpoint: Endpoint, cached: JSON, include_usage: bool, identity: JSON | None = None) -> bytes:
    """A cached complete answer as a whole SSE stream: per choice one chunk with everything and one with
    the finish reason, then usage (when asked), then ``[DONE]``."""
    chunks = _replay_chunks(endpoint, cached, identity or new_identity(endpoint), include_usage)
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def replay_json(endpoint: Endpoint, cached: JSON) -> JSON:
    """A cached complete answer as a non-streamed response of its own (new id, current time)."""
    return {**cached, **new_identity(endpoint)}
