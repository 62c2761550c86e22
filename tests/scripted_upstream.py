"""A small scripted OpenAI-compatible server, for tests that need an upstream to misbehave on cue.

Run: ``python -m tests.scripted_upstream --port 9001 --name math``. It answers
``/v1/chat/completions`` and ``/v1/completions`` (stream or not) with ``"<name>: <last user text>"``
split into word chunks, ``/v1/models``, and two test endpoints. A chat request with ``tools`` whose last
message is not a tool result gets one call of the first tool instead, every parameter set to the last
user text (finish_reason ``tool_calls``); after the tool result, the answer is ``"<name>: <tool output>"``.
Test endpoints:

- ``POST /_control`` ``{"mode": ..., ...}`` sets the behaviour of the following requests:
  ``ok`` | ``fail`` (HTTP ``status``, default 500, after ``delay_s``) | ``slow_first`` (sleep ``delay_s``
  before headers) | ``slow_chunks`` (sleep ``delay_s`` between chunks) | ``die_after`` (drop the connection after
  ``chunks`` chunks) | ``keepalive`` (after the first chunk, only ``: keep-alive`` comments every
  ``delay_s``) | ``inject`` (after ``after`` good chunks, the raw SSE data ``payload`` x ``repeat``;
  non-streamed: that as the whole 200 body) | ``big`` (``chunks`` chunks of ``size`` characters, as fast as the
  client takes them) | ``slow_body`` (non-streamed: headers at once, the body after ``delay_s``)
  | ``rich`` (the answer also carries the ``fields`` listed: ``reasoning_content``, ``tool_calls``,
  ``logprobs``, ``refusal``, streamed and not, consistently); ``fail_times`` limits
  ``fail`` to the next N requests. ``framing`` (any mode) lists how events are written: ``crlf`` or ``cr``
  line ends, ``comments`` between events, ``nospace`` after ``data:``, ``multiline`` data, ``fields``
  (``event:``/``id:``/``retry:`` lines), a leading ``bom`` - all valid per the WHATWG event-stream format.
- ``GET /_stats``: counts of requests, completed streams, and streams the client cancelled.

Raw ASGI, no framework: it doubles as the fast upstream of the gateway benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from typing import Any

import orjson

JSONH = [(b"content-type", b"application/json")]
SSEH = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class Scripted:
    def __init__(self, name: str) -> None:
        self.name = name
        self.control: dict[str, Any] = {"mode": "ok"}
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "failed": 0}
        self.last_body: dict[str, Any] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path, method = scope["path"], scope["method"]
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        if path == "/_control" and method == "POST":
            self.control = orjson.loads(body)
            return await self._json(send, {"ok": True})
        if path == "/_stats":
            return await self._json(send, {**self.stats, "last_body": self.last_body})
        if path in ("/v1/models", "/health"):
            return await self._json(send, {"object": "list", "data": [{"id": self.name, "object": "model"}]})
        if path not in ("/v1/chat/completions", "/v1/completions") or method != "POST":
            return await self._json(send, {"error": {"message": "not found"}}, 404)
        self.stats["requests"] += 1
        req = orjson.loads(body)
        self.last_body = req
        await self._complete(path.endswith("chat/completions"), req, receive, send)

    async def _json(self, send: Any, obj: Any, status: int = 200) -> None:
        await send({"type": "http.response.start", "status": status, "headers": JSONH})
        await send({"type": "http.response.body", "body": orjson.dumps(obj)})

    def _words(self, chat: bool, req: dict[str, Any]) -> list[str]:
        if chat:
            text = next((m.get("content") or "" for m in reversed(req["messages"]) if m["role"] in ("user", "tool")),
                        "")
        else:
            text = req["prompt"] if isinstance(req["prompt"], str) else "tokens"
        words = f"{self.name}: {text}".split(" ")
        limit = req.get("max_tokens") or 10_000
        return [w if i == 0 else " " + w for i, w in enumerate(words)][:limit]

    def _frame(self, data: bytes) -> bytes:
        """One SSE event carrying ``data``, written in the ``framing`` forms asked for."""
        framing = set(self.control.get("framing") or ())
        cut = data.find(b',"') + 1  # between two members, where the joining newline is JSON whitespace
        lines = [data[:cut], data[cut:]] if "multiline" in framing and cut else [data]
        sep = b"data:" if "nospace" in framing else b"data: "
        out = [b"event: message", b"id: 7", b"retry: 1000"] if "fields" in framing else []
        out += [sep + line for line in lines]
        eol = b"\r\n" if "crlf" in framing else b"\r" if "cr" in framing else b"\n"
        event = eol.join(out) + eol + eol
        return (b": comment" + eol + event) if "comments" in framing else event

    def _payload(self) -> bytes:
        """``inject``'s payload, ``repeat`` times (large payloads without sending them to /_control)."""
        return str(self.control["payload"]).encode() * int(self.control.get("repeat", 1))

    def _rich(self, chat: bool, words: list[str], finish: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(streamed choices, non-streamed choice) of an answer carrying the ``fields`` asked for."""
        fields = set(self.control.get("fields") or ())
        pieces: list[dict[str, Any]] = []
        if "reasoning_content" in fields:
            pieces += [{"reasoning_content": "Let me "}, {"reasoning_content": "think."}]
        if "refusal" in fields:
            pieces += [{"refusal": "I cannot "}, {"refusal": "help with that."}]
        else:
            pieces += [{"content": w} for w in words]
        if "tool_calls" in fields:
            finish = "tool_calls"
            pieces += [{"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                        "function": {"name": "lookup", "arguments": ""}}]},
                       {"tool_calls": [{"index": 0, "function": {"arguments": '{"q": '}}]},
                       {"tool_calls": [{"index": 0, "function": {"arguments": '"x"}'}}]}]
        streamed: list[dict[str, Any]] = []
        for i, delta in enumerate(pieces):
            text = delta.get("content") or ""
            lp: dict[str, Any] | None = None
            if "logprobs" in fields and "content" in delta:
                lp = ({"content": [{"token": text, "logprob": -0.25 * i, "bytes": list(text.encode()),
                                    "top_logprobs": [{"token": text, "logprob": -0.25 * i, "bytes": None}]}],
                       "refusal": None} if chat else
                      {"tokens": [text], "token_logprobs": [-0.25 * i], "top_logprobs": [{text: -0.25 * i}],
                       "text_offset": [i]})
            choice: dict[str, Any] = ({"index": 0, "delta": {**({"role": "assistant"} if i == 0 else {}), **delta}}
                                      if chat else {"index": 0, "text": text})
            streamed.append(choice | {"logprobs": lp, "finish_reason": None})
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        logprobs: dict[str, list[Any]] = {}
        calls: dict[str, Any] = {}
        for choice in streamed:
            delta = choice.get("delta") or {"content": choice.get("text")}
            for key in ("content", "reasoning_content", "refusal"):
                if key in delta:
                    message[key] = (message.get(key) or "") + delta[key]
            for call in delta.get("tool_calls") or ():
                calls |= {k: call[k] for k in ("id", "type") if call.get(k)}
                fn = call.get("function") or {}
                calls["name"] = fn.get("name") or calls.get("name")
                calls["arguments"] = calls.get("arguments", "") + (fn.get("arguments") or "")
            for key, value in (choice.get("logprobs") or {}).items():
                if isinstance(value, list):
                    logprobs[key] = logprobs.get(key, []) + value
        if calls:
            message["tool_calls"] = [{"id": calls["id"], "type": calls["type"],
                                      "function": {"name": calls["name"], "arguments": calls["arguments"]}}]
        if chat and "logprobs" in fields:
            logprobs["refusal"] = None  # type: ignore[assignment]
        body: dict[str, Any] = {"message": message} if chat else {"text": message["content"] or ""}
        whole = {"index": 0, **body, "logprobs": logprobs or None, "finish_reason": finish}
        return streamed, whole

    async def _complete(self, chat: bool, req: dict[str, Any], receive: Any, send: Any) -> None:
        mode = self.control.get("mode", "ok")
        if mode == "fail":
            times = self.control.get("fail_times")
            if times is None or times > 0:
                if times is not None:
                    self.control["fail_times"] = times - 1
                self.stats["failed"] += 1
                await asyncio.sleep(float(self.control.get("delay_s", 0)))  # a slow failure
                status = int(self.control.get("status", 500))
                return await self._json(send, {"error": {"message": f"scripted {status}", "type": "server_error",
                                                         "param": None, "code": None}}, status)
        if mode == "slow_first":
            await asyncio.sleep(float(self.control.get("delay_s", 5)))
        if chat and req.get("tools") and req["messages"][-1]["role"] != "tool":
            return await self._call_tool(req, send)
        words = self._words(chat, req)
        if mode == "big":
            words = ["x" * int(self.control.get("size", 65536))] * int(self.control.get("chunks", 300))
        finish = "length" if req.get("max_tokens") and len(words) >= req["max_tokens"] else "stop"
        usage = {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7 + len(words)}
        rid, created = f"cmpl-{self.stats['requests']}", int(time.time())
        rich = self._rich(chat, words, finish) if mode == "rich" else None
        if rich is not None:
            finish = rich[1]["finish_reason"]
        if not req.get("stream"):
            if mode == "inject":
                self.stats["completed"] += 1
                await send({"type": "http.response.start", "status": 200, "headers": JSONH})
                return await send({"type": "http.response.body", "body": self._payload()})
            if rich is not None:
                choice: dict[str, Any] = rich[1]
            elif chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                          "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": "".join(words), "logprobs": None, "finish_reason": finish}
            answer = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                      "model": self.name, "choices": [choice], "usage": usage}
            if mode == "slow_body":  # headers at once, the body after delay_s
                await send({"type": "http.response.start", "status": 200, "headers": JSONH})
                await asyncio.sleep(float(self.control.get("delay_s", 3)))
                self.stats["completed"] += 1
                return await send({"type": "http.response.body", "body": orjson.dumps(answer)})
            self.stats["completed"] += 1
            return await self._json(send, answer)
        await send({"type": "http.response.start", "status": 200, "headers": SSEH})
        bom = ["\ufeff".encode()] if "bom" in (self.control.get("framing") or ()) else []  # opens the stream

        async def send_body(body: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": (bom.pop() if bom else b"") + body, "more_body": more})

        disconnected = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        watcher = asyncio.create_task(watch())
        obj = "chat.completion.chunk" if chat else "text_completion"
        choices = rich[0] if rich is not None else [
            {"index": 0, "delta": {**({"role": "assistant"} if i == 0 else {}), "content": word}} if chat
            else {"index": 0, "text": word} for i, word in enumerate(words)]
        try:
            for i, choice in enumerate(choices):
                if disconnected.is_set():
                    self.stats["cancelled"] += 1
                    return
                if mode == "die_after" and i >= int(self.control.get("chunks", 1)):
                    raise ConnectionAbortedError("scripted death mid-stream")
                if mode == "inject" and i == int(self.control.get("after", 1)):
                    await send_body(self._frame(self._payload()))
                    await disconnected.wait()
                    return
                choice = {"logprobs": None, "finish_reason": None, **choice}
                chunk = {"id": rid, "object": obj, "created": created, "model": self.name, "choices": [choice]}
                await send_body(self._frame(orjson.dumps(chunk)))
                if mode == "keepalive" and i == 0:
                    while not disconnected.is_set():
                        await send_body(b": keep-alive\n\n")
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(disconnected.wait(), float(self.control.get("delay_s", 0.2)))
                    self.stats["cancelled"] += 1
                    return
                if mode == "slow_chunks":
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(disconnected.wait(), float(self.control.get("delay_s", 1)))
            last = {"index": 0, "delta": {}, "finish_reason": finish} if chat else {
                "index": 0, "text": "", "finish_reason": finish}
            tail = [{"id": rid, "object": obj, "created": created, "model": self.name, "choices": [last]}]
            if (req.get("stream_options") or {}).get("include_usage"):
                tail.append({"id": rid, "object": obj, "created": created, "model": self.name, "choices": [],
                             "usage": usage})
            payload = b"".join(self._frame(orjson.dumps(c)) for c in tail) + self._frame(b"[DONE]")
            await send_body(payload, more=False)
            self.stats["completed"] += 1
        finally:
            watcher.cancel()

    async def _call_tool(self, req: dict[str, Any], send: Any) -> None:
        """Answer with one call of the first tool (see the module docstring)."""
        fn = req["tools"][0]["function"]
        text = next((m.get("content") or "" for m in reversed(req["messages"]) if m["role"] == "user"), "")
        arguments = orjson.dumps({p: text for p in (fn.get("parameters") or {}).get("properties", {})}).decode()
        call = {"index": 0, "id": f"call_{self.stats['requests']}", "type": "function",
                "function": {"name": fn["name"], "arguments": arguments}}
        usage = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
        head = {"id": f"cmpl-{self.stats['requests']}", "created": int(time.time()), "model": self.name}
        self.stats["completed"] += 1
        if not req.get("stream"):
            message = {"role": "assistant", "content": None, "tool_calls": [{k: v for k, v in call.items()
                                                                              if k != "index"}]}
            return await self._json(send, {**head, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}]})
        half = len(arguments) // 2
        deltas = [{"role": "assistant", "tool_calls": [{**call, "function": {"name": fn["name"], "arguments": ""}}]},
                  {"tool_calls": [{"index": 0, "function": {"arguments": arguments[:half]}}]},
                  {"tool_calls": [{"index": 0, "function": {"arguments": arguments[half:]}}]}]
        chunks: list[dict[str, Any]] = [
            {**head, "object": "chat.completion.chunk",
             "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}]} for d in deltas]
        chunks.append({**head, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}]})
        if (req.get("stream_options") or {}).get("include_usage"):
            chunks.append({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        await send({"type": "http.response.start", "status": 200, "headers": SSEH})
        payload = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": payload, "more_body": False})


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--name", default="scripted")
    args = ap.parse_args()
    uvicorn.run(Scripted(args.name), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
