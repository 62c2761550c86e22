"""Turning a conversation into a routing decision, without blocking the event loop.

What the router sees: the system prompt, then the last user turn plus up to ``router.history_turns``
earlier user/assistant turns; the router reads the latest turn from its start and the rest from the
right within its context budget, so the latest user turn is always kept. Concurrent requests are batched into one
forward pass, run on a dedicated thread; identical conversations reuse a cached decision.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from gateway.config import ConfigError, GatewayConfig
from router_model import Message, Router, RouteResult, select_experts

Conversation = tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class Decision:
    experts: tuple[str, ...]  # chosen experts, most probable first; more than one = fusion candidate
    probs: dict[str, float]  # per expert (labels an expert answers are summed)
    label_probs: dict[str, float]  # the router's raw per-label distribution
    rewrite: str | None
    route_ms: float
    cached: bool

    @property
    def confidence(self) -> float:
        return self.probs[self.experts[0]]


def bounded_conversation(messages: Sequence[Message], history_turns: int) -> Conversation:
    """The system prompt(s), then the last user turn and up to ``history_turns`` user/assistant turns before it.

    Tool messages and later turns are dropped: they say little about the domain and would only push the
    turns that do out of the router's context budget.
    """
    turns = [m for m in messages if m.role in ("user", "assistant")]
    last_user = max((i for i, m in enumerate(turns) if m.role == "user"), default=len(turns) - 1)
    system = [m for m in messages if m.role in ("system", "developer")]
    return (*system, *turns[max(0, last_user - history_turns) : last_user + 1])


class RoutingService:
    def __init__(self, router: Router, config: GatewayConfig) -> None:
        self.router = router
        self.tau = config.router.tau if config.router.tau is not None else router.tau
        self.mass = config.router.mass if config.router.mass is not None else router.mass
        self.history_turns = config.router.history_turns
        self.max_batch = config.router.max_batch
        self.label_to_expert = self.label_map(router, config)
        self._cache: OrderedDict[Conversation, RouteResult] = OrderedDict()
        self._cache_size = config.router.decision_cache_size
        self._queue: asyncio.Queue[tuple[Conversation, asyncio.Future[RouteResult]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router")

    @staticmethod
    def label_map(router: Router, config: GatewayConfig) -> dict[str, str]:
        """Router label -> expert name; raises ConfigError for a label nobody answers."""
        mapping: dict[str, str] = {}
        for expert in config.experts:
            for label in expert.route_labels:
                mapping.setdefault(label, expert.name)
        missing = [label for label in router.labels if label not in mapping]
        if missing and config.default_expert is None:
            raise ConfigError(
                f"router labels {missing} have no expert: name experts after them, list them in an expert's "
                f"`labels`, or set default_expert")
        for label in missing:
            mapping[label] = config.default_expert or ""
        return mapping

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run(), name="router-batcher")

    async def stop(self) -> None:
        if self._worker:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            conversations = [conv for conv, _ in batch]
            try:
                results = await loop.run_in_executor(self._executor, self.router.route_batch, conversations)
            except Exception as exc:  # a router bug must fail these requests, not the worker
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    async def _route(self, conversation: Conversation) -> tuple[RouteResult, bool]:
        cached = self._cache.get(conversation)
        if cached is not None:
            self._cache.move_to_end(conversation)
            return cached, True
        assert self._queue is not None, "RoutingService.start() was not called"
        fut: asyncio.Future[RouteResult] = asyncio.get_running_loop().create_future()
        await self._queue.put((conversation, fut))
        result = await fut
        if self._cache_size:
            self._cache[conversation] = result
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return result, False

    async def decide(self, messages: Sequence[Message]) -> Decision:
        started = time.perf_counter()
        result, cached = await self._route(bounded_conversation(messages, self.history_turns))
        probs: dict[str, float] = {}
        for label, p in result.probs.items():
            expert = self.label_to_expert[label]
            probs[expert] = probs.get(expert, 0.0) + p
        chosen = select_experts(probs, self.tau, self.mass)
        return Decision(tuple(chosen), probs, dict(result.probs), result.rewrite,
                        (time.perf_counter() - started) * 1000, cached)
