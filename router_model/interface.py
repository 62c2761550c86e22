"""What the gateway needs from a router, and nothing more.

A router turns a conversation into a probability per label (one label per expert domain).
The gateway never sees tensors: it calls ``route_batch`` from a worker thread and gets plain objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Message:
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str


@dataclass(frozen=True, slots=True)
class RouteResult:
    probs: dict[str, float]  # label -> calibrated probability; sums to 1
    rewrite: str | None = None  # the query rewritten for the top label, when the model emits one
    extras: dict[str, float] = field(default_factory=dict)  # e.g. {"forward_ms": 1.7}

    @property
    def top(self) -> tuple[str, float]:
        label = max(self.probs, key=self.probs.__getitem__)
        return label, self.probs[label]


class Router(Protocol):
    """Implemented by ``FunctionalTokenRouter`` (the model) and ``KeywordRouter`` (the fallback)."""

    labels: tuple[str, ...]
    tau: float  # single-expert threshold, calibrated on dev
    mass: float  # cumulative mass for an expert set, calibrated on dev

    def route_batch(self, conversations: Sequence[Sequence[Message]]) -> list[RouteResult]:
        """Route several conversations in one call. Must be thread-safe."""
        ...


def select_experts(probs: dict[str, float], tau: float, mass: float) -> list[str]:
    """One label when the top probability reaches ``tau``; else the smallest set whose mass reaches ``mass``.

    The set rule is the dynamic top-p of "Harder Tasks Need More Experts" (2024): confident
    inputs use one expert, uncertain ones several.
    """
    ranked = sorted(probs.items(), key=lambda kv: kv[1], reverse=True)
    if not ranked:
        return []
    if ranked[0][1] >= tau:
        return [ranked[0][0]]
    chosen: list[str] = []
    total = 0.0
    for label, p in ranked:
        chosen.append(label)
        total += p
        if total >= mass:
            break
    return chosen
