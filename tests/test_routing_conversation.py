"""What of a conversation reaches the router: the system prompt and ``router.history_turns`` earlier turns."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.config import GatewayConfig
from gateway.routing import RoutingService, bounded_conversation
from router_model import Message, RouteResult

CONV = [Message("system", "You answer questions about tenancy law."),
        Message("user", "Can my landlord keep my deposit?"), Message("assistant", "Usually not without cause."),
        Message("user", "What counts as cause?"), Message("assistant", "Damage beyond wear and tear."),
        Message("user", "And unpaid rent?"), Message("assistant", "Yes, in most states."),
        Message("tool", "{}"), Message("user", "explain step by step")]


def test_history_turns_is_honoured_and_the_system_prompt_kept() -> None:
    got = bounded_conversation(CONV, history_turns=4)
    assert got[0] == CONV[0]
    assert [m.content for m in got[1:]] == ["What counts as cause?", "Damage beyond wear and tear.",
                                            "And unpaid rent?", "Yes, in most states.", "explain step by step"]
    # The legal question five turns back is visible once history_turns reaches it.
    assert CONV[1] in bounded_conversation(CONV, history_turns=6)
    assert bounded_conversation(CONV, history_turns=0) == (CONV[0], CONV[-1])
    # Turns after the last user turn are not routed on.
    assert bounded_conversation([*CONV, Message("assistant", "…")], 4) == got


class Recording:
    labels = ("legal", "general")
    tau = 0.5
    mass = 0.9

    def __init__(self) -> None:
        self.seen: list[Sequence[Message]] = []

    def route_batch(self, conversations: Sequence[Sequence[Message]]) -> list[RouteResult]:
        self.seen += conversations
        return [RouteResult({"legal": 0.9, "general": 0.1}) for _ in conversations]


async def test_the_router_receives_what_history_turns_allows() -> None:
    router = Recording()
    config = GatewayConfig.model_validate({
        "router": {"history_turns": 6},
        "experts": [{"name": "legal", "backend": "vllm", "base_url": "http://127.0.0.1:9/v1"},
                    {"name": "general", "backend": "vllm", "base_url": "http://127.0.0.1:9/v1"}]})
    service = RoutingService(router, config)
    await service.start()
    try:
        decision = await service.decide(CONV)
    finally:
        await service.stop()
    assert decision.experts == ("legal",)
    assert list(router.seen[0]) == [CONV[0], *CONV[1:7], CONV[-1]]
