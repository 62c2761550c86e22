"""The request pipeline shared by /v1/chat/completions and /v1/completions.

resolve the model (route, pin) -> cache lookup -> forward to the expert (fallback when it is down)
-> answer (JSON, or SSE passed through chunk by chunk) -> cache the complete answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import orjson
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive

from gateway.auth import key_id
from gateway.cache import Cache, Lookup, cache_key, is_deterministic
from gateway.config import GatewayConfig
from gateway.errors import OpenAIError, bad_request, cannot_honour, model_not_found, overloaded
from gateway.experts import Endpoint, ExpertHandle, UpstreamError
from gateway.fusion import (
    FusionHooks,
    FusionInputError,
    FusionRefused,
    fingerprints,
    fused_stream,
    unfusable_reason,
    unfusable_request,
)
from gateway.metrics import Metrics
from gateway.routing import Decision, RoutingService
from gateway.shutdown import Shutdown
from router_model import Message

log = logging.getLogger("octoroute.request")
Mode = Literal["single", "pinned", "fusion"]
FUSION_DEFAULT_MAX_TOKENS = 256  # each fused token costs a round of expert calls: bound what nobody asked for
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


@dataclass
class Call:
    """Everything about one request that the pipeline needs, already validated."""

    endpoint: Endpoint
    model: str
    body: dict[str, Any]  # wire JSON as the client sent it (unset fields omitted)
    messages: list[Message]  # what routing looks at
    stream: bool
    include_usage: bool
    api_key: str | None
    request_id: str
    receive: Receive | None = None  # the ASGI receive channel, to notice a client that hangs up
    started: float = field(default_factory=time.perf_counter)
    headers: dict[str, str] = field(default_factory=dict)
    label: str | None = None  # the endpoint in metrics when it is not ``endpoint`` (/v1/responses: "responses")


# Values that ask for nothing: a backend that lacks a feature can still accept these.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "top_k": (-1, 0), "repetition_penalty": (1,), "response_format": ({"type": "text"},), "n": (1,)}


def _asks_for(body: dict[str, Any], field: str) -> bool:
    value = body.get(field)
    return value not in (None, False, 0, [], {}) and value not in _NEUTRAL.get(field, ())


def _json_response(content: dict[str, Any], headers: dict[str, str], status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json", headers=headers)


def error_response(err: OpenAIError, headers: dict[str, str] | None = None) -> Response:
    return _json_response(err.body(), {**(headers or {}), **err.headers}, err.status)


class Assembler:
    """Rebuilds the non-streaming response from streamed chunks (every choice, by index), for the cache and metrics."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.parts: dict[int, list[str]] = defaultdict(list)
        self.finish_reasons: dict[int, str] = {}
        self.usage: dict[str, Any] | None = None
        self.head: dict[str, Any] = {}
        self.cacheable = True

    def add(self, chunk: dict[str, Any]) -> None:
        if not self.head:
            self.head = {k: chunk.get(k) for k in ("id", "created", "model")}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            parts = self.parts[int(choice.get("index") or 0)]
            if self.endpoint == "chat":
                delta = choice.get("delta") or {}
                if delta.get("tool_calls") or choice.get("logprobs"):
                    self.cacheable = False
                if delta.get("content"):
                    parts.append(delta["content"])
            else:
                if choice.get("logprobs"):
                    self.cacheable = False
                if choice.get("text"):
                    parts.append(choice["text"])
            if choice.get("finish_reason"):
                self.finish_reasons[int(choice.get("index") or 0)] = choice["finish_reason"]

    @property
    def complete(self) -> bool:
        """Every choice seen ended normally (stop or length): an answer worth caching."""
        seen = set(self.parts) | set(self.finish_reasons)
        return bool(seen) and all(self.finish_reasons.get(i) in ("stop", "length") for i in seen)

    def response(self) -> dict[str, Any]:
        choices: list[dict[str, Any]] = []
        for index in sorted(set(self.parts) | set(self.finish_reasons)):
            text, finish = "".join(self.parts[index]), self.finish_reasons.get(index)
            if self.endpoint == "chat":
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": finish})
            else:
                choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": finish})
        obj = "chat.completion" if self.endpoint == "chat" else "text_completion"
        return {**self.head, "object": obj, "choices": choices, "usage": self.usage}


def replayable(endpoint: Endpoint, result: dict[str, Any]) -> bool:
    """Whether ``replay_stream`` rebuilds ``result`` exactly: text only (no tool calls, no logprobs), every
    choice finished. Only such answers are cached, so a hit serves a stream and a JSON answer alike."""
    choices = result.get("choices") or []
    for choice in choices:
        if choice.get("finish_reason") not in ("stop", "length") or choice.get("logprobs"):
            return False
        if endpoint == "chat" and any(v for k, v in (choice.get("message") or {}).items()
                                      if k not in ("role", "content")):
            return False
    return bool(choices)


def replay_stream(endpoint: Endpoint, cached: dict[str, Any], include_usage: bool) -> bytes:
    """A cached complete answer as a proper SSE stream: per choice a content chunk and a finish chunk, then
    usage, then [DONE]."""
    base = {"id": cached.get("id"), "created": cached.get("created"), "model": cached.get("model")}
    obj = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
    chunks: list[dict[str, Any]] = []
    for choice in cached["choices"]:
        index, finish = choice.get("index", 0), choice.get("finish_reason")
        if endpoint == "chat":
            content = (choice.get("message") or {}).get("content") or ""
            first = {"index": index, "delta": {"role": "assistant", "content": content}, "logprobs": None,
                     "finish_reason": None}
            last = {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}
        else:
            first = {"index": index, "text": choice.get("text") or "", "logprobs": None, "finish_reason": None}
            last = {"index": index, "text": "", "logprobs": None, "finish_reason": finish}
        chunks += [{**base, "object": obj, "choices": [first]}, {**base, "object": obj, "choices": [last]}]
    if include_usage and cached.get("usage"):
        chunks.append({**base, "object": obj, "choices": [], "usage": cached["usage"]})
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


@dataclass(frozen=True)
class Route:
    """Who answers: one expert (routed or pinned), or several fused at every decoding step."""

    handle: ExpertHandle  # the expert that answers, or the most probable of the fused set
    mode: Mode
    decision: Decision | None
    fused: tuple[tuple[ExpertHandle, float], ...] = ()  # (expert, router probability) when mode == "fusion"

    @property
    def handles(self) -> list[ExpertHandle]:
        return [h for h, _ in self.fused] if self.fused else [self.handle]


class Pipeline:
    def __init__(self, config: GatewayConfig, routing: RoutingService, experts: dict[str, ExpertHandle],
                 cache: Cache, metrics: Metrics, shutdown: Shutdown) -> None:
        self.config = config
        self.shutdown = shutdown
        self.routing = routing
        self.experts = experts
        self.cache = cache
        self.metrics = metrics
        self.fusion_available = False  # set at start-up: do at least two experts share a tokenizer?
        self.vocabularies: dict[str, str | None] = {}  # expert -> tokenizer fingerprint (None: cannot fuse)
        self.fusion_hooks = FusionHooks(on_step=self._on_fusion_step, on_drop=self._on_fusion_drop)

    async def detect_fusion(self, timeout_s: float = 10.0) -> None:
        """Fusion is offered (``model: "fusion"`` in /v1/models) when two experts share a vocabulary."""
        if not self.config.fusion.enabled:
            return
        try:
            async with asyncio.timeout(timeout_s):
                prints = await fingerprints([h.expert for h in self.experts.values()])
        except TimeoutError:
            log.warning("fusion: experts' vocabularies not readable within %.0fs; fusion stays off", timeout_s)
            return
        self.vocabularies = prints
        known = [p for p in prints.values() if p is not None]
        self.fusion_available = len(known) > len(set(known))

    def _on_fusion_step(self, mode: str, seconds: float) -> None:
        self.metrics.fusion_steps.labels(mode).inc()
        self.metrics.fusion_step_seconds.observe(seconds)

    def _on_fusion_drop(self, name: str, err: UpstreamError) -> None:
        self.metrics.upstream_errors.labels(name, err.kind).inc()
        self.experts[name].breaker.record_failure()

    # -- model resolution -------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return ["auto", *self.experts, *(["fusion"] if self.fusion_available else [])]

    async def resolve(self, call: Call) -> Route:
        if call.model in ("auto", "fusion") and (call.model == "auto" or self.fusion_available):
            if not call.messages:  # a token-id prompt carries no text to route on
                name = self.config.default_expert or next(iter(self.experts))
                return Route(self.experts[name], "single", None)
            decision = await self.routing.decide(call.messages)
            self.metrics.routing_seconds.observe(decision.route_ms / 1000)
            self.metrics.router_confidence.observe(decision.confidence)
            top = Route(self.experts[decision.experts[0]], "single", decision)
            explicit = call.model == "fusion"
            auto_fuse = len(decision.experts) > 1 and self.config.fusion.auto
            if self.fusion_available and (explicit or auto_fuse):
                refused = None if explicit else unfusable_request(call.endpoint, call.body)
                if refused is not None:  # the client did not ask for fusion: answer alone rather than fail
                    call.headers["x-octoroute-fusion-refused"] = refused[:200]
                    return top
                return await self._fusion_route(call, decision, explicit) or top
            return top
        handle = self.experts.get(call.model)
        if handle is None:
            raise model_not_found(call.model, self.model_names())
        return Route(handle, "pinned", None)

    async def _fusion_route(self, call: Call, decision: Decision, explicit: bool) -> Route | None:
        """The experts to fuse (most probable first, breakers closed), or None to answer from one expert."""
        names = list(decision.experts)
        if explicit and len(names) < 2:  # the client asked for fusion: fuse at least the top two
            names = sorted(decision.probs, key=decision.probs.__getitem__, reverse=True)[:2]
        members = tuple((self.experts[n], decision.probs[n]) for n in names if self.experts[n].breaker.allow())
        if len(members) < 2:
            return None
        names = [h.name for h, _ in members] + [h.name for h in self._bases()]
        reason = unfusable_reason({n: self.vocabularies.get(n) for n in names})
        if reason is not None:
            log.warning("fusion refused: %s", reason, extra={"request_id": call.request_id})
            call.headers["x-octoroute-fusion-refused"] = reason[:200]
            return None
        return Route(members[0][0], "fusion", decision, members)

    def _bases(self) -> list[ExpertHandle]:
        cfg = self.config.fusion
        if cfg.mode != "dlf" or not cfg.large_base or not cfg.small_base:
            return []
        return [self.experts[cfg.large_base], self.experts[cfg.small_base]]

    # -- entry point ----------------------------------------------------------------------------
    async def serve(self, call: Call) -> Response:
        headers = {"x-request-id": call.request_id}
        call.headers = headers
        expert_label = "none"
        status = 500
        try:
            route = await self.resolve(call)
            expert_label = "fusion" if route.fused else route.handle.name
            headers["x-octoroute-expert"] = expert_label
            decision = route.decision
            headers["x-octoroute-confidence"] = f"{decision.confidence:.4f}" if decision else "1.0000"
            headers["x-octoroute-route-ms"] = f"{decision.route_ms:.3f}" if decision else "0.000"
            self.metrics.route_decisions.labels(expert_label, route.mode).inc()
            for handle in route.handles:
                unsupported = sorted(f for f in handle.expert.unsupported if _asks_for(call.body, f))
                if unsupported:
                    raise cannot_honour(handle.name, handle.config.backend, unsupported,
                                        [h.name for h in self.experts.values() if not h.expert.unsupported & {
                                            *unsupported}])
            if route.fused:
                headers["x-octoroute-fused"] = ",".join(h.name for h, _ in route.fused)
            answer = self._answer_fused(call, route.fused) if route.fused else self._answer(call, route.handle)
            response = await self.shutdown.before_deadline(answer)
            status = response.status_code
            return response
        except OpenAIError as err:
            status = err.status
            return error_response(err, headers)
        finally:
            if not call.stream or status != 200:
                self._finish(call, expert_label, status)

    def _finish(self, call: Call, expert: str, status: int) -> None:
        elapsed = time.perf_counter() - call.started
        self.metrics.requests.labels(expert, call.model, call.label or call.endpoint, str(status)).inc()
        self.metrics.request_seconds.labels(expert, call.label or call.endpoint).observe(elapsed)
        log.info("request", extra={"request_id": call.request_id, "key_id": key_id(call.api_key),
                                   "model": call.model, "expert": expert, "status": status,
                                   "stream": call.stream, "ms": round(elapsed * 1000, 2),
                                   "cache": call.headers.get("x-octoroute-cache")})

    # -- cache ----------------------------------------------------------------------------------
    def _cache_key(self, call: Call, expert: str) -> str | None:
        cfg = self.config.cache
        if cfg.backend == "none" or (cfg.deterministic_only and not is_deterministic(call.body)):
            return None
        namespace = "shared" if cfg.shared else key_id(call.api_key)
        return cache_key(cfg.key_prefix, namespace, call.endpoint, expert, call.body)

    async def _lookup(self, key: str | None) -> tuple[Lookup, dict[str, Any] | None]:
        if key is None:
            return "bypass", None
        result, value = await self.cache.get(key)
        self.metrics.cache.labels(result).inc()
        return result, value

    def _cached_response(self, call: Call, cached: dict[str, Any], expert: str) -> Response:
        if call.stream:
            self._finish(call, expert, 200)
            # The whole SSE stream in one body: a complete, well-formed stream at the cost of one write.
            return Response(replay_stream(call.endpoint, cached, call.include_usage),
                            media_type="text/event-stream", headers={**call.headers, **SSE_HEADERS})
        return _json_response(cached, call.headers)

    async def _store(self, key: str | None, value: dict[str, Any]) -> None:
        if key is not None and await self.cache.set(key, value):
            self.metrics.cache.labels("store").inc()

    # -- answering ------------------------------------------------------------------------------
    def _pick(self, handle: ExpertHandle) -> ExpertHandle:
        """The expert that will really answer: the chosen one, or the fallback while it is open."""
        if handle.breaker.allow():
            return handle
        fallback = self._fallback_for(handle)
        if fallback is not None and fallback.breaker.allow():
            self.metrics.fallbacks.labels(handle.name).inc()
            return fallback
        self.metrics.rejected.labels("breaker_open").inc()
        raise overloaded(f"expert {handle.name!r} is unavailable (circuit open); retry shortly",
                         retry_after_s=max(1, int(handle.config.breaker.reset_after_s)), status=503)

    def _fallback_for(self, handle: ExpertHandle) -> ExpertHandle | None:
        name = self.config.fallback_expert
        if name is None or name == handle.name:
            return None
        return self.experts[name]

    def _upstream_body(self, call: Call, handle: ExpertHandle) -> dict[str, Any]:
        body = dict(call.body)
        body["model"] = handle.config.served_model
        if call.stream:
            body["stream_options"] = {"include_usage": True}  # token metrics; dropped if the client didn't ask
        return body

    async def _answer(self, call: Call, chosen: ExpertHandle) -> Response:
        key = self._cache_key(call, chosen.name)
        lookup, cached = await self._lookup(key)
        call.headers["x-octoroute-cache"] = lookup
        if cached is not None:
            return self._cached_response(call, cached, chosen.name)

        handle = self._pick(chosen)
        attempts = [handle]
        fallback = self._fallback_for(handle)
        if fallback is not None:
            attempts.append(fallback)
        last_error: UpstreamError | None = None
        for i, target in enumerate(attempts):
            if i and not target.breaker.allow():
                break
            self._refuse_if_saturated(target)
            if target is not chosen:
                call.headers["x-octoroute-expert"] = target.name
                call.headers["x-octoroute-fallback-from"] = chosen.name
            try:
                if call.stream:
                    return await self._stream(call, target, key if target is chosen else None)
                return await self._generate(call, target, key if target is chosen else None)
            except UpstreamError as err:
                last_error = err
                if err.kind == "http_4xx" or not err.before_first_byte:
                    break
                if i + 1 < len(attempts):
                    self.metrics.fallbacks.labels(target.name).inc()
                    log.warning("expert %s failed before the first byte (%s); falling back to %s",
                                target.name, err.kind, attempts[i + 1].name,
                                extra={"request_id": call.request_id})
        assert last_error is not None
        if last_error.body is not None and last_error.kind == "http_4xx":
            inner = last_error.body.get("error")
            err_obj: dict[str, Any] = inner if isinstance(inner, dict) else {}
            raise OpenAIError(last_error.status, str(err_obj.get("message", last_error)),
                              str(err_obj.get("type", "invalid_request_error")), err_obj.get("param"),
                              err_obj.get("code"))
        raise OpenAIError(last_error.status, str(last_error),
                          "timeout_error" if last_error.kind == "timeout" else "server_error",
                          None, f"upstream_{last_error.kind}")

    def _refuse_if_saturated(self, handle: ExpertHandle) -> None:
        """429 instead of queueing without bound."""
        if handle.saturated:
            self.metrics.rejected.labels("expert_saturated").inc()
            raise overloaded(f"expert {handle.name!r} is at its concurrency limit "
                             f"({handle.config.max_concurrency}); retry shortly")

    def _record_failure(self, handle: ExpertHandle, err: UpstreamError) -> None:
        self.metrics.upstream_errors.labels(handle.name, err.kind).inc()
        if err.kind != "http_4xx":
            handle.breaker.record_failure()
        else:
            handle.breaker.record_success()  # the expert answered; the request was bad

    def _count_tokens(self, expert: str, usage: dict[str, Any] | None) -> None:
        if usage:
            self.metrics.tokens.labels(expert, "prompt").inc(usage.get("prompt_tokens") or 0)
            self.metrics.tokens.labels(expert, "completion").inc(usage.get("completion_tokens") or 0)

    async def _generate(self, call: Call, handle: ExpertHandle, key: str | None) -> Response:
        handle.acquire()
        try:
            result = await self._unless_client_leaves(
                call, handle.expert.generate(call.endpoint, self._upstream_body(call, handle)))
        except UpstreamError as err:
            self._record_failure(handle, err)
            raise
        except ClientGone:
            handle.breaker.release_probe()
            return Response(status_code=499)
        finally:
            handle.release()
        handle.breaker.record_success()
        self._count_tokens(handle.name, result.get("usage"))
        if replayable(call.endpoint, result):
            await self._store(key, result)
        return _json_response(result, call.headers)

    @staticmethod
    async def _unless_client_leaves(call: Call, work: Awaitable[T]) -> T:
        """Await ``work``, cancelling it (and so the upstream request) if the client disconnects first."""
        if call.receive is None:
            return await work
        receive = call.receive

        async def hang_up() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(hang_up())
        try:
            await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # we were cancelled (drain deadline, server stop): so is the upstream call
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        finally:
            watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientGone
        return task.result()

    async def _stream(self, call: Call, handle: ExpertHandle, key: str | None) -> Response:
        """Prime the upstream stream (so errors before the first byte can fall back), then pass it on."""
        handle.acquire()
        upstream = handle.expert.stream(call.endpoint, self._upstream_body(call, handle))

        async def prime() -> bytes | None:
            try:
                return await anext(upstream)
            except StopAsyncIteration:
                return None

        try:
            # Watch the client while the expert is silent: one that leaves before the first token must
            # free the expert at once (cancelling the upstream call), not when the first token comes.
            first = await self._unless_client_leaves(call, prime())
        except BaseException as exc:
            handle.release()
            if isinstance(exc, UpstreamError):
                self._record_failure(handle, exc)
                raise
            handle.breaker.release_probe()
            if isinstance(exc, ClientGone):
                await upstream.aclose()  # type: ignore[attr-defined]
                return Response(status_code=499)
            raise
        self.metrics.ttft_seconds.labels(handle.name).observe(time.perf_counter() - call.started)
        return StreamingResponse(self._relay(call, handle, upstream, first, key),
                                 media_type="text/event-stream", headers={**call.headers, **SSE_HEADERS})

    async def _relay(self, call: Call, handle: ExpertHandle, upstream: AsyncIterator[bytes],
                     first: bytes | None, key: str | None) -> AsyncIterator[bytes]:
        assembler = Assembler(call.endpoint)
        status = 200
        completed = False
        try:
            pending = first
            while pending is not None:
                chunk = orjson.loads(pending)
                if "error" in chunk:  # an upstream error event: pass it on and close
                    status = 502
                    self.metrics.upstream_errors.labels(handle.name, "stream_error").inc()
                    yield b"data: " + pending + b"\n\n"
                    return
                assembler.add(chunk)
                if chunk.get("choices") or call.include_usage:
                    yield b"data: " + pending + b"\n\n"
                pending = await self.shutdown.before_deadline(anext(upstream, None))
            completed = True
            handle.breaker.record_success()
            yield b"data: [DONE]\n\n"
        except OpenAIError as err:  # the drain deadline passed
            status = err.status
            handle.breaker.release_probe()
            yield err.sse_event()
        except UpstreamError as err:
            status = err.status
            self._record_failure(handle, err)
            yield OpenAIError(err.status, str(err), "server_error", None, f"upstream_{err.kind}").sse_event()
        except orjson.JSONDecodeError:
            status = 502
            malformed = UpstreamError("protocol", f"expert {handle.name} sent a malformed chunk", 502)
            self._record_failure(handle, malformed)
            yield OpenAIError(502, str(malformed), "server_error", None, "upstream_protocol").sse_event()
        finally:
            if not completed and status == 200:
                status = 499  # the client went away
                handle.breaker.release_probe()
            await upstream.aclose()  # type: ignore[attr-defined]
            handle.release()
            self._count_tokens(handle.name, assembler.usage)
            self._finish(call, handle.name, status)
        if completed and assembler.cacheable and assembler.complete:
            await self._store(key, assembler.response())


    # -- fusion ---------------------------------------------------------------------------------
    async def _answer_fused(self, call: Call, members: tuple[tuple[ExpertHandle, float], ...]) -> Response:
        """Fuse the members' next-token distributions at every step; streams like a single expert."""
        names = [h.name for h, _ in members]
        key = self._cache_key(call, f"fusion[{self.config.fusion.mode}]:" + "+".join(names))
        lookup, cached = await self._lookup(key)
        call.headers["x-octoroute-cache"] = lookup
        if cached is not None:
            return self._cached_response(call, cached, "fusion")
        for handle, _ in members:
            self._refuse_if_saturated(handle)
        body = {**call.body, "model": "fusion"}
        if not any(k in body for k in ("max_tokens", "max_completion_tokens")):
            body["max_tokens"] = FUSION_DEFAULT_MAX_TOKENS
        bases = self._bases()
        chunks = fused_stream([(h.expert, w) for h, w in members], call.endpoint, body, config=self.config.fusion,
                              bases=(bases[0].expert, bases[1].expert) if bases else None, hooks=self.fusion_hooks)
        for handle, _ in members:
            handle.acquire()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                for handle, _ in members:
                    handle.release()

        try:
            first = await self._unless_client_leaves(call, anext(chunks))
        except ClientGone:
            release()
            await chunks.aclose()  # type: ignore[attr-defined]
            return Response(status_code=499)
        except FusionRefused as exc:  # vocabularies differ after all: answer from the most probable expert
            release()
            call.headers["x-octoroute-fusion-refused"] = str(exc)[:200]
            call.headers["x-octoroute-expert"] = members[0][0].name
            call.headers.pop("x-octoroute-fused", None)
            return await self._answer(call, members[0][0])
        except FusionInputError as exc:
            release()
            raise bad_request(str(exc), param=exc.param) from None
        except UpstreamError as err:
            release()
            raise OpenAIError(err.status, str(err), "server_error", None, f"upstream_{err.kind}") from None
        except BaseException:
            release()
            raise
        if not call.stream:
            try:
                assembler = Assembler(call.endpoint)
                assembler.add(first)
                async for chunk in chunks:
                    assembler.add(chunk)
            except UpstreamError as err:
                raise OpenAIError(err.status, str(err), "server_error", None, f"upstream_{err.kind}") from None
            finally:
                release()
            result = {**assembler.response(), "octoroute_fusion": first.get("octoroute_fusion")}
            self._count_tokens("fusion", assembler.usage)
            if assembler.complete:
                await self._store(key, result)
            return _json_response(result, call.headers)
        return StreamingResponse(self._relay_fused(call, chunks, first, key, release),
                                 media_type="text/event-stream", headers={**call.headers, **SSE_HEADERS})

    async def _relay_fused(self, call: Call, chunks: AsyncIterator[dict[str, Any]], first: dict[str, Any],
                           key: str | None, release: Any) -> AsyncIterator[bytes]:
        assembler = Assembler(call.endpoint)
        status, completed = 200, False
        try:
            chunk: dict[str, Any] | None = first
            while chunk is not None:
                assembler.add(chunk)
                if chunk.get("choices") or call.include_usage:
                    yield b"data: " + orjson.dumps(chunk) + b"\n\n"
                chunk = await self.shutdown.before_deadline(anext(chunks, None))
            completed = True
            yield b"data: [DONE]\n\n"
        except OpenAIError as err:  # the drain deadline passed
            status = err.status
            yield err.sse_event()
        except UpstreamError as err:
            status = err.status
            yield OpenAIError(err.status, str(err), "server_error", None, f"upstream_{err.kind}").sse_event()
        finally:
            if not completed and status == 200:
                status = 499
            await chunks.aclose()  # type: ignore[attr-defined]
            release()
            self._count_tokens("fusion", assembler.usage)
            self._finish(call, "fusion", status)
        if completed and assembler.cacheable and assembler.complete:
            await self._store(key, assembler.response())


def new_request_id(incoming: str | None) -> str:
    if incoming and len(incoming) <= 128 and incoming.isascii() and incoming.isprintable():
        return incoming
    return uuid.uuid4().hex
