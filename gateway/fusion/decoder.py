"""Fused decoding: pick each next token from the experts' fused distribution and stream OpenAI chunks.

Two paths:

* one step per token (sampling, dlf, and any set with a ``local`` expert): every expert's top-k in
  parallel, then exact log-probs for the union in parallel (free for exact local rows), fuse, choose.
  Greedy weighted steps skip the second round trip when the top-k lists already prove the winner;
* greedy speculative fusion (weighted, temperature 0, every expert ``vllm``): every expert drafts the same
  number of greedy tokens from the same prefix, in parallel, one call each. While all drafts agree the token
  is every expert's argmax, hence the fused argmax: accepted with no further call (on CPU a drafted token
  costs ~1/5 of a round trip, so agreement runs decode at nearly plain speed). At the first disagreement the
  drafts' top-k rows (same prefix) decide the fused token (``_decide``: ``certain_winner`` or one exact
  round). If that token is the heaviest expert's own, its draft goes on: the others score the rest of it in
  one ``echo`` call each and tokens are accepted while provably the fused argmax. After a fully agreed
  round the experts are likely to keep agreeing, so rounds switch to that cheaper shape outright: the
  leader drafts alone (and drafts on ahead while the others score, betting on acceptance) and the others
  only score, a prefill instead of a decode; the first rejection switches back to joint drafts. Draft sizes
  adapt: times ``DRAFT_GROWTH`` after full acceptance (up to ``MAX_DRAFT``), twice the accepted run after a
  rejection (at least ``MIN_DRAFT``), so an early disagreement wastes little server time.
  Both paths pick the same greedy tokens: speculation only saves round trips.

An expert that fails or times out is dropped for the rest of the request (logged, reported through
``FusionHooks.on_drop``); when none remain, or a dlf base fails, ``UpstreamError`` ends the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np

from gateway.experts.base import JSON, Endpoint, UpstreamError
from gateway.fusion import math as fm
from gateway.fusion.sources import FusionInputError, LogprobSource, TopK, VllmSource

log = logging.getLogger("octoroute.fusion")
Mode = Literal["weighted", "dlf"]
T = TypeVar("T")
DEFAULT_MAX_TOKENS = {"chat": 512, "completions": 16}  # OpenAI's completions default; chat: a sane cap
MIN_DRAFT, MAX_DRAFT = 4, 128
DRAFT_GROWTH = 4  # draft size factor after a fully agreed round (agreement runs tend to be long)
# Top-k asked of verifiers: echo scoring returns it for every prompt position, so it is kept small; a
# tighter bound only matters when experts disagree, and then the exact step decides anyway.
SCORE_K = 2
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias", "logprobs",
               "top_logprobs", "echo", "suffix", "frequency_penalty", "presence_penalty")


@dataclass
class FusionHooks:
    """Callbacks into the gateway's metrics, so fusion does not import the app."""

    on_step: Callable[[str, float], None] | None = None  # (mode, seconds) once per fused token
    on_drop: Callable[[str, UpstreamError], None] | None = None  # (expert name, error)


@dataclass(eq=False)
class Member:
    source: LogprobSource
    weight: float


@dataclass
class Params:
    """The decoding knobs of one request, read from its OpenAI body."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    @classmethod
    def from_body(cls, endpoint: Endpoint, body: JSON) -> Params:
        bad = [f for f in UNSUPPORTED if body.get(f) not in (None, False, 0, [], {})]
        if bad:
            raise FusionInputError(f"fusion cannot honour {', '.join(bad)}; remove it or pin one expert", bad[0])
        if (body.get("n") or 1) != 1 or (body.get("best_of") or 1) != 1:
            raise FusionInputError("fusion returns one choice; n and best_of must be 1", "n")
        stop = body.get("stop") or []
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS[endpoint]
        temperature = body.get("temperature")
        top_p = body.get("top_p")
        return cls(max_tokens=int(max_tokens), temperature=1.0 if temperature is None else float(temperature),
                   top_p=1.0 if top_p is None else float(top_p), seed=body.get("seed"),
                   stop=[stop] if isinstance(stop, str) else [s for s in stop if s])


def unfusable_request(endpoint: Endpoint, body: JSON) -> str | None:
    """Why fusion cannot serve this request body (a field it cannot honour), or None if it can."""
    try:
        Params.from_body(endpoint, body)
    except FusionInputError as exc:
        return str(exc)
    return None


class FusedDecoder:
    """Decodes one request from several experts' fused next-token distributions."""

    def __init__(self, members: Sequence[tuple[LogprobSource, float]], *, mode: Mode = "weighted", top_k: int = 20,
                 bases: tuple[LogprobSource, LogprobSource] | None = None, hooks: FusionHooks | None = None,
                 draft_tokens: int = MIN_DRAFT) -> None:
        """``draft_tokens`` = 0 turns greedy speculation off (one fused step per token)."""
        if not members:
            raise ValueError("fusion needs at least one expert")
        if mode == "dlf" and bases is None:
            raise ValueError("dlf needs the large and small base experts")
        self.members = [Member(s, w) for s, w in members]
        self.bases = [Member(b, 0.0) for b in bases] if mode == "dlf" and bases else []
        self.mode = mode
        self.top_k = top_k
        self.hooks = hooks or FusionHooks()
        self.draft_tokens = draft_tokens
        self._draft = draft_tokens  # adapts to the agreement runs seen so far (module docstring)
        self._agreeing = False  # after a fully agreed joint round: leader rounds until a draft is rejected
        # The leader's next draft, started while the current one is verified: (ids, leader, size, task).
        self._ahead: tuple[list[int], Member, int, asyncio.Future[tuple[list[int], list[TopK]]]] | None = None
        self.dropped: list[str] = []
        self.rng = np.random.default_rng()

    @property
    def fused(self) -> list[str]:
        return [m.source.name for m in self.members]

    # -- failure handling ---------------------------------------------------------------------------
    def _drop(self, member: Member, err: UpstreamError) -> None:
        log.warning("fusion: dropping expert %s for the rest of the request (%s: %s)", member.source.name,
                    err.kind, err)
        self.dropped.append(member.source.name)
        if member in self.bases:
            raise UpstreamError(err.kind, f"dlf base expert {member.source.name} failed: {err}", err.status,
                                before_first_byte=False)
        self.members.remove(member)
        if self.hooks.on_drop:
            self.hooks.on_drop(member.source.name, err)
        if not self.members:
            raise UpstreamError(err.kind, f"every fused expert failed; last: {err}", err.status,
                                before_first_byte=False)

    async def _gather(self, members: Sequence[Member], call: Callable[[Member], Awaitable[T]]) -> dict[Member, T]:
        """Run ``call`` for each member in parallel; drop the ones that fail; results of the others."""
        members = list(members)  # a failure removes its member from self.members below
        results = await asyncio.gather(*(call(m) for m in members), return_exceptions=True)
        out: dict[Member, T] = {}
        for member, result in zip(members, results, strict=True):
            if isinstance(result, UpstreamError):
                self._drop(member, result)
            elif isinstance(result, BaseException):
                self._drop(member, UpstreamError("internal", f"{type(result).__name__}: {result}", 502))
            else:
                out[member] = result
        return out

    # -- one fused step -----------------------------------------------------------------------------
    @property
    def _everyone(self) -> list[Member]:
        return [*self.bases, *self.members]

    async def _exact_rows(self, ids: list[int], rows: dict[Member, TopK]) -> tuple[list[Member], np.ndarray,
                                                                                    np.ndarray | None]:
        """Exact log-prob rows over the full vocabulary (all exact) or the union of top-k ids (cand)."""
        if all(r.full is not None for r in rows.values()):
            full = {m: r.full for m, r in rows.items() if r.full is not None}
            width = min(len(f) for f in full.values())  # padded embedding rows no tokenizer emits
            return list(full), np.stack([f[:width] for f in full.values()]), None
        cand = np.array(sorted({i for r in rows.values() for i in r.ids}), dtype=np.int64)

        async def fetch(m: Member) -> np.ndarray:
            row = rows[m]
            if row.full is not None:
                return row.full[cand]
            values = await m.source.exact(ids, cand.tolist())
            if np.isnan(values).any():  # the server cannot name ids: impute the tail from its top-k
                values = np.where(np.isnan(values), fm.impute(row.ids, row.lps, cand.tolist(),
                                                              m.source.vocab_size), values)
            return values

        exact = await self._gather([m for m in rows if m in self._everyone], fetch)
        members = list(exact)
        return members, np.stack([exact[m] for m in members]), cand

    def _fuse(self, members: list[Member], lps: np.ndarray, with_rest: bool) -> np.ndarray:
        if self.mode == "weighted":
            return fm.weighted_fuse(lps, [m.weight for m in members])
        rows = fm.with_rest_bucket(lps) if with_rest else lps
        index = {m: i for i, m in enumerate(members)}
        large, small = (rows[index[b]] for b in self.bases)
        experts = np.stack([rows[index[m]] for m in members if m not in self.bases])
        choice = fm.dlf_fuse(large, small, experts)
        return choice.fused[:-1] if with_rest else choice.fused

    async def _decide(self, ids: list[int], rows: dict[Member, TopK], params: Params) -> int:
        if self.mode == "weighted" and params.temperature <= 0 and any(r.full is None for r in rows.values()):
            token = self._certified(list(rows.items()))
            if token is not None:  # the top-k lists already prove the greedy choice: no exact round trip
                return token
        members, lps, cand = await self._exact_rows(ids, rows)
        if not any(m in self.members for m in members):
            raise UpstreamError("internal", "no fused expert left", 502, before_first_byte=False)
        fused = self._fuse(members, lps, with_rest=cand is not None)
        index = fm.choose(fused, params.temperature, params.top_p, self.rng)
        return int(cand[index]) if cand is not None else index

    async def _step(self, ids: list[int], params: Params) -> list[int]:
        rows = await self._gather(self._everyone, lambda m: m.source.top(ids, self.top_k))
        return [await self._decide(ids, rows, params)]

    # -- greedy speculative fusion --------------------------------------------------------------------
    def _speculative(self, params: Params) -> bool:
        return (self.draft_tokens > 0 and self.mode == "weighted" and params.temperature <= 0 and len(self.members) > 1
                and all(isinstance(m.source, VllmSource) for m in self.members))

    def _certain(self, token: int, rows: list[tuple[Member, TopK]]) -> bool:
        cand = sorted({i for _, r in rows for i in r.ids} | {token})
        got = [[r.get(c) for c in cand] for _, r in rows]
        known = np.array([[v is not None for v in row] for row in got])
        if not known[:, cand.index(token)].all():
            return False
        lps = np.array([[v if v is not None else 0.0 for v in row] for row in got])
        bounds = np.array([r.bound for _, r in rows])
        return fm.certain_winner(lps, known, bounds, [m.weight for m, _ in rows], cand.index(token))

    def _certified(self, rows: list[tuple[Member, TopK]]) -> int | None:
        """The best candidate known exactly in every row, if ``certain_winner`` proves it the fused argmax."""
        common = set.intersection(*(set(r.ids) for _, r in rows))
        if not common:
            return None
        weights = fm.normalise_weights([m.weight for m, _ in rows])
        best = max(sorted(common),
                   key=lambda c: sum(w * (r.get(c) or 0.0) for w, (_, r) in zip(weights, rows, strict=True)))
        return best if self._certain(best, rows) else None

    async def _round(self, ids: list[int], params: Params, budget: int) -> list[int]:
        if self._agreeing:
            return await self._leader_round(ids, params, budget)
        return await self._joint_round(ids, params, budget)

    async def _joint_round(self, ids: list[int], params: Params, budget: int) -> list[int]:
        """Every expert drafts from ``ids``; the run on which all agree is accepted (module docstring)."""
        size = min(self._draft, budget)
        drafts = await self._gather(self.members, lambda m: _remote(m).draft(ids, size, self.top_k))
        members = list(drafts)
        agreed = min(len(tokens) for tokens, _ in drafts.values())
        if agreed == 0:
            return await self._step(ids, params)
        accepted: list[int] = []
        for j in range(agreed):
            column = {drafts[m][0][j] for m in members}
            if len(column) == 1:  # every expert's greedy choice, hence the fused argmax
                accepted.append(column.pop())
                continue
            choice = await self._decide([*ids, *accepted], {m: drafts[m][1][j] for m in members}, params)
            accepted.append(choice)
            leader = max(members, key=lambda m: m.weight)
            if choice == drafts[leader][0][j] and len(drafts[leader][0]) > j + 1:
                tail, tail_rows = drafts[leader][0][j + 1 :], drafts[leader][1][j + 1 :]
                accepted += (await self._verify([*ids, *accepted], leader, tail, tail_rows, params))[0]
            self._draft = self._size_after_rejection(len(accepted))
            return accepted
        if agreed == size:
            self._draft = self._grown()
            self._agreeing = True
        return accepted

    async def _leader_round(self, ids: list[int], params: Params, budget: int) -> list[int]:
        """While the experts agree: the leader drafts (and drafts on ahead), the others only verify."""
        leader = max(self.members, key=lambda m: m.weight)
        size = min(self._draft, budget)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and (ahead[0] != ids or ahead[1] is not leader or ahead[2] != size):
            ahead[3].cancel()
            ahead = None
        pending = ahead[3] if ahead else asyncio.ensure_future(_remote(leader).draft(ids, size, self.top_k))
        drafted = await self._gather([leader], lambda m: pending)
        if leader not in drafted:
            return []  # the leader was dropped; the next round drafts from another expert
        tokens, leader_rows = drafted[leader]
        next_size = min(self._grown(), budget - len(tokens))
        if len(tokens) == size and next_size > 0:  # bet that the draft is accepted: draft on now
            nxt = [*ids, *tokens]
            task = asyncio.ensure_future(_remote(leader).draft(nxt, next_size, self.top_k))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # never "exception not retrieved"
            self._ahead = (nxt, leader, next_size, task)
        accepted, complete = await self._verify(ids, leader, tokens, leader_rows, params)
        if not complete:
            self.cancel_lookahead()
            self._agreeing = False
            self._draft = self._size_after_rejection(len(accepted))
        elif len(tokens) == size:
            self._draft = self._grown()
        return accepted

    def _grown(self) -> int:
        """The next draft size after a fully accepted draft."""
        return min(self._draft * DRAFT_GROWTH, MAX_DRAFT)

    @staticmethod
    def _size_after_rejection(accepted: int) -> int:
        """Twice the run just accepted: an early disagreement keeps the next draft (and its waste) small."""
        return min(max(MIN_DRAFT, 2 * accepted), MAX_DRAFT)

    async def _verify(self, ids: list[int], leader: Member, tokens: list[int], leader_rows: list[TopK],
                      params: Params) -> tuple[list[int], bool]:
        """The leader's draft after ``ids``, scored by the others (one ``echo`` call each): accepted while
        provably the fused argmax, then the fused choice at the first token that is not. ``True`` when the
        whole draft was accepted."""
        others = [m for m in self.members if m is not leader]
        scored: dict[Member, list[TopK]] = await self._gather(
            others, lambda m: _remote(m).score(ids, tokens, SCORE_K))
        if leader not in self.members:
            return [], False
        accepted: list[int] = []
        for j, token in enumerate(tokens):
            rows = [(leader, leader_rows[j]), *((m, s[j]) for m, s in scored.items())]
            if not self._certain(token, rows):
                accepted.append(await self._decide([*ids, *accepted], dict(rows), params))
                return accepted, False
            accepted.append(token)
        return accepted, True

    def cancel_lookahead(self) -> None:
        """Drop the draft started ahead of verification (rejected draft, or the request ended)."""
        if self._ahead is not None:
            self._ahead[3].cancel()
            self._ahead = None

    async def next_tokens(self, ids: list[int], params: Params, budget: int) -> list[int]:
        """One or more next tokens (several when a speculative round accepts a draft)."""
        if self._speculative(params):
            return await self._round(ids, params, budget)
        return await self._step(ids, params)

    # -- the request ---------------------------------------------------------------------------------
    async def _first(self, call: Callable[[LogprobSource], Awaitable[T]]) -> T:
        """``call`` on the first expert that answers (tokenisation is shared: the fingerprints match)."""
        while True:
            member = self.members[0]
            got = await self._gather([member], lambda m: call(m.source))
            if member in got:
                return got[member]

    async def stream(self, endpoint: Endpoint, body: JSON) -> AsyncIterator[JSON]:
        """OpenAI chunk dicts (chat.completion.chunk or text_completion), then one usage chunk."""
        params = Params.from_body(endpoint, body)
        self.rng = np.random.default_rng(params.seed)
        prompt = await self._first(lambda s: s.prompt_ids(endpoint, body))
        chunks = _Chunks(endpoint, str(body.get("model") or "fusion"))
        if endpoint == "chat":
            yield chunks.make({"role": "assistant", "content": ""})
        try:
            async for chunk in self._decode_loop(prompt, params, chunks):
                yield chunk
        finally:
            self.cancel_lookahead()

    async def _decode_loop(self, prompt: list[int], params: Params, chunks: _Chunks) -> AsyncIterator[JSON]:
        eos = set().union(*(m.source.eos_ids for m in self._everyone))
        generated: list[int] = []
        sent = ""
        hold = max((len(s) for s in params.stop), default=1) - 1
        finish: str | None = None
        eos_hit = False
        while finish is None:
            before = len(generated)
            started = time.perf_counter()
            try:
                new = await self.next_tokens([*prompt, *generated], params, params.max_tokens - len(generated))
            except UpstreamError as err:
                err.before_first_byte = False
                raise
            per_token = (time.perf_counter() - started) / max(len(new), 1)
            for token in new:
                if self.hooks.on_step:
                    self.hooks.on_step(self.mode, per_token)
                eos |= set().union(*(m.source.eos_ids for m in self._everyone))
                if token in eos:
                    finish, eos_hit = "stop", True
                    break
                generated.append(token)
                if len(generated) >= params.max_tokens:
                    finish = "length"
                    break
            text = await self._first(lambda s: s.decode(generated))
            cut = min((i for s in params.stop if (i := text.find(s, max(0, len(sent) - len(s)))) >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
                while len(generated) > before + 1:  # usage counts tokens up to the stop string only
                    shorter = await self._first(lambda src: src.decode(generated[:-1]))
                    if not any(s in shorter for s in params.stop):
                        break
                    generated.pop()
            safe = text if finish else text.rstrip("\ufffd")[: len(text) - hold if hold else None]
            if len(safe) > len(sent) and safe.startswith(sent):
                yield chunks.make(safe[len(sent):])
                sent = safe
        yield chunks.make(None, finish)
        yield chunks.usage(len(prompt), len(generated) + eos_hit, self.fused, self.dropped)


def _remote(member: Member) -> VllmSource:
    assert isinstance(member.source, VllmSource)
    return member.source


class _Chunks:
    """Builds the OpenAI streaming chunks of one response."""

    def __init__(self, endpoint: Endpoint, model: str) -> None:
        self.endpoint = endpoint
        self.model = model
        self.id = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-fusion-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _base(self, choices: list[JSON]) -> JSON:
        obj = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def make(self, content: str | dict[str, Any] | None, finish: str | None = None) -> JSON:
        if self.endpoint == "chat":
            delta = content if isinstance(content, dict) else ({} if content is None else {"content": content})
            return self._base([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
        text = "" if content is None or isinstance(content, dict) else content
        return self._base([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}])

    def usage(self, prompt: int, completion: int, fused: list[str], dropped: list[str]) -> JSON:
        chunk = self._base([])
        chunk["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}
        chunk["octoroute_fusion"] = {"experts": fused, "dropped": dropped}
        return chunk
