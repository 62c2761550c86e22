"""Talking to the client while an expert works: SSE framing, hang-ups, and clients that stop reading.

A request holds one of its expert's ``max_concurrency`` slots until its answer is written, so a
client must not be able to hold a slot by never reading: a stream whose next chunk the client has
not taken within ``server.slow_reader_s`` (its TCP buffers and the server's write buffer full) is cut,
which closes the upstream call and frees the slot. A client that hangs up before the first token
cancels the expert call at once (``unless_client_leaves``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Send

log = logging.getLogger("octoroute.request")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


def sse(chunk: dict[str, Any]) -> bytes:
    """One chunk as an SSE event."""
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def visible(chunk: dict[str, Any], include_usage: bool) -> dict[str, Any] | None:
    """What the client sees of an upstream chunk. The gateway always asks experts for usage (token
    metrics); a client that did not ask gets neither the usage chunk nor ``usage`` keys on the others."""
    if include_usage:
        return chunk
    if not chunk.get("choices"):
        return None
    if "usage" in chunk:
        chunk = {k: v for k, v in chunk.items() if k != "usage"}
    return chunk


async def unless_client_leaves(receive: Receive | None, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it (and so the upstream request) if the client disconnects first."""
    if receive is None:
        return await work
    channel = receive

    async def hang_up() -> None:
        while (await channel())["type"] != "http.disconnect":
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


class EventStream(StreamingResponse):
    """An SSE response whose every write must complete within ``slow_reader_s``.

    Past it the body iterator is closed (its ``finally`` frees the expert slot and closes the upstream
    call), ``on_stalled`` is called, and the response ends unfinished, so the server closes the connection.
    """

    def __init__(self, content: AsyncIterator[bytes], headers: dict[str, str], slow_reader_s: float,
                 on_stalled: Callable[[], None] | None = None) -> None:
        super().__init__(content, media_type="text/event-stream", headers={**headers, **SSE_HEADERS})
        self.slow_reader_s = slow_reader_s
        self.on_stalled = on_stalled
        self._chunks = content

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self._chunks:
            try:
                async with asyncio.timeout(self.slow_reader_s):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except TimeoutError:
                if self.on_stalled is not None:
                    self.on_stalled()
                await self._chunks.aclose()  # type: ignore[attr-defined]
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
