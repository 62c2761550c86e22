"""Greedy speculative fusion against toy "servers": same tokens as one fused step per token, fewer calls.

Each toy expert is a ``VllmSource`` whose calls (draft, score, top, exact) are answered from a small
deterministic model instead of HTTP, so the round logic can be checked call by call: where the experts
disagree (the first positions here) and where they agree (the rest), with top-k rows like vLLM's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest

from gateway.fusion.decoder import FusedDecoder, Params
from gateway.fusion.sources import TopK, VllmSource

VOCAB, PROMPT, DISAGREE = 64, [1, 2, 3], 3


class ToyServer(VllmSource):
    """Log-probs from a seeded hash of the prefix: experts differ for the first ``DISAGREE`` generated
    positions (each with its own preference), then share one sharply peaked distribution."""

    def __init__(self, name: str, seed: int) -> None:  # no HTTP client: every call is answered here
        self.name, self.seed, self.eos_ids, self.calls = name, seed, set(), Counter[str]()
        self._fingerprint = "toy"

    def row(self, ids: Sequence[int]) -> np.ndarray:
        shared = len(ids) - len(PROMPT) >= DISAGREE
        rng = np.random.default_rng([hash(tuple(ids)) & 0xFFFFFFFF, 0 if shared else self.seed])
        logits = rng.normal(size=VOCAB) * (6.0 if shared else 1.5)
        return logits - np.logaddexp.reduce(logits)

    def topk(self, ids: Sequence[int], k: int, extra: int | None = None) -> TopK:
        row = self.row(ids)
        best = [int(i) for i in np.argsort(-row, kind="stable")[:k]]
        keep = best + ([extra] if extra is not None and extra not in best else [])
        return TopK(keep, [float(row[i]) for i in keep], float(row[best[-1]]))

    async def draft(self, ids: Sequence[int], n: int, k: int) -> tuple[list[int], list[TopK]]:
        self.calls["draft"] += 1
        seq, rows = list(ids), []
        for _ in range(n):
            rows.append(self.topk(seq, k))
            seq.append(rows[-1].ids[0])
        return seq[len(ids) :], rows

    async def score(self, ids: Sequence[int], tail: Sequence[int], k: int) -> list[TopK]:
        self.calls["score"] += 1
        return [self.topk([*ids, *tail[:j]], k, extra=t) for j, t in enumerate(tail)]

    async def top(self, ids: Sequence[int], k: int) -> TopK:
        self.calls["top"] += 1
        return self.topk(ids, k)

    async def exact(self, ids: Sequence[int], candidates: Sequence[int]) -> np.ndarray:
        self.calls["exact"] += 1
        return self.row(ids)[np.asarray(candidates)]

    async def decode(self, ids: Sequence[int]) -> str:
        return " ".join(map(str, ids))

    @property
    def vocab_size(self) -> int:
        return VOCAB


def exact_greedy(weights: Sequence[float], n: int) -> list[int]:
    servers = [ToyServer(f"e{i}", 10 + i) for i in range(len(weights))]
    w = np.asarray(weights) / sum(weights)
    seq = list(PROMPT)
    for _ in range(n):
        seq.append(int(np.argmax(w @ np.stack([s.row(seq) for s in servers]))))
    return seq[len(PROMPT) :]


async def decode(weights: Sequence[float], n: int, draft_tokens: int) -> tuple[list[int], list[Counter[str]]]:
    servers = [ToyServer(f"e{i}", 10 + i) for i in range(len(weights))]
    decoder = FusedDecoder(list(zip(servers, weights, strict=True)), top_k=8, draft_tokens=draft_tokens)
    params, out = Params(max_tokens=n, temperature=0.0), []
    while len(out) < n:
        out += await decoder.next_tokens([*PROMPT, *out], params, n - len(out))
    decoder.cancel_lookahead()
    return out, [s.calls for s in servers]


@pytest.mark.parametrize("weights", [(0.6, 0.4), (0.5, 0.3, 0.2), (0.9, 0.1)])
async def test_speculation_picks_the_exact_greedy_tokens_with_few_calls(weights: tuple[float, ...]) -> None:
    want = exact_greedy(weights, 64)
    got, calls = await decode(weights, 64, draft_tokens=8)
    per_token, _ = await decode(weights, 64, draft_tokens=0)
    assert got == per_token == want
    # The agreed part (61 of 64 tokens) costs a handful of draft rounds, not a round trip per token.
    leader = calls[0]
    assert leader["draft"] + leader["top"] <= 12, leader
    assert all(c["score"] <= leader["draft"] for c in calls[1:])


async def test_agreement_switches_to_leader_drafts_and_back() -> None:
    _, calls = await decode((0.6, 0.4), 64, draft_tokens=8)
    leader, other = calls
    # Joint rounds while the experts disagree, then the leader drafts alone and the other only verifies.
    assert other["draft"] < leader["draft"] and other["score"] >= 1
