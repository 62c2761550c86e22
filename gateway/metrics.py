"""Prometheus metrics. Every name starts with ``octoroute_``; the README documents each one.

One registry per app (not the global default), so several gateways can live in one test process.
No label takes a value the client chose freely (each new value is a new series, kept for the process's
life): the requested model name is counted as itself only when it names a model the gateway serves, else
as ``other``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OTHER = "other"  # the value a label takes for anything outside its allowed set
NO_MODEL = "-"  # refused before the body was read


class ClosedCounter(Counter):
    """A counter whose bounded labels take values from a fixed set; any other value is counted as ``other``."""

    allowed: dict[int, frozenset[str]]  # label position -> allowed values

    def labels(self, *values: Any, **kwargs: Any) -> Any:
        if kwargs:  # by name: same rule
            values, kwargs = tuple(kwargs[name] for name in self._labelnames), {}
        allowed = getattr(self, "allowed", {})
        values = tuple(v if i not in allowed or v in allowed[i] else OTHER for i, v in enumerate(values))
        return super().labels(*values, **kwargs)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = ClosedCounter(
            "octoroute_requests", "Requests answered, by expert, requested model, endpoint and HTTP status.",
            ["expert", "model", "endpoint", "status"], registry=r)
        self.set_models(())
        self.request_seconds = Histogram(
            "octoroute_request_seconds", "Total request time, by expert and endpoint.",
            ["expert", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.routing_seconds = Histogram(
            "octoroute_routing_seconds", "Time to decide the expert (router forward pass, queueing included).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.ttft_seconds = Histogram(
            "octoroute_time_to_first_token_seconds", "Time to the first streamed chunk, by expert.",
            ["expert"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter(
            "octoroute_tokens", "Tokens by expert and direction (prompt | completion).",
            ["expert", "direction"], registry=r)
        self.cache = Counter(
            "octoroute_cache", "Cache lookups by result (hit | miss | bypass | error | store).",
            ["result"], registry=r)
        self.upstream_errors = Counter(
            "octoroute_upstream_errors", "Expert failures by expert and kind (connect, timeout, http_5xx, ...).",
            ["expert", "kind"], registry=r)
        self.in_flight = Gauge(
            "octoroute_in_flight_requests", "Requests being served now, by expert.", ["expert"], registry=r)
        self.router_confidence = Histogram(
            "octoroute_router_confidence", "Top router probability per routed request.",
            buckets=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0), registry=r)
        self.route_decisions = Counter(
            "octoroute_route_decisions", "Routing outcomes by chosen expert and mode (single | fusion | pinned).",
            ["expert", "mode"], registry=r)
        self.breaker_state = Gauge(
            "octoroute_breaker_open", "1 while an expert's circuit breaker is open.", ["expert"], registry=r)
        self.fallbacks = Counter(
            "octoroute_fallbacks", "Requests answered by the fallback expert, by the expert that was down.",
            ["expert"], registry=r)
        self.rejected = Counter(
            "octoroute_rejected", "Requests refused before reaching an expert, by reason.",
            ["reason"], registry=r)
        self.fusion_steps = Counter(
            "octoroute_fusion_steps", "Fused decoding steps, by fusion mode.", ["mode"], registry=r)
        self.fusion_step_seconds = Histogram(
            "octoroute_fusion_step_seconds", "Time of one fused decoding step.", buckets=LATENCY_BUCKETS, registry=r)

    def set_models(self, names: Iterable[str]) -> None:
        """The model names counted as themselves (what /v1/models lists); other names count as ``other``."""
        self.requests.allowed = {1: frozenset({*names, NO_MODEL})}
