"""Experts and the per-expert guards around them (concurrency limit, circuit breaker, time limits)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from gateway.breaker import CircuitBreaker
from gateway.config import ExpertConfig
from gateway.experts.base import JSON, Endpoint, Expert, UpstreamError
from gateway.experts.deadlines import bounded_stream, total_timeout
from gateway.metrics import Metrics

__all__ = ["Endpoint", "Expert", "ExpertHandle", "UpstreamError", "build_expert"]


def build_expert(config: ExpertConfig) -> Expert:
    if config.backend == "vllm":
        from gateway.experts.vllm import VllmExpert

        return VllmExpert(config)
    from gateway.experts.local import LocalExpert  # torch is only imported when a local expert exists

    return LocalExpert(config)


def _internal(name: str, exc: Exception, before_first_byte: bool = True) -> UpstreamError:
    """Any exception an expert did not turn into an UpstreamError itself: a generic message for the
    client (its text, e.g. a torch error, is logged with the request id via ``__cause__``)."""
    err = UpstreamError("internal", f"expert {name} failed on this request", 500,
                        before_first_byte=before_first_byte)
    err.__cause__ = exc
    return err


async def _no_bare_exceptions(chunks: AsyncIterator[JSON], name: str) -> AsyncIterator[JSON]:
    first = True
    try:
        async for chunk in chunks:
            first = False
            yield chunk
    except UpstreamError:
        raise
    except Exception as exc:
        raise _internal(name, exc, first) from exc
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


@dataclass
class ExpertHandle:
    """An expert plus what the gateway tracks about it: in-flight count (and its gauge), breaker, and the
    calls themselves with their time limits (``gateway.experts.deadlines``) and failure accounting."""

    expert: Expert
    config: ExpertConfig
    breaker: CircuitBreaker
    in_flight_gauge: Gauge
    errors: Counter
    in_flight: int = field(default=0)

    @classmethod
    def create(cls, expert: Expert, config: ExpertConfig, metrics: Metrics) -> ExpertHandle:
        gauge = metrics.breaker_state.labels(config.name)
        breaker = CircuitBreaker(config.breaker.failure_threshold, config.breaker.reset_after_s,
                                 on_change=lambda is_open: gauge.set(1 if is_open else 0))
        return cls(expert=expert, config=config, breaker=breaker,
                   in_flight_gauge=metrics.in_flight.labels(config.name), errors=metrics.upstream_errors)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def saturated(self) -> bool:
        return self.in_flight >= self.config.max_concurrency

    def acquire(self) -> None:
        self.in_flight += 1
        self.in_flight_gauge.inc()

    def release(self) -> None:
        self.in_flight -= 1
        self.in_flight_gauge.dec()

    def stream(self, endpoint: Endpoint, body: JSON) -> AsyncIterator[JSON]:
        """The expert's chunks within its time limits; any failure is an UpstreamError."""
        return bounded_stream(_no_bare_exceptions(self.expert.stream(endpoint, body), self.name),
                              self.config.timeouts, self.name)

    async def generate(self, endpoint: Endpoint, body: JSON) -> JSON:
        """The non-streamed answer within ``total_s``; the breaker closes as soon as the expert answers."""
        try:
            async with asyncio.timeout(self.config.timeouts.total_s):
                return await self.expert.generate(endpoint, body, on_first_byte=self.breaker.record_success)
        except TimeoutError:
            raise total_timeout(self.config.timeouts, self.name) from None
        except UpstreamError:
            raise
        except Exception as exc:
            raise _internal(self.name, exc) from exc

    def failed(self, err: UpstreamError) -> None:
        """Count a failure; only a fault of the expert itself moves the breaker. A failure the request caused
        (an upstream 4xx, an in-process error) is no verdict either way: it neither opens the breaker nor
        resets its count of consecutive expert faults (bad requests in between must not keep a failing
        expert in service), and a half-open probe it ended lets the next request probe."""
        self.errors.labels(self.name, err.kind).inc()
        if err.expert_fault:
            self.breaker.record_failure()
        else:
            self.breaker.release_probe()
