"""The request pipeline shared by /v1/chat/completions and /v1/completions (and /v1/responses on top).

resolve the model (``gateway.resolution``) -> cache lookup (``gateway.answer_cache``) -> pick the expert
(``gateway.guards``: slots, breaker, fallback) -> forward it (``ExpertHandle``: time limits, failure
accounting) -> answer (JSON, or SSE relayed chunk by chunk, ``gateway.relay``) -> cache the complete
answer (rebuilt by ``gateway.answers``).

Who is at fault decides what a failure counts against: an upstream 4xx or an in-process failure on
this request is the request's (the client's answer; the breaker does not move), anything that says
the expert is unreachable, slow or broken is the expert's (breaker, fallback, metrics). An exception
inside an expert never reaches the client as text: it is logged with the request id, and the client
gets a generic OpenAI-shaped error.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Receive

from gateway.answer_cache import AnswerCache
from gateway.answers import Assembler, replay_json, replay_stream
from gateway.auth import key_id
from gateway.cache import Cache
from gateway.config import GatewayConfig, TimeoutConfig
from gateway.errors import OpenAIError, bad_request, cannot_honour
from gateway.experts import Endpoint, ExpertHandle, UpstreamError
from gateway.experts.deadlines import bounded_stream
from gateway.fusion import FusionHooks, FusionInputError, FusionRefused, fused_stream
from gateway.guards import Guards
from gateway.metrics import Metrics
from gateway.relay import SSE_HEADERS, ClientGone, EventStream, sse, unless_client_leaves, visible
from gateway.resolution import Resolver
from gateway.routing import RoutingService
from gateway.shutdown import Shutdown
from router_model import Message

__all__ = ["SSE_HEADERS", "Call", "Pipeline", "error_response", "new_request_id"]

log = logging.getLogger("octoroute.request")
FUSION_DEFAULT_MAX_TOKENS = 256  # each fused token costs a round of expert calls: bound what nobody asked for
DONE = b"data: [DONE]\n\n"


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
    label: str | None = None  # the endpoint as metrics name it, when not ``endpoint`` (e.g. "responses")


# Values that ask for nothing: a backend that lacks a feature can still accept these.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "top_k": (-1, 0), "repetition_penalty": (1,), "response_format": ({"type": "text"},), "n": (1,)}


def _asks_for(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    return value not in (None, False, 0, [], {}) and value not in _NEUTRAL.get(name, ())


def _json_response(content: dict[str, Any], headers: dict[str, str], status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json", headers=headers)


def error_response(err: OpenAIError, headers: dict[str, str] | None = None) -> Response:
    return _json_response(err.body(), {**(headers or {}), **err.headers}, err.status)


def client_error(err: UpstreamError) -> OpenAIError:
    """What the client sees of an expert failure: an upstream 4xx as the upstream said it, else the
    gateway's own message (never an exception's text) with code ``upstream_<kind>``."""
    if err.kind == "http_4xx" and err.body is not None:
        inner = err.body.get("error")
        obj: dict[str, Any] = inner if isinstance(inner, dict) else {}
        return OpenAIError(err.status, str(obj.get("message", err)), str(obj.get("type", "invalid_request_error")),
                           obj.get("param"), obj.get("code"))
    message = str(err)
    if err.kind == "internal":
        message += "; the request id (x-request-id) identifies it in the gateway's logs"
    code = "upstream_connect" if err.kind.startswith("connect") else f"upstream_{err.kind}"  # cause: in the message
    return OpenAIError(err.status, message, "timeout_error" if err.kind == "timeout" else "server_error", None, code)


class Pipeline:
    def __init__(self, config: GatewayConfig, routing: RoutingService, experts: dict[str, ExpertHandle],
                 cache: Cache, metrics: Metrics, shutdown: Shutdown) -> None:
        self.config = config
        self.shutdown = shutdown
        self.experts = experts
        self.metrics = metrics
        self.resolver = Resolver(config, routing, experts, metrics)
        self.answers = AnswerCache(config.cache, cache, metrics)
        self.guards = Guards(config, experts, metrics)
        self.fusion_hooks = FusionHooks(on_step=self._on_fusion_step, on_drop=self._on_fusion_drop)

    async def detect_fusion(self, timeout_s: float = 10.0) -> None:
        await self.resolver.detect_fusion(timeout_s)

    def model_names(self) -> list[str]:
        return self.resolver.model_names()

    def _on_fusion_step(self, mode: str, seconds: float) -> None:
        self.metrics.fusion_steps.labels(mode).inc()
        self.metrics.fusion_step_seconds.observe(seconds)

    def _on_fusion_drop(self, name: str, err: UpstreamError) -> None:
        self.experts[name].failed(err)

    # -- entry point ----------------------------------------------------------------------------
    async def serve(self, call: Call) -> Response:
        headers = {"x-request-id": call.request_id}
        call.headers = headers
        expert_label = "none"
        status = 500
        try:
            route = await self.resolver.resolve(call)
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
        endpoint = call.label or call.endpoint
        self.metrics.requests.labels(expert, call.model, endpoint, str(status)).inc()
        self.metrics.request_seconds.labels(expert, endpoint).observe(elapsed)
        log.info("request", extra={"request_id": call.request_id, "key_id": key_id(call.api_key),
                                   "model": call.model, "expert": expert, "status": status,
                                   "stream": call.stream, "ms": round(elapsed * 1000, 2),
                                   "cache": call.headers.get("x-octoroute-cache")})

    def _count_tokens(self, expert: str, usage: dict[str, Any] | None) -> None:
        if usage:
            self.metrics.tokens.labels(expert, "prompt").inc(usage.get("prompt_tokens") or 0)
            self.metrics.tokens.labels(expert, "completion").inc(usage.get("completion_tokens") or 0)

    # -- answering ------------------------------------------------------------------------------
    async def _cached(self, call: Call, key: str | None, expert: str) -> Response | None:
        """The cached answer as this request's response (new id, current time), or None to ask the expert."""
        lookup, cached = await self.answers.lookup(call.endpoint, key)
        call.headers["x-octoroute-cache"] = lookup
        if cached is None:
            return None
        if call.stream:
            self._finish(call, expert, 200)
            # The whole SSE stream in one body: a complete, well-formed stream at the cost of one write.
            return Response(replay_stream(call.endpoint, cached, call.include_usage), media_type="text/event-stream",
                            headers={**call.headers, **SSE_HEADERS})
        return _json_response(replay_json(call.endpoint, cached), call.headers)

    def _upstream_body(self, call: Call, handle: ExpertHandle) -> dict[str, Any]:
        body = dict(call.body)
        body["model"] = handle.config.served_model
        if call.stream:
            body["stream_options"] = {"include_usage": True}  # token metrics; dropped if the client didn't ask
        return body

    async def _answer(self, call: Call, chosen: ExpertHandle) -> Response:
        key = self.answers.key(call.endpoint, call.body, call.api_key, chosen.name)
        cached = await self._cached(call, key, chosen.name)
        if cached is not None:
            return cached
        handle = self.guards.pick(chosen)
        attempts = [handle]
        fallback = self.guards.fallback_for(handle)
        if fallback is not None:
            attempts.append(fallback)
        last_error: UpstreamError | None = None
        for i, target in enumerate(attempts):
            if i and (target.saturated or not target.breaker.allow()):
                break
            if target is not chosen:
                call.headers["x-octoroute-expert"] = target.name
                call.headers["x-octoroute-fallback-from"] = chosen.name
            try:
                if call.stream:
                    return await self._stream(call, target, key if target is chosen else None)
                return await self._generate(call, target, key if target is chosen else None)
            except UpstreamError as err:
                last_error = err
                if not err.expert_fault or not err.before_first_byte:
                    break
                if i + 1 < len(attempts):
                    self.metrics.fallbacks.labels(target.name).inc()
                    log.warning("expert %s failed before the first byte (%s); falling back to %s",
                                target.name, err.kind, attempts[i + 1].name,
                                extra={"request_id": call.request_id})
        assert last_error is not None
        raise client_error(last_error)

    async def _generate(self, call: Call, handle: ExpertHandle, key: str | None) -> Response:
        handle.acquire()
        try:
            result = await unless_client_leaves(call.receive,
                                                handle.generate(call.endpoint, self._upstream_body(call, handle)))
        except UpstreamError as err:
            self.guards.failed(call.request_id, handle, err)
            raise
        except ClientGone:
            handle.breaker.release_probe()
            return Response(status_code=499)
        finally:
            handle.release()
        handle.breaker.record_success()
        self._count_tokens(handle.name, result.get("usage"))
        await self.answers.store(key, call.endpoint, result)
        return _json_response(result, call.headers)

    async def _stream(self, call: Call, handle: ExpertHandle, key: str | None) -> Response:
        """Prime the upstream stream (so errors before the first byte can fall back), then pass it on.
        A healthy first chunk is the expert's verdict: a half-open breaker closes here."""
        handle.acquire()
        upstream = handle.stream(call.endpoint, self._upstream_body(call, handle))
        try:
            # Watch the client while the expert is silent: one that leaves before the first token must
            # free the expert at once (cancelling the upstream call), not when the first token comes.
            first = await unless_client_leaves(call.receive, anext(upstream, None))
        except BaseException as exc:
            handle.release()
            await upstream.aclose()  # type: ignore[attr-defined]
            if isinstance(exc, UpstreamError):
                self.guards.failed(call.request_id, handle, exc)
                raise
            handle.breaker.release_probe()
            if isinstance(exc, ClientGone):
                return Response(status_code=499)
            raise
        handle.breaker.record_success()
        self.metrics.ttft_seconds.labels(handle.name).observe(time.perf_counter() - call.started)
        return self._event_stream(call, handle.name, upstream, first, key, handle.release,
                                  lambda err: self.guards.failed(call.request_id, handle, err))

    def _event_stream(self, call: Call, expert: str, upstream: AsyncIterator[dict[str, Any]],
                      first: dict[str, Any] | None, key: str | None, release: Callable[[], None],
                      on_failure: Callable[[UpstreamError], None]) -> EventStream:
        stalled: list[bool] = []
        body = self._relay(call, expert, upstream, first, key, release, on_failure, stalled)
        return EventStream(body, call.headers, self.config.server.slow_reader_s,
                           on_stalled=lambda: stalled.append(True))

    async def _relay(self, call: Call, expert: str, upstream: AsyncIterator[dict[str, Any]],
                     first: dict[str, Any] | None, key: str | None, release: Callable[[], None],
                     on_failure: Callable[[UpstreamError], None], stalled: list[bool]) -> AsyncIterator[bytes]:
        """Pass chunks on as SSE (what the client asked to see), end with ``[DONE]`` or an error event;
        then free the expert(s), count, and cache the complete answer."""
        assembler = Assembler(call.endpoint)
        status = 200
        completed = False
        try:
            chunk = first
            while chunk is not None:
                assembler.add(chunk)
                shown = visible(chunk, call.include_usage)
                if shown is not None:
                    yield sse(shown)
                chunk = await self.shutdown.before_deadline(anext(upstream, None))
            completed = True
            yield DONE
        except OpenAIError as err:  # the drain deadline passed
            status = err.status
            yield err.sse_event()
        except UpstreamError as err:
            status = err.status
            on_failure(err)
            yield client_error(err).sse_event()
        finally:
            if not completed and status == 200:
                status = 499  # the client went away, or stopped reading
                if stalled:
                    log.warning("client stopped reading for %ss; stream cut, expert slot freed",
                                self.config.server.slow_reader_s, extra={"request_id": call.request_id})
            await upstream.aclose()  # type: ignore[attr-defined]
            release()
            self._count_tokens(expert, assembler.usage)
            self._finish(call, expert, status)
        if completed and assembler.cacheable and assembler.complete:
            await self.answers.store(key, call.endpoint, assembler.response())

    # -- fusion ---------------------------------------------------------------------------------
    async def _answer_fused(self, call: Call, members: tuple[tuple[ExpertHandle, float], ...]) -> Response:
        """Fuse the members' next-token distributions at every step; streams like a single expert."""
        names = [h.name for h, _ in members]
        key = self.answers.key(call.endpoint, call.body, call.api_key,
                               f"fusion[{self.config.fusion.mode}]:" + "+".join(names))
        cached = await self._cached(call, key, "fusion")
        if cached is not None:
            return cached
        for handle, _ in members:
            self.guards.refuse_if_saturated(handle)
        body = {**call.body, "model": "fusion"}
        if not any(k in body for k in ("max_tokens", "max_completion_tokens")):
            body["max_tokens"] = FUSION_DEFAULT_MAX_TOKENS
        bases = self.resolver.bases()
        fused = fused_stream([(h.expert, w) for h, w in members], call.endpoint, body, config=self.config.fusion,
                             hooks=self.fusion_hooks, bases=(bases[0].expert, bases[1].expert) if bases else None)
        # the members' tightest time limits bound the fused answer, as each bounds its own
        limits = TimeoutConfig(**{f: min(getattr(h.config.timeouts, f) for h, _ in members)
                                  for f in TimeoutConfig.model_fields})
        chunks = bounded_stream(_standard(fused), limits, "fusion")
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
            first = await unless_client_leaves(call.receive, anext(chunks))
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
            raise client_error(err) from None
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
                raise client_error(err) from None
            finally:
                release()
            result = assembler.response()
            self._count_tokens("fusion", assembler.usage)
            if assembler.complete:
                await self.answers.store(key, call.endpoint, result)
            return _json_response(result, call.headers)
        return self._event_stream(call, "fusion", chunks, first, key, release, lambda err: None)


async def _standard(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """Fused chunks without the decoder's own ``octoroute_fusion`` bookkeeping key: only fields of the
    OpenAI API reach the client (which experts were fused is in the ``x-octoroute-fused`` header)."""
    try:
        async for chunk in chunks:
            chunk.pop("octoroute_fusion", None)
            yield chunk
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


def new_request_id(incoming: str | None) -> str:
    if incoming and len(incoming) <= 128 and incoming.isascii() and incoming.isprintable():
        return incoming
    return uuid.uuid4().hex
