"""Which expert(s) answer a request: the router's choice, a pinned expert, or a fused set.

``model: "auto"`` routes on the conversation; ``model: "fusion"`` (offered when two experts share a
tokenizer) fuses the router's top experts; any other known name pins that expert. Errors: 404
``model_not_found`` for an unknown name.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from gateway.config import GatewayConfig
from gateway.errors import model_not_found
from gateway.experts import ExpertHandle
from gateway.fusion import fingerprints, unfusable_reason, unfusable_request
from gateway.metrics import Metrics
from gateway.routing import Decision, RoutingService

if TYPE_CHECKING:
    from gateway.serving import Call

log = logging.getLogger("octoroute.request")
Mode = Literal["single", "pinned", "fusion"]


@dataclass(frozen=True)
class Route:
    """Who answers: one expert (routed or pinned), or several fused at every decoding step."""

    handle: ExpertHandle  # the expert that answers, or the most probable of the fused set
    mode: Mode
    decision: Decision | None
    fused: tuple[tuple[ExpertHandle, float], ...] = ()  # (expert, router probability) when mode == "fusion"

    @property
    def handles(self) -> list[ExpertHandle]:
        return [h for h, _ in self.fused] if self.fused else [self.handle]


class Resolver:
    def __init__(self, config: GatewayConfig, routing: RoutingService, experts: dict[str, ExpertHandle],
                 metrics: Metrics) -> None:
        self.config = config
        self.routing = routing
        self.experts = experts
        self.metrics = metrics
        self.fusion_available = False  # set at start-up: do at least two experts share a tokenizer?
        self.vocabularies: dict[str, str | None] = {}  # expert -> tokenizer fingerprint (None: cannot fuse)

    async def detect_fusion(self, timeout_s: float = 10.0) -> None:
        """Fusion is offered (``model: "fusion"`` in /v1/models) when two experts share a vocabulary."""
        if not self.config.fusion.enabled:
            return
        try:
            async with asyncio.timeout(timeout_s):
                prints = await fingerprints([h.expert for h in self.experts.values()])
        except TimeoutError:
            log.warning("fusion: experts' vocabularies not readable within %.0fs; fusion stays off", timeout_s)
            return
        self.vocabularies = prints
        known = [p for p in prints.values() if p is not None]
        self.fusion_available = len(known) > len(set(known))

    def model_names(self) -> list[str]:
        return ["auto", *self.experts, *(["fusion"] if self.fusion_available else [])]

    async def resolve(self, call: Call) -> Route:
        if call.model in ("auto", "fusion") and (call.model == "auto" or self.fusion_available):
            if not call.messages:  # a token-id prompt carries no text to route on
                name = self.config.default_expert or next(iter(self.experts))
                return Route(self.experts[name], "single", None)
            decision = await self.routing.decide(call.messages)
            self.metrics.routing_seconds.observe(decision.route_ms / 1000)
            self.metrics.router_confidence.observe(decision.confidence)
            top = Route(self.experts[decision.experts[0]], "single", decision)
            explicit = call.model == "fusion"
            auto_fuse = len(decision.experts) > 1 and self.config.fusion.auto
            if self.fusion_available and (explicit or auto_fuse):
                refused = None if explicit else unfusable_request(call.endpoint, call.body)
                if refused is not None:  # the client did not ask for fusion: answer alone rather than fail
                    call.headers["x-octoroute-fusion-refused"] = refused[:200]
                    return top
                return self._fusion_route(call, decision, explicit) or top
            return top
        handle = self.experts.get(call.model)
        if handle is None:
            raise model_not_found(call.model, self.model_names())
        return Route(handle, "pinned", None)

    def _fusion_route(self, call: Call, decision: Decision, explicit: bool) -> Route | None:
        """The experts to fuse (most probable first, breakers not open), or None to answer from one expert.
        Only looks at the breakers (``is_open``): a half-open probe is granted where the call is made."""
        names = list(decision.experts)
        if explicit and len(names) < 2:  # the client asked for fusion: fuse at least the top two
            names = sorted(decision.probs, key=decision.probs.__getitem__, reverse=True)[:2]
        members = tuple((self.experts[n], decision.probs[n]) for n in names if not self.experts[n].breaker.is_open)
        if len(members) < 2:
            return None
        names = [h.name for h, _ in members] + [h.name for h in self.bases()]
        reason = unfusable_reason({n: self.vocabularies.get(n) for n in names})
        if reason is not None:
            log.warning("fusion refused: %s", reason, extra={"request_id": call.request_id})
            call.headers["x-octoroute-fusion-refused"] = reason[:200]
            return None
        return Route(members[0][0], "fusion", decision, members)

    def bases(self) -> list[ExpertHandle]:
        cfg = self.config.fusion
        if cfg.mode != "dlf" or not cfg.large_base or not cfg.small_base:
            return []
        return [self.experts[cfg.large_base], self.experts[cfg.small_base]]
