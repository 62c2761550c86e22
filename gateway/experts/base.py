"""The one interface every expert backend implements (``vllm`` over HTTP, ``local`` in-process).

Bodies are OpenAI wire JSON as plain dicts, already validated at the edge and with ``model`` set
to the expert's served model name. Streams yield one chunk object per SSE event (no ``[DONE]``),
already validated (``gateway.experts.wire``), so the gateway relays and caches them as they are.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

Endpoint = Literal["chat", "completions"]
JSON = dict[str, Any]


class UpstreamError(Exception):
    """An expert failed. ``kind`` is the metric label; ``status`` is what the client should see."""

    def __init__(self, kind: str, message: str, status: int = 502, *, before_first_byte: bool = True,
                 body: JSON | None = None) -> None:
        super().__init__(message)
        self.kind = kind  # a fixed set (a metric label): see EXPERT_FAULTS and CLIENT_FAULTS
        self.status = status
        self.before_first_byte = before_first_byte
        self.body = body  # an upstream 4xx error body to pass through verbatim

    @property
    def retryable(self) -> bool:
        """Worth another try on the same expert: it may answer next time (a DNS failure will not)."""
        return self.before_first_byte and self.kind in {"connect", "connect_refused", "connect_timeout", "http_5xx"}

    @property
    def expert_fault(self) -> bool:
        """Evidence that the expert is unhealthy (counts towards its breaker). Nothing the client controls
        is: an upstream 4xx judged the request, and an in-process failure (``internal``) came from this
        request's input, not from an expert that is down."""
        return self.kind in EXPERT_FAULTS


# Kinds that mean the expert is unreachable, slow or broken: they open the breaker and allow a fallback.
EXPERT_FAULTS = frozenset({"connect", "connect_dns", "connect_refused", "connect_timeout", "timeout", "http_5xx",
                           "protocol", "stream_error"})
# Kinds caused by the request itself: the client's answer, never a breaker failure.
CLIENT_FAULTS = frozenset({"http_4xx", "internal"})


class Expert(ABC):
    """A model that answers OpenAI chat/completions requests."""

    name: str
    served_model: str
    # Request fields this backend cannot honour; the gateway refuses them with a 400 instead of dropping them.
    unsupported: frozenset[str] = frozenset()

    @abstractmethod
    async def generate(self, endpoint: Endpoint, body: JSON, on_first_byte: Callable[[], None] | None = None) -> JSON:
        """Non-streaming request; returns the OpenAI response object. ``on_first_byte`` is called once the
        expert has shown it is answering (response headers; first token in-process): a half-open breaker
        closes then, not when a long answer ends."""

    @abstractmethod
    def stream(self, endpoint: Endpoint, body: JSON) -> AsyncIterator[JSON]:
        """Streaming request; yields chunk objects. Raises UpstreamError (before or mid-stream)."""

    @abstractmethod
    async def healthy(self) -> bool:
        """Cheap reachability check for /ready and half-open probes."""

    async def health_problem(self) -> str | None:
        """Why this expert cannot serve now (None when it can): what the start-up log says."""
        return None if await self.healthy() else "not responding"

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections / threads."""
