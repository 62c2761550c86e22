"""The arithmetic of per-token logit fusion: pure numpy, no I/O, small enough to check by hand.

Every function works on log-probabilities over one *candidate set* of token ids: the whole vocabulary
when every source is exact (``local``), else the union of the sources' top-k sets (remote ``vllm``).

Weighted (log-linear) fusion: ``P̃ ∝ exp(Σ_e w_e · lp_e)`` with the router's probabilities as weights,
renormalised over the selected experts. Log-probabilities stand in for logits because each expert's
normalising constant is a constant shift that the final softmax removes.

Dynamic Logit Fusion (Fan et al., 2024): ``P̃ = softmax(lp_L + α·(lp_t − lp_S))``. Per step, one expert t
and α ∈ {0, 0.1, …, 2.0} are chosen to minimise ``(KL(P̃‖P_L) − ā)² + (KL(P_L‖P̃) − b̄)²`` with
ā, b̄ the mean over the selected experts of KL(Q_t‖Q_S) and KL(Q_S‖Q_t). As in the paper, one expert at a
time (T × 21 candidates), no combinations. Ties go to the earlier expert, then the smaller α, so α = 0
(the large base alone) wins whenever no candidate improves on it. Router weights do not enter dlf.
Deviation: over a top-k union the KLs are computed on the coarse-grained distribution "each candidate
+ one bucket for the rest of the vocabulary" (``with_rest_bucket``), a lower bound of the true KL
(data-processing inequality); with exact full-vocabulary sources they are the paper's KLs.

Tail imputation (only when a source cannot give exact log-probs for named ids): a candidate missing
from a source's top-k gets ``log(min(p_k, r / (V − k)))``: the remaining mass r = 1 − Σ top-k spread
evenly over the V − k unseen ids, capped at the k-th probability (no unseen id can beat it). The
imputed values never sum past 1, so the rest bucket stays non-negative.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]
ALPHAS: tuple[float, ...] = tuple(i / 10 for i in range(21))  # the dlf grid 0, 0.1, …, 2.0
_FLOOR = -1e4  # log-probability of an (almost) impossible event; finite so sums stay defined


def log_softmax(x: Array) -> Array:
    """Normalise log-scores along the last axis (stable)."""
    m = np.max(x, axis=-1, keepdims=True)
    shifted = x - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def normalise_weights(weights: Sequence[float]) -> Array:
    """Router probabilities renormalised over the selected experts; equal weights if they sum to zero."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be a non-empty list of non-negative numbers, got {list(weights)}")
    total = float(w.sum())
    return w / total if total > 0 else np.full(w.size, 1.0 / w.size)


def weighted_fuse(lps: Array, weights: Sequence[float]) -> Array:
    """Log-linear mixture of ``lps`` (experts × candidates), normalised over the candidates."""
    w = normalise_weights(weights)
    if lps.shape[0] != w.size:
        raise ValueError(f"{lps.shape[0]} expert rows but {w.size} weights")
    return log_softmax(w @ lps)


def kl(lp_p: Array, lp_q: Array) -> float:
    """KL(P‖Q) from log-probabilities over the same (normalised) candidate set."""
    p = np.exp(lp_p)
    return float(np.sum(np.where(p > 0, p * (lp_p - lp_q), 0.0)))


@dataclass(frozen=True)
class DlfChoice:
    expert: int  # row of the chosen expert in lp_experts
    alpha: float
    fused: Array  # log P̃ over the candidates (normalised)
    loss: float
    a_bar: float
    b_bar: float


def dlf_fuse(lp_large: Array, lp_small: Array, lp_experts: Array) -> DlfChoice:
    """One DLF step: grid-search (expert, α) so L moves from its base as much as the experts moved S."""
    if lp_experts.ndim != 2 or lp_experts.shape[0] == 0:
        raise ValueError("dlf needs at least one expert row")
    a_bar = float(np.mean([kl(q_t, lp_small) for q_t in lp_experts]))
    b_bar = float(np.mean([kl(lp_small, q_t) for q_t in lp_experts]))
    best: DlfChoice | None = None
    for t, lp_t in enumerate(lp_experts):
        delta = lp_t - lp_small
        for alpha in ALPHAS:
            fused = log_softmax(lp_large + alpha * delta)
            loss = (kl(fused, lp_large) - a_bar) ** 2 + (kl(lp_large, fused) - b_bar) ** 2
            if best is None or loss < best.loss - 1e-12:
                best = DlfChoice(t, alpha, fused, loss, a_bar, b_bar)
    assert best is not None
    return best


def impute(top_ids: Sequence[int], top_lps: Sequence[float], candidates: Sequence[int], vocab_size: int) -> Array:
    """Log-probs of ``candidates`` from a top-k list alone; unseen ids get the tail imputation above."""
    known = dict(zip(top_ids, top_lps, strict=True))
    k = len(known)
    p_k = float(np.exp(min(top_lps))) if k else 1.0
    rest = max(0.0, 1.0 - float(np.sum(np.exp(np.asarray(top_lps, dtype=np.float64)))))
    unseen = max(vocab_size - k, 1)
    tail = min(p_k, rest / unseen)
    tail_lp = float(np.log(tail)) if tail > 0 else _FLOOR
    return np.array([known.get(c, tail_lp) for c in candidates], dtype=np.float64)


def with_rest_bucket(lps: Array) -> Array:
    """Append one column holding each row's mass outside the candidates, so rows are distributions."""
    inside = np.sum(np.exp(lps), axis=-1, keepdims=True)
    rest = np.clip(1.0 - inside, 0.0, None)
    rest_lp = np.where(rest > 0, np.log(np.where(rest > 0, rest, 1.0)), _FLOOR)
    return np.concatenate([lps, rest_lp], axis=-1)


def choose(lp: Array, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Index of the next token: argmax at temperature 0, else nucleus sampling from softmax(lp / T)."""
    if temperature <= 0:
        return int(np.argmax(lp))
    probs = np.exp(log_softmax(lp / temperature))
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, top_p, side="left")) + 1] if top_p < 1 else order
    kept = probs[keep] / probs[keep].sum()
    return int(keep[rng.choice(len(keep), p=kept)])


def certain_winner(lps: Array, known: npt.NDArray[np.bool_], bounds: Array, weights: Sequence[float],
                   token: int) -> bool:
    """Whether candidate ``token`` (known exactly in every row) is surely the weighted fused argmax.

    Unknown entries of a row are at most that row's k-th log-prob (``bounds``), so replacing them by it
    gives an upper bound for every rival, and ``w · bounds`` bounds every id outside the candidates.
    Used to accept a drafted token without asking for the exact log-probs of its rivals.
    """
    w = normalise_weights(weights)
    upper = w @ np.where(known, lps, bounds[:, None])
    mine = float(upper[token])
    rivals = np.delete(upper, token)
    return mine > float(w @ bounds) and (rivals.size == 0 or mine > float(rivals.max()))
