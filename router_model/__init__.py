"""Octoroute's router: an Octopus-style functional-token model, and the interface the gateway uses."""

from pathlib import Path

from router_model.interface import Message, Router, RouteResult, select_experts
from router_model.keyword import KeywordRouter

CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"


def load_router(path: str | None, threads: int) -> Router:
    """The functional-token router from ``path`` (None: the bundled ``router_model/checkpoint``).

    torch is imported here, not at package import, so the keyword fallback works without it.
    """
    from router_model.router import FunctionalTokenRouter

    return FunctionalTokenRouter.load(path or CHECKPOINT, threads=threads)


__all__ = ["CHECKPOINT", "KeywordRouter", "Message", "RouteResult", "Router", "load_router", "select_experts"]
