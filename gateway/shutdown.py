"""Graceful shutdown: requests still running at the drain deadline end with an error, not a cut connection.

uvicorn waits ``server.shutdown_grace_s`` for open connections, then cancels their tasks; by then nothing
can be sent, so a client would see a stream stop mid-answer with no reason (or a non-streamed request
lose its connection). The gateway therefore keeps its own deadline, a little before uvicorn's: at it,
every awaited upstream step is cancelled, streams send an SSE error event and close, non-streamed
requests answer 503, and uvicorn finds nothing left to cut.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable
from typing import TypeVar

import anyio

from gateway.errors import OpenAIError, overloaded

T = TypeVar("T")


def drain_seconds(grace_s: float) -> float:
    """Our deadline: 10% (at most 1 s) before uvicorn's, time enough to send the error events."""
    return grace_s - min(1.0, 0.1 * grace_s)


def shutting_down() -> OpenAIError:
    return overloaded("The gateway is shutting down and stopped this request; retry it (another replica, or "
                      "this one once restarted, will answer).", status=503)


class Shutdown:
    """``draining`` turns /ready to 503; ``before_deadline`` bounds each upstream wait by the drain deadline."""

    def __init__(self) -> None:
        self.draining = False
        self._deadline = math.inf  # event-loop time
        self._scopes: set[anyio.CancelScope] = set()

    def begin(self, grace_s: float) -> None:
        """Start draining. Call it on the event loop (a signal handler uses ``call_soon_threadsafe``)."""
        self.draining = True
        self._deadline = min(self._deadline, asyncio.get_running_loop().time() + drain_seconds(grace_s))
        for scope in self._scopes:
            scope.deadline = self._deadline  # an active scope past its new deadline is cancelled at once

    async def before_deadline(self, work: Awaitable[T]) -> T:
        """Await ``work``; if the drain deadline passes first, cancel it and raise the 503 error."""
        with anyio.CancelScope(deadline=self._deadline) as scope:
            self._scopes.add(scope)
            try:
                return await work
            finally:
                self._scopes.discard(scope)
        raise shutting_down()  # only reached when the scope swallowed its own (deadline) cancellation
