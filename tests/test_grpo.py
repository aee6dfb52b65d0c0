from __future__ import annotations

import math

import pytest
import torch

from segr1.core.grpo import (
    LossSettings,
    aggregate,
    group_advantages,
    grpo_loss,
    kl_penalty,
    policy_loss,
    zero_variance_groups,
)

LOG_HALF = math.log(0.5)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # torch.testing.assert_close costs seconds of imports on first use; this is all we need.
    assert actual.shape == expected.shape, (actual, expected)
    assert torch.allclose(actual, expected, rtol=1e-9, atol=1e-12), (actual, expected)


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    std = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3)  # sample std (ddof=1) = 1.2910
    adv = group_advantages(rewards, eps=0.0)
    expected = torch.tensor([[-1.5, -0.5, 0.5, 1.5]], dtype=torch.float64) / std
    _close(adv[0], expected[0])
    assert adv[0, 0].item() == pytest.approx(-1.161895, abs=1e-6)
    assert torch.equal(adv[1], torch.zeros(4, dtype=torch.float64))  # zero variance: no signal, no NaN
    # 0.1 + 0.1 + 0.1 != 0.3 in floats: the mean misses by an ulp, the advantages must still be 0
    tenths = group_advantages(torch.full((1, 3), 0.1, dtype=torch.float64), eps=0.0)
    assert torch.equal(tenths, torch.zeros(1, 3, dtype=torch.float64))
    _close(group_advantages(rewards, normalize_std=False)[0], expected[0] * std)
    assert group_advantages(rewards, eps=1.0)[0, 3].item() == pytest.approx(1.5 / (std + 1.0))


def test_zero_variance_groups():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 1e-4], [0.0, 1.0, 0.0]])
    assert zero_variance_groups(rewards).tolist() == [True, False, False]
    assert zero_variance_groups(rewards, tol=1e-3).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(4, 1))


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([LOG_HALF]), torch.tensor([math.log(0.25)])  # log r = log(0.5)
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(0.693147, abs=1e-6)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * 0.693147**2, abs=1e-6)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + 0.693147, abs=1e-6)
    # k3 is never negative, k1 can be; both are 0 when the policies agree
    flipped = kl_penalty(ref, logp, "k1").item()
    assert flipped == pytest.approx(-0.693147, abs=1e-6)
    assert kl_penalty(ref, logp, "k3").item() == pytest.approx(2 - 1 - 0.693147, abs=1e-6)
    assert kl_penalty(logp, logp, "k3").item() == 0.0
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_penalty(logp, ref, "k4")


def test_k3_is_an_unbiased_estimate_of_kl():
    torch.manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    exact = (p * (p / q).log()).sum().item()
    tokens = torch.multinomial(p, 200_000, replacement=True)
    estimate = kl_penalty(p.log()[tokens], q.log()[tokens], "k3").mean().item()
    assert estimate == pytest.approx(exact, abs=0.01)


def test_aggregation_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert aggregate(values, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert aggregate(values, mask, "seq_mean").item() == pytest.approx((2 + 4) / 2)  # the empty row is skipped
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(values, mask, "sum")


def _batch():
    """Row 0: A = +1, ratios 1.5, 0.5, 1.1. Row 1: A = -1, ratios 0.5, 5.0 and one padding token."""
    behavior = torch.full((2, 3), math.log(0.1), dtype=torch.float64)
    ratios = torch.tensor([[1.5, 0.5, 1.1], [0.5, 5.0, 1.0]], dtype=torch.float64)
    logp = (behavior + ratios.log()).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    return logp, behavior, advantages, mask


def test_clipped_surrogate_per_token_by_hand():
    logp, behavior, advantages, _ = _batch()
    loss, ratio, clipped, dual = policy_loss(logp, behavior, advantages, LossSettings(dual_clip=3.0))
    _close(ratio, torch.tensor([[1.5, 0.5, 1.1], [0.5, 5.0, 1.0]], dtype=torch.float64))
    # -min(rA, clip(r)A): 1.5 -> clipped to 1.2; A<0 at r=0.5 -> clipped to 0.8; A<0 at r=5 -> dual-capped at 3
    _close(loss, torch.tensor([[-1.2, -0.5, -1.1], [0.8, 3.0, 1.0]], dtype=torch.float64))
    assert clipped.tolist() == [[True, False, False], [True, False, False]]
    assert dual.tolist() == [[False, False, False], [False, True, False]]
    no_dual, *_ = policy_loss(logp, behavior, advantages, LossSettings(clip_high=0.28))
    assert no_dual[1, 1].item() == pytest.approx(5.0)
    assert no_dual[0, 0].item() == pytest.approx(-1.28)


def test_grpo_loss_value_metrics_and_gradient_by_hand():
    logp, behavior, advantages, mask = _batch()
    ref = (logp + LOG_HALF).detach()  # every token: log r = log 0.5, k3 = 0.193147
    settings = LossSettings(dual_clip=3.0, kl_coef=0.1)
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]], dtype=torch.float64)
    loss, metrics = grpo_loss(logp, behavior, ref, advantages, mask, settings, entropy=entropy)
    k3 = 0.5 - 1 - LOG_HALF
    pg = (-1.2 - 0.5 - 1.1 + 0.8 + 3.0) / 5
    assert loss.item() == pytest.approx(pg + 0.1 * k3)
    assert metrics["pg_loss"] == pytest.approx(pg)
    assert metrics["kl"] == pytest.approx(k3)
    assert metrics["clip_frac"] == pytest.approx(2 / 5)
    assert metrics["dual_clip_frac"] == pytest.approx(1 / 5)
    assert metrics["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.1 + 0.5 + 5.0) / 5)
    assert metrics["entropy"] == pytest.approx(15 / 5)  # the padded 100 is ignored
    loss.backward()
    # Clipped tokens pass no policy gradient; d k3 / d logp = 1 - r = 0.5, scaled by 0.1 / 5 tokens.
    kl_grad = 0.1 * 0.5 / 5
    expected = torch.tensor(
        [[kl_grad, -0.5 / 5 + kl_grad, -1.1 / 5 + kl_grad], [kl_grad, kl_grad, 0.0]], dtype=torch.float64
    )
    _close(logp.grad, expected)


def test_grpo_loss_sequence_mean_and_entropy_bonus():
    logp, behavior, advantages, mask = _batch()
    settings = LossSettings(dual_clip=3.0, kl_coef=0.0, aggregation="seq_mean", entropy_coef=0.01)
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]], dtype=torch.float64)
    loss, metrics = grpo_loss(logp, behavior, None, advantages, mask, settings, entropy=entropy)
    pg = ((-1.2 - 0.5 - 1.1) / 3 + (0.8 + 3.0) / 2) / 2
    mean_entropy = (2.0 + 4.5) / 2
    assert loss.item() == pytest.approx(pg - 0.01 * mean_entropy)
    assert "kl" not in metrics and metrics["entropy"] == pytest.approx(mean_entropy)


def test_on_policy_gradient_is_the_advantage_weighted_score():
    logp = torch.log(torch.tensor([[0.2, 0.3]], dtype=torch.float64)).requires_grad_(True)
    loss, metrics = grpo_loss(logp, logp.detach(), None, torch.tensor([2.0], dtype=torch.float64),
                              torch.ones(1, 2, dtype=torch.bool), LossSettings(kl_coef=0.0))
    assert loss.item() == pytest.approx(-2.0) and metrics["clip_frac"] == 0.0
    loss.backward()
    _close(logp.grad, torch.tensor([[-1.0, -1.0]], dtype=torch.float64))


def test_settings_and_shapes_are_validated():
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        LossSettings(dual_clip=0.9)
    with pytest.raises(ValueError, match="kl_estimator"):
        LossSettings(kl_estimator="k5")
    with pytest.raises(ValueError, match="clip_low"):
        LossSettings(clip_low=1.0)
    logp, behavior, advantages, mask = _batch()
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_logp"):
        grpo_loss(logp, behavior, None, advantages, mask, LossSettings())
    with pytest.raises(ValueError, match=r"advantages must be \[B\]"):
        grpo_loss(logp, behavior, None, advantages[:1], mask, LossSettings(kl_coef=0.0))
