"""Hand-computed examples that pin the arithmetic of gateway.fusion.math (expected values derived on paper)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gateway.fusion import math as fm

LN = np.log


def test_weighted_two_steps_by_hand() -> None:
    # Router probabilities 0.6 and 0.2 for the selected pair renormalise to 0.75 / 0.25.
    assert fm.normalise_weights([0.6, 0.2]) == pytest.approx([0.75, 0.25])
    # Step 1: A = (1/2, 1/4, 1/4), B = (1/4, 1/2, 1/4); A^.75·B^.25 = (2^-1.25, 2^-1.75, 2^-2).
    step1 = np.array([LN([0.5, 0.25, 0.25]), LN([0.25, 0.5, 0.25])])
    unnorm = np.array([2**-1.25, 2**-1.75, 2**-2])
    fused = fm.weighted_fuse(step1, [0.6, 0.2])
    assert np.exp(fused) == pytest.approx(unnorm / unnorm.sum())
    assert np.exp(fused) == pytest.approx([0.43446, 0.30721, 0.25833], abs=1e-5)
    assert fm.choose(fused, 0.0, 1.0, np.random.default_rng(0)) == 0
    # Step 2: A = (.1, .2, .7), B = (.1, .8, .1): (.1, .2·4^.25, .7^.75·.1^.25) = (.1, .28284, .43035).
    step2 = np.array([LN([0.1, 0.2, 0.7]), LN([0.1, 0.8, 0.1])])
    fused = fm.weighted_fuse(step2, [0.6, 0.2])
    unnorm = np.array([0.1, 0.2 * 4**0.25, 0.7**0.75 * 0.1**0.25])
    assert np.exp(fused) == pytest.approx(unnorm / unnorm.sum())
    assert np.exp(fused)[2] == pytest.approx(0.43035 / 0.81319, abs=1e-5)
    assert fm.choose(fused, 0.0, 1.0, np.random.default_rng(0)) == 2  # B alone would pick 1


def test_weights_renormalise_and_reject_nonsense() -> None:
    assert fm.normalise_weights([0.0, 0.0]) == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError):
        fm.normalise_weights([0.5, -0.1])
    with pytest.raises(ValueError):
        fm.weighted_fuse(np.zeros((2, 3)), [1.0])


def test_kl_by_hand() -> None:
    # KL((.5,.5)‖(.8,.2)) = .5 ln(.5/.8) + .5 ln(.5/.2) = 0.2231436
    assert fm.kl(LN([0.5, 0.5]), LN([0.8, 0.2])) == pytest.approx(0.5 * math.log(0.625) + 0.5 * math.log(2.5))
    assert fm.kl(LN([0.5, 0.5]), LN([0.8, 0.2])) == pytest.approx(0.2231436, abs=1e-7)
    assert fm.kl(LN([0.8, 0.2]), LN([0.5, 0.5])) == pytest.approx(0.1927448, abs=1e-7)
    assert fm.kl(LN([0.3, 0.7]), LN([0.3, 0.7])) == 0.0


def test_alpha_grid() -> None:
    assert fm.ALPHAS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
                         1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0)


def test_dlf_two_steps_by_hand() -> None:
    # Step 1: L = S = (.5,.5), Q_t = (.8,.2). ā = KL(Q_t‖S) = .19274, b̄ = KL(S‖Q_t) = .22314.
    # α = 1 makes P̃ = Q_t exactly, so both KL terms hit their targets: loss 0, and no other α does.
    half = LN([0.5, 0.5])
    step1 = fm.dlf_fuse(half, half, np.array([LN([0.8, 0.2])]))
    assert (step1.expert, step1.alpha) == (0, 1.0)
    assert step1.loss == pytest.approx(0.0, abs=1e-12)
    assert (step1.a_bar, step1.b_bar) == pytest.approx((0.1927448, 0.2231436), abs=1e-7)
    assert np.exp(step1.fused) == pytest.approx([0.8, 0.2])
    # Step 2: L = (.6,.4), same S and Q_t. P̃(α) ∝ (.6·1.6^α, .4·.4^α): P̃(.5) = (3/4, 1/4), P̃(1) = (6/7, 1/7).
    # Loss over the grid (by hand, 2-token closed forms): α=1.0 → 0.001804, α=1.1 → 0.000245, α=1.2 → 0.002698.
    step2 = fm.dlf_fuse(LN([0.6, 0.4]), half, np.array([LN([0.8, 0.2])]))
    assert step2.alpha == 1.1
    assert step2.loss == pytest.approx(0.000245, abs=1e-6)
    p11 = np.array([0.6 * 1.6**1.1, 0.4 * 0.4**1.1])
    assert np.exp(step2.fused) == pytest.approx(p11 / p11.sum())
    p1 = fm.log_softmax(LN([0.6, 0.4]) + 1.0 * (LN([0.8, 0.2]) - half))
    assert np.exp(p1) == pytest.approx([6 / 7, 1 / 7])
    loss1 = (fm.kl(p1, LN([0.6, 0.4])) - step2.a_bar) ** 2 + (fm.kl(LN([0.6, 0.4]), p1) - step2.b_bar) ** 2
    assert loss1 == pytest.approx(0.001804, abs=1e-6)


def test_dlf_picks_the_expert_and_breaks_ties_in_order() -> None:
    half = LN([0.5, 0.5])
    # Two mirror-image experts: ā, b̄ are the same means; α = 1 on either gives loss 0; the first wins the tie.
    mirror = fm.dlf_fuse(half, half, np.array([LN([0.8, 0.2]), LN([0.2, 0.8])]))
    assert (mirror.expert, mirror.alpha) == (0, 1.0)
    # An expert equal to S moves nothing: ā = b̄ = 0, every α gives P̃ = L, the tie goes to α = 0.
    still = fm.dlf_fuse(LN([0.7, 0.3]), half, np.array([half]))
    assert (still.expert, still.alpha) == (0, 0.0)
    assert still.loss == pytest.approx(0.0, abs=1e-20)


def test_tail_imputation_by_hand() -> None:
    # top-2 of a 10-token vocabulary: .5 and .3; the remaining .2 spreads over 8 unseen ids: .025 each.
    got = fm.impute([5, 7], LN([0.5, 0.3]).tolist(), [5, 7, 9], 10)
    assert np.exp(got) == pytest.approx([0.5, 0.3, 0.025])
    # Cap: with V = 3 the .49 left over would exceed the 2nd-best .01; an unseen id gets at most .01.
    capped = fm.impute([0, 1], LN([0.5, 0.01]).tolist(), [2], 3)
    assert np.exp(capped) == pytest.approx([0.01])
    # Rest bucket: (.5, .3, .025) leaves .175 outside the candidates.
    assert np.exp(fm.with_rest_bucket(got[None, :]))[0] == pytest.approx([0.5, 0.3, 0.025, 0.175])


def test_certain_winner() -> None:
    known = np.array([[True, True, False], [True, False, True]])
    lps = LN(np.array([[0.6, 0.3, 1.0], [0.5, 1.0, 0.2]]))
    bounds = LN(np.array([0.1, 0.1]))
    # token 0: exact in both rows, 0.5·ln .6 + 0.5·ln .5 beats every rival's upper bound.
    assert fm.certain_winner(lps, known, bounds, [1, 1], 0)
    # A weak token 0 cannot be certified when row 2 might hide something as large as its bound.
    weak = LN(np.array([[0.12, 0.11, 1.0], [0.09, 1.0, 0.2]]))
    assert not fm.certain_winner(weak, known, bounds, [1, 1], 0)


def test_choose_sampling() -> None:
    lp = LN(np.array([0.5, 0.3, 0.2]))
    draws = [fm.choose(lp, 1.0, 1.0, np.random.default_rng(7)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw
    rng = np.random.default_rng(1)
    counts = np.bincount([fm.choose(lp, 1.0, 1.0, rng) for _ in range(4000)], minlength=3) / 4000
    assert counts == pytest.approx([0.5, 0.3, 0.2], abs=0.03)
    # top_p = 0.6 keeps the smallest prefix reaching 0.6: tokens 0 and 1, renormalised to 5/8, 3/8.
    counts = np.bincount([fm.choose(lp, 1.0, 0.6, rng) for _ in range(4000)], minlength=3) / 4000
    assert counts[2] == 0 and counts[0] == pytest.approx(0.625, abs=0.03)
