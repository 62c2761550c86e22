"""Which expert may take a request now: concurrency limits, circuit breakers and the fallback expert.

Errors: 429 ``rate_limit_exceeded`` when the expert is at ``max_concurrency`` (no queue without bound),
503 ``service_unavailable`` when its breaker is open and no fallback can answer; both with ``Retry-After``.
"""

from __future__ import annotations

import logging

from gateway.config import GatewayConfig
from gateway.errors import overloaded
from gateway.experts import ExpertHandle, UpstreamError
from gateway.metrics import Metrics

log = logging.getLogger("octoroute.request")


class Guards:
    def __init__(self, config: GatewayConfig, experts: dict[str, ExpertHandle], metrics: Metrics) -> None:
        self.config = config
        self.experts = experts
        self.metrics = metrics

    def pick(self, handle: ExpertHandle) -> ExpertHandle:
        """The expert that will really answer: the chosen one, or the fallback while it is open. A full
        expert is refused (429) before its breaker is asked, so a refused request never holds a probe."""
        self.refuse_if_saturated(handle)
        if handle.breaker.allow():
            return handle
        fallback = self.fallback_for(handle)
        if fallback is not None and not fallback.saturated and fallback.breaker.allow():
            self.metrics.fallbacks.labels(handle.name).inc()
            return fallback
        self.metrics.rejected.labels("breaker_open").inc()
        raise overloaded(f"expert {handle.name!r} is unavailable (circuit open); retry shortly",
                         retry_after_s=max(1, int(handle.config.breaker.reset_after_s)), status=503)

    def fallback_for(self, handle: ExpertHandle) -> ExpertHandle | None:
        name = self.config.fallback_expert
        if name is None or name == handle.name:
            return None
        return self.experts[name]

    def refuse_if_saturated(self, handle: ExpertHandle) -> None:
        """429 instead of queueing without bound."""
        if handle.saturated:
            self.metrics.rejected.labels("expert_saturated").inc()
            raise overloaded(f"expert {handle.name!r} is at its concurrency limit "
                             f"({handle.config.max_concurrency}); retry shortly")

    @staticmethod
    def failed(request_id: str, handle: ExpertHandle, err: UpstreamError) -> None:
        """Charge a failure (``ExpertHandle.failed``); an in-process one is logged with its cause and the
        request id, the only place its text goes."""
        handle.failed(err)
        if err.kind == "internal":
            log.error("expert %s failed on a request", handle.name, exc_info=err.__cause__ or err,
                      extra={"request_id": request_id})
