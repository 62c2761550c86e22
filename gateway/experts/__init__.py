"""Experts and the per-expert guards around them (concurrency limit, circuit breaker)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import Gauge

from gateway.breaker import CircuitBreaker
from gateway.config import ExpertConfig
from gateway.experts.base import Endpoint, Expert, UpstreamError
from gateway.metrics import Metrics

__all__ = ["Endpoint", "Expert", "ExpertHandle", "UpstreamError", "build_expert"]


def build_expert(config: ExpertConfig) -> Expert:
    if config.backend == "vllm":
        from gateway.experts.vllm import VllmExpert

        return VllmExpert(config)
    from gateway.experts.local import LocalExpert  # torch is only imported when a local expert exists

    return LocalExpert(config)


@dataclass
class ExpertHandle:
    """An expert plus what the gateway tracks about it: in-flight count (and its gauge), breaker."""

    expert: Expert
    config: ExpertConfig
    breaker: CircuitBreaker
    in_flight_gauge: Gauge
    in_flight: int = field(default=0)

    @classmethod
    def create(cls, expert: Expert, config: ExpertConfig, metrics: Metrics) -> ExpertHandle:
        gauge = metrics.breaker_state.labels(config.name)
        breaker = CircuitBreaker(config.breaker.failure_threshold, config.breaker.reset_after_s,
                                 on_change=lambda is_open: gauge.set(1 if is_open else 0))
        return cls(expert=expert, config=config, breaker=breaker,
                   in_flight_gauge=metrics.in_flight.labels(config.name))

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
