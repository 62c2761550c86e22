"""The production backend: any OpenAI-compatible server (vLLM), over one pooled ``httpx.AsyncClient``.

The client runs on aiohttp's connection pool (``httpx_aiohttp.AiohttpTransport``): with httpx's own
pool, 32 concurrent requests on a 2-core machine managed ~190 req/s; with this transport ~1,100
(same probe, same run). The httpx API, exceptions and timeouts stay the same.

Streams are parsed by ``httpx-sse`` (a maintained parser of the WHATWG HTML "event stream"
format: CRLF, CR or LF line ends, comments, ``data:`` with or without its space, multi-line data,
``event``/``id``/``retry`` fields), and every payload is validated by ``gateway.experts.wire``.
Comments and data-less events yield nothing, so they never count as progress for the idle timeout.

Time limits (``timeouts``): here only the response headers of a non-streamed request are bounded,
by ``first_byte_s`` across all retries; ``ExpertHandle`` bounds the first chunk, the gaps between
chunks and the whole answer for every backend (see ``gateway.experts.deadlines``). Retries only where
safe: connection failures (not DNS) and 5xx answers before any byte reached the client. A client that
leaves closes the generator, which closes the upstream stream.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import socket
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import httpx
import orjson
from httpx_aiohttp import AiohttpTransport
from httpx_sse import EventSource, SSEError

from gateway.config import ExpertConfig
from gateway.experts.base import JSON, Endpoint, Expert, UpstreamError
from gateway.experts.wire import parse_chunk, parse_response

PATHS: dict[Endpoint, str] = {"chat": "/chat/completions", "completions": "/completions"}
# What one upstream may make the gateway hold in memory: one SSE event (a chunk is a few KB), one
# non-streamed body (16 choices of long answers with top logprobs stay well under it).
MAX_EVENT_CHARS = 16 * 2**20
MAX_BODY_BYTES = 64 * 2**20


class _Oversized(Exception):
    """The upstream sent more than a bound allows in one piece."""


def _error_from_response(status: int, content: bytes) -> UpstreamError:
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        body = None
    message = content[:300].decode("utf-8", "replace")
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = str(body["error"].get("message", message))
    elif isinstance(body, dict) and "message" in body:
        message = str(body["message"])
    if status >= 500:
        return UpstreamError("http_5xx", f"expert answered {status}: {message}", 502)
    return UpstreamError("http_4xx", message, status, body=body if isinstance(body, dict) else None)


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def connect_failure(name: str, base_url: str, exc: BaseException, connect_s: float) -> UpstreamError:
    """Name the real cause of a failed connection. ``kind`` (a metric label, so a fixed set):
    ``connect_dns`` (host name does not resolve), ``connect_refused`` (nothing listens there),
    ``connect_timeout`` (no answer within ``connect_s``), ``connect`` (anything else: TLS, reset, ...)."""
    where = urlsplit(base_url).netloc or base_url
    chain = _causes(exc)
    if any(isinstance(e, socket.gaierror) for e in chain):
        return UpstreamError("connect_dns", f"cannot reach expert {name}: the host name in {where} does not "
                             "resolve (DNS); check base_url", 502)
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return UpstreamError("connect_refused", f"cannot reach expert {name}: connection refused by {where} "
                             "(is the server running on that port?)", 502)
    if any(isinstance(e, TimeoutError | httpx.TimeoutException) for e in chain):
        return UpstreamError("connect_timeout", f"cannot reach expert {name}: no connection to {where} within "
                             f"{connect_s:g}s (timeouts.connect_s)", 502)
    return UpstreamError("connect", f"cannot reach expert {name} at {where}: {type(chain[-1]).__name__}", 502)


class _Utf8Stream:
    """The part of an ``httpx.Response`` that ``httpx_sse.EventSource`` reads, decoded as the event-stream
    format requires whatever the headers say: UTF-8 (invalid bytes replaced), one leading BOM dropped."""

    def __init__(self, response: httpx.Response) -> None:
        self.headers = response.headers
        self._response = response
        self.pending = 0  # characters received since the consumer last took an event (it resets this)

    async def aiter_text(self) -> AsyncIterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        start = True
        async for raw in self._response.aiter_bytes():
            text = decoder.decode(raw)
            if start and text:
                text, start = text.removeprefix("\ufeff"), False
            self.pending += len(text)
            if self.pending > MAX_EVENT_CHARS:
                raise _Oversized(f"more than {MAX_EVENT_CHARS // 2**20} MiB without a complete event")
            if text:
                yield text
        if tail := decoder.decode(b"", final=True):
            yield tail


class VllmExpert(Expert):
    def __init__(self, config: ExpertConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.name = config.name
        self.served_model = config.served_model
        headers = {"Content-Type": "application/json"}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise ValueError(
                    f"expert {config.name!r}: environment variable {config.api_key_env} (api_key_env) is not set")
            headers["Authorization"] = f"Bearer {key}"
        t = config.timeouts
        limits = httpx.Limits(max_connections=config.max_concurrency + 4,
                              max_keepalive_connections=config.max_concurrency + 4)
        self.client = httpx.AsyncClient(
            base_url=config.base_url or "",
            headers=headers,
            # read: a backstop only; the deadlines in ExpertHandle are the tighter bounds
            timeout=httpx.Timeout(connect=t.connect_s, read=max(t.first_byte_s, t.idle_s), write=t.connect_s * 5,
                                  pool=t.connect_s),
            transport=transport or AiohttpTransport(limits=limits),
        )

    async def _send(self, endpoint: Endpoint, body: JSON) -> httpx.Response:
        """POST with retries on connection errors and 5xx; returns a 2xx response (body not yet read)."""
        content = orjson.dumps(body)
        last: UpstreamError | None = None
        for attempt in range(self.config.retries + 1):
            if attempt:
                await asyncio.sleep(min(0.05 * 2**attempt, 0.5))
            request = self.client.build_request("POST", PATHS[endpoint], content=content)
            try:
                response = await self.client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                last = connect_failure(self.name, self.config.base_url or "", exc, self.config.timeouts.connect_s)
                if last.kind == "connect_dns":
                    raise last from None
                continue
            except httpx.ReadTimeout:
                raise UpstreamError("timeout", f"expert {self.name} sent no response headers in time", 504) from None
            except httpx.HTTPError as exc:
                raise UpstreamError("protocol", f"expert {self.name}: {type(exc).__name__}", 502) from exc
            if response.status_code < 400:
                return response
            try:
                error_body = await response.aread()
            except httpx.HTTPError:
                error_body = b""
            finally:
                await response.aclose()
            last = _error_from_response(response.status_code, error_body)
            if not last.retryable:
                raise last
        assert last is not None
        raise last

    async def generate(self, endpoint: Endpoint, body: JSON, on_first_byte: Callable[[], None] | None = None) -> JSON:
        first_byte_s = self.config.timeouts.first_byte_s
        try:
            async with asyncio.timeout(first_byte_s):  # headers, all retries included
                response = await self._send(endpoint, body)
        except TimeoutError:
            raise UpstreamError("timeout", f"expert {self.name} sent no response within {first_byte_s:g}s "
                                "(timeouts.first_byte_s)", 504) from None
        if on_first_byte is not None:
            on_first_byte()
        content = bytearray()
        try:
            async for raw in response.aiter_bytes():
                content += raw
                if len(content) > MAX_BODY_BYTES:
                    raise UpstreamError("protocol", f"expert {self.name} sent a response larger than "
                                        f"{MAX_BODY_BYTES // 2**20} MiB", 502)
        except httpx.HTTPError as exc:
            raise UpstreamError("protocol", f"expert {self.name} broke off: {type(exc).__name__}", 502) from exc
        finally:
            await response.aclose()
        return parse_response(endpoint, self.name, bytes(content))

    async def stream(self, endpoint: Endpoint, body: JSON) -> AsyncIterator[JSON]:
        response = await self._send(endpoint, body)
        first = True
        source = _Utf8Stream(response)
        events = EventSource(source).aiter_sse()  # type: ignore[arg-type]
        try:
            try:
                async for event in events:
                    source.pending = 0
                    if not event.data or event.event != "message":
                        continue  # WHATWG: no data, no event; named events are not OpenAI chunks
                    if event.data == "[DONE]":
                        return
                    chunk = parse_chunk(endpoint, self.name, event.data, before_first_byte=first)
                    first = False
                    yield chunk
            except (SSEError, _Oversized) as exc:
                raise UpstreamError("protocol", f"expert {self.name}: {exc}", 502, before_first_byte=first) from None
            except httpx.HTTPError as exc:
                raise UpstreamError("protocol", f"expert {self.name} broke off mid-stream: {type(exc).__name__}",
                                    502, before_first_byte=first) from exc
            if first:
                raise UpstreamError("protocol", f"expert {self.name} closed the stream without data", 502)
            raise UpstreamError("protocol", f"expert {self.name} closed the stream before [DONE]", 502,
                                before_first_byte=False)
        finally:
            await events.aclose()
            await response.aclose()

    async def healthy(self) -> bool:
        return await self.health_problem() is None

    async def health_problem(self) -> str | None:
        """``GET /models`` within ``timeouts.connect_s``; a failure names its cause (DNS, refused, timeout)."""
        connect_s = self.config.timeouts.connect_s
        try:
            response = await self.client.get("/models", timeout=connect_s)
        except httpx.HTTPError as exc:
            return str(connect_failure(self.name, self.config.base_url or "", exc, connect_s))
        if response.status_code >= 500:
            return f"{self.config.base_url}/models answered {response.status_code}"
        return None

    async def aclose(self) -> None:
        await self.client.aclose()
