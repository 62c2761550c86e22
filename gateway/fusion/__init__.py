"""Per-token logit fusion of several experts (issue 4): the API the request pipeline calls.

At start-up::

    prints = await fingerprints(experts)          # tokenizer fingerprint per expert (None: cannot fuse); cached

Per request, once the router's policy (or ``model: "fusion"``) picked several experts with weights::

    reason = await check_fusable([e for e, _ in chosen])   # None = OK, else why (fall back to routing)
    async for chunk in fused_stream(chosen, endpoint, body, config=cfg.fusion, bases=..., hooks=...):
        ...  # OpenAI chunk dicts; the last one has "choices": [] and "usage" (drop it unless include_usage)
    response = await fused_generate(chosen, endpoint, body, config=cfg.fusion)   # non-streaming

``bases`` = (large, small) experts from ``FusionConfig.large_base``/``small_base``, required for dlf.
``unfusable_request(endpoint, body)`` says up front why a body cannot be fused (``n`` > 1, ``tools``, …).
Errors: ``FusionRefused`` (set cannot be fused: route instead), ``FusionInputError`` (a 400; ``.param``),
``UpstreamError`` (every expert failed, or a dlf base did: a clean OpenAI error; once chunks were
yielded it has ``before_first_byte=False``). ``hooks.on_step(mode, seconds)`` fits
``metrics.fusion_steps.labels(mode).inc()`` + ``metrics.fusion_step_seconds.observe(seconds)``;
``hooks.on_drop(name, err)`` fits ``metrics.upstream_errors.labels(name, err.kind).inc()``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from gateway.config import FusionConfig
from gateway.experts.base import JSON, Endpoint, Expert, UpstreamError
from gateway.fusion.decoder import FusedDecoder, FusionHooks, Mode, unfusable_request
from gateway.fusion.sources import FusionInputError, LogprobSource, source_for

__all__ = ["FusionHooks", "FusionInputError", "FusionRefused", "check_fusable", "fingerprints", "fused_generate",
           "fused_stream", "unfusable_reason", "unfusable_request"]


class FusionRefused(Exception):
    """These experts cannot be fused (backend or tokenizer mismatch); the message says why."""


async def _fingerprint(expert: Expert) -> str | None:
    source = source_for(expert)
    if source is None:
        return None
    try:
        return await source.fingerprint()
    except UpstreamError:
        return None


async def fingerprints(experts: Sequence[Expert]) -> dict[str, str | None]:
    """Tokenizer fingerprint per expert (None when it cannot take part or is unreachable); cached once known."""
    prints = await asyncio.gather(*(_fingerprint(e) for e in experts))
    return {e.name: p for e, p in zip(experts, prints, strict=True)}


def unfusable_reason(prints: dict[str, str | None]) -> str | None:
    """Why experts with these tokenizer fingerprints cannot be fused together, or None when they can."""
    if not prints:
        return "fusion needs at least one expert"
    missing = [name for name, p in prints.items() if p is None]
    if missing:
        return (f"fusion unavailable: cannot read the vocabulary of {', '.join(missing)} "
                "(backend without next-token log-probs, or expert unreachable)")
    groups: dict[str, list[str]] = {}
    for name, p in prints.items():
        groups.setdefault(str(p), []).append(name)
    if len(groups) > 1:
        sets = "; ".join(", ".join(names) for names in groups.values())
        return f"fusion refused: these experts use different tokenizers/vocabularies ({sets}); routing instead"
    return None


async def check_fusable(experts: Sequence[Expert]) -> str | None:
    """None when these experts can be fused, else a message for the client and the logs."""
    return unfusable_reason(await fingerprints(experts))


def _decoder(experts: Sequence[tuple[Expert, float]], config: FusionConfig, mode: Mode | None,
             bases: tuple[Expert, Expert] | None, hooks: FusionHooks | None) -> FusedDecoder:
    mode = mode or config.mode

    def source(expert: Expert) -> LogprobSource:
        s = source_for(expert)
        if s is None:
            raise FusionRefused(f"expert {expert.name} cannot take part in fusion")
        return s

    base_sources = (source(bases[0]), source(bases[1])) if mode == "dlf" and bases else None
    if mode == "dlf" and base_sources is None:
        raise FusionRefused("dlf fusion needs fusion.large_base and fusion.small_base")
    return FusedDecoder([(source(e), w) for e, w in experts], mode=mode, top_k=config.top_k,
                        bases=base_sources, hooks=hooks)


async def fused_stream(experts: Sequence[tuple[Expert, float]], endpoint: Endpoint, body: JSON, *,
                       config: FusionConfig, mode: Mode | None = None, bases: tuple[Expert, Expert] | None = None,
                       hooks: FusionHooks | None = None) -> AsyncIterator[JSON]:
    """Stream the fused answer as OpenAI chunk dicts; ``experts`` pairs each expert with its router weight."""
    everyone = [e for e, _ in experts] + (list(bases) if bases and (mode or config.mode) == "dlf" else [])
    reason = await check_fusable(everyone)
    if reason is not None:
        raise FusionRefused(reason)
    async for chunk in _decoder(experts, config, mode, bases, hooks).stream(endpoint, body):
        yield chunk


async def fused_generate(experts: Sequence[tuple[Expert, float]], endpoint: Endpoint, body: JSON, *,
                         config: FusionConfig, mode: Mode | None = None, bases: tuple[Expert, Expert] | None = None,
                         hooks: FusionHooks | None = None) -> JSON:
    """The non-streaming response (chat.completion or text_completion) assembled from ``fused_stream``."""
    parts: list[str] = []
    finish: str | None = None
    last: JSON = {}
    async for chunk in fused_stream(experts, endpoint, body, config=config, mode=mode, bases=bases, hooks=hooks):
        last = chunk
        for choice in chunk["choices"]:
            parts.append(choice["delta"].get("content") or "" if endpoint == "chat" else choice["text"])
            finish = choice["finish_reason"] or finish
    text = "".join(parts)
    answer: JSON = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish} if endpoint == "chat"
                    else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
    return {"id": last["id"], "object": "chat.completion" if endpoint == "chat" else "text_completion",
            "created": last["created"], "model": last["model"], "choices": [answer], "usage": last["usage"],
            "octoroute_fusion": last["octoroute_fusion"]}
