"""The time limits of one expert call (``ExpertConfig.timeouts``), the same for every backend.

Each configured number is a real bound, measured from the moment the gateway starts the call:

- ``first_byte_s``: the first chunk (a stream) or the response headers (vllm, non-streamed) arrive
  within it, *all retries included*: connect, retries' back-off and the upstream's queueing share it.
- ``idle_s``: at most this long between two chunks. Only chunks count: SSE comments and keep-alive
  events are no progress (the SSE parser yields nothing for them).
- ``total_s``: the whole answer, streamed or not, ends within it; a stream past it ends with an SSE
  error event (``upstream_timeout``), a non-streamed request with a 504.

A fallback expert starts its own clock, so the worst case before the first byte reaches the client is
``first_byte_s`` (chosen expert) + ``first_byte_s`` (fallback). Errors: ``UpstreamError("timeout", ..., 504)``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from gateway.config import TimeoutConfig
from gateway.experts.base import JSON, UpstreamError


async def bounded_stream(chunks: AsyncIterator[JSON], timeouts: TimeoutConfig, name: str) -> AsyncIterator[JSON]:
    """``chunks`` with the first-chunk, idle and total deadlines applied; closes ``chunks`` when done."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeouts.total_s
    first = True
    try:
        while True:
            gap = timeouts.first_byte_s if first else timeouts.idle_s
            deadline = min(loop.time() + gap, end)
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if deadline >= end:
                    why = f"did not finish within {timeouts.total_s:g}s (timeouts.total_s)"
                elif first:
                    why = f"sent no first token within {timeouts.first_byte_s:g}s (timeouts.first_byte_s)"
                else:
                    why = f"sent no next chunk within {timeouts.idle_s:g}s (timeouts.idle_s)"
                raise UpstreamError("timeout", f"expert {name} {why}", 504, before_first_byte=first) from None
            first = False
            yield chunk
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


def total_timeout(timeouts: TimeoutConfig, name: str) -> UpstreamError:
    return UpstreamError("timeout", f"expert {name} did not finish within {timeouts.total_s:g}s "
                         "(timeouts.total_s)", 504)
