"""The production backend: any OpenAI-compatible server (vLLM), over one pooled ``httpx.AsyncClient``.

The client runs on aiohttp's connection pool (``httpx_aiohttp.AiohttpTransport``): with httpx's own
pool, 32 concurrent requests on a 2-core machine managed ~190 req/s; with this transport ~1,100
(same probe, same run). The httpx API, exceptions and timeouts stay the same.

Timeouts: connect, first byte (headers and the first streamed event), idle gap between events,
and a total deadline. Retries only where safe: connect errors and 5xx answers before any byte
reached the client. A client that leaves closes the generator, which closes the upstream stream.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from gateway.config import ExpertConfig
from gateway.experts.base import JSON, Endpoint, Expert, UpstreamError

PATHS: dict[Endpoint, str] = {"chat": "/chat/completions", "completions": "/completions"}


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


def split_sse(buffer: bytearray) -> list[bytes]:
    """Take complete ``data:`` payloads out of ``buffer`` (events end with a blank line)."""
    out: list[bytes] = []
    while True:
        end = buffer.find(b"\n\n")
        if end < 0:
            return out
        event = bytes(buffer[:end])
        del buffer[: end + 2]
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                out.append(line[5:].strip())


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
            timeout=httpx.Timeout(connect=t.connect_s, read=max(t.first_byte_s, t.idle_s), write=t.connect_s * 5,
                                  pool=t.connect_s),
            transport=transport or AiohttpTransport(limits=limits),
        )

    async def _send(self, endpoint: Endpoint, body: JSON) -> httpx.Response:
        """POST with retries on connect errors and 5xx; returns a 2xx response (stream not yet read)."""
        content = orjson.dumps(body)
        last: UpstreamError | None = None
        for attempt in range(self.config.retries + 1):
            if attempt:
                await asyncio.sleep(min(0.05 * 2**attempt, 0.5))
            request = self.client.build_request("POST", PATHS[endpoint], content=content)
            try:
                async with asyncio.timeout(self.config.timeouts.first_byte_s):
                    response = await self.client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                last = UpstreamError("connect", f"cannot reach expert {self.name}: {exc!r}", 502)
                continue
            except (TimeoutError, httpx.ReadTimeout):
                raise UpstreamError("timeout", f"expert {self.name} sent no response within "
                                    f"{self.config.timeouts.first_byte_s:g}s", 504) from None
            except httpx.HTTPError as exc:
                raise UpstreamError("protocol", f"expert {self.name}: {exc!r}", 502) from exc
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

    async def generate(self, endpoint: Endpoint, body: JSON) -> JSON:
        response = await self._send(endpoint, body)
        try:
            async with asyncio.timeout(self.config.timeouts.total_s):
                content = await response.aread()
        except (TimeoutError, httpx.ReadTimeout):
            raise UpstreamError("timeout", f"expert {self.name} did not finish in time", 504) from None
        except httpx.HTTPError as exc:
            raise UpstreamError("protocol", f"expert {self.name} broke off: {exc!r}", 502) from exc
        finally:
            await response.aclose()
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError as exc:
            raise UpstreamError("protocol", f"expert {self.name} sent invalid JSON", 502) from exc
        if not isinstance(data, dict):
            raise UpstreamError("protocol", f"expert {self.name} sent a non-object response", 502)
        return data

    async def stream(self, endpoint: Endpoint, body: JSON) -> AsyncIterator[bytes]:
        response = await self._send(endpoint, body)
        t = self.config.timeouts
        buffer = bytearray()
        first = True
        chunks = response.aiter_raw()
        try:
            while True:
                try:
                    async with asyncio.timeout(t.first_byte_s if first else t.idle_s):
                        raw = await anext(chunks)
                except StopAsyncIteration:
                    break
                except (TimeoutError, httpx.ReadTimeout):
                    gap = "first token" if first else "next chunk"
                    raise UpstreamError("timeout", f"expert {self.name}: no {gap} within "
                                        f"{t.first_byte_s if first else t.idle_s:g}s", 504,
                                        before_first_byte=first) from None
                except httpx.HTTPError as exc:
                    raise UpstreamError("protocol", f"expert {self.name} broke off mid-stream: {exc!r}", 502,
                                        before_first_byte=first) from exc
                buffer += raw
                for payload in split_sse(buffer):
                    if payload == b"[DONE]":
                        return
                    first = False
                    yield payload
            if first:
                raise UpstreamError("protocol", f"expert {self.name} closed the stream without data", 502)
            raise UpstreamError("protocol", f"expert {self.name} closed the stream before [DONE]", 502,
                                before_first_byte=False)
        finally:
            await response.aclose()

    async def healthy(self) -> bool:
        try:
            response = await self.client.get("/models", timeout=self.config.timeouts.connect_s)
        except httpx.HTTPError:
            return False
        return response.status_code < 500

    async def aclose(self) -> None:
        await self.client.aclose()
