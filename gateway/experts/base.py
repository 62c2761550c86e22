"""The one interface every expert backend implements (``vllm`` over HTTP, ``local`` in-process).

Bodies are OpenAI wire JSON as plain dicts, already validated at the edge and with ``model`` set
to the expert's served model name. Streams yield one JSON chunk (bytes, no ``data: `` prefix,
no ``[DONE]``) per SSE event, so the gateway can pass them through untouched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any, Literal

Endpoint = Literal["chat", "completions"]
JSON = dict[str, Any]


class UpstreamError(Exception):
    """An expert failed. ``kind`` is the metric label; ``status`` is what the client should see."""

    def __init__(self, kind: str, message: str, status: int = 502, *, before_first_byte: bool = True,
                 body: JSON | None = None) -> None:
        super().__init__(message)
        self.kind = kind  # connect | timeout | http_5xx | http_4xx | protocol | overloaded | internal
        self.status = status
        self.before_first_byte = before_first_byte
        self.body = body  # an upstream 4xx error body to pass through verbatim

    @property
    def retryable(self) -> bool:
        return self.before_first_byte and self.kind in {"connect", "http_5xx"}


class Expert(ABC):
    """A model that answers OpenAI chat/completions requests."""

    name: str
    served_model: str
    # Request fields this backend cannot honour; the gateway refuses them with a 400 instead of dropping them.
    unsupported: frozenset[str] = frozenset()

    @abstractmethod
    async def generate(self, endpoint: Endpoint, body: JSON) -> JSON:
        """Non-streaming request; returns the OpenAI response object."""

    @abstractmethod
    def stream(self, endpoint: Endpoint, body: JSON) -> AsyncIterator[bytes]:
        """Streaming request; yields chunk JSON. Raises UpstreamError (before or mid-stream)."""

    @abstractmethod
    async def healthy(self) -> bool:
        """Cheap reachability check for /ready and half-open probes."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections / threads."""
