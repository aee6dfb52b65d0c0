"""GRPO math: group-normalised advantages, the clipped policy loss, KL estimators, aggregation.

All per-token tensors are padded ``[B, T]`` with a completion ``mask`` (1 on completion tokens, 0 on
padding); log-probs are of the sampled tokens. The functions are pure so they are tested on CPU
against hand-computed numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "seq_mean")
# exp() of a log-ratio beyond this overflows float32 long before it carries information.
_MAX_LOG_RATIO = 20.0


def group_advantages(rewards: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Advantages for ``rewards`` shaped ``[groups, G]``: reward minus its group's mean, optionally
    divided by the group's standard deviation + ``eps``.

    The group mean is GRPO's baseline: no value network, the other samples for the same prompt are the
    comparison. The std is the sample std (ddof=1), as in DeepSeekMath/TRL. Dividing by it makes every
    group's advantages the same scale, which over-weights groups whose rewards barely differ; with
    ``normalize_std=False`` (Dr. GRPO) the raw differences are kept. A zero-variance group gets zero
    advantages either way.
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, G] with G >= 2, got shape {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    # A mean of equal floats can miss them by an ulp; force exact zeros so that rounding noise is
    # never divided by a near-zero std into a full-size advantage.
    centred = centred.masked_fill(zero_variance_groups(rewards).unsqueeze(1), 0.0)
    if not normalize_std:
        return centred
    std = rewards.std(dim=1, keepdim=True)
    return torch.where(centred == 0, centred, centred / (std + eps))


def zero_variance_groups(rewards: torch.Tensor, tol: float = 0.0) -> torch.Tensor:
    """Bool ``[groups]``: groups whose rewards span at most ``tol``. They carry no learning signal
    (all advantages are 0), so a driver may drop or resample them and should log how many there are."""
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [groups, G], got shape {tuple(rewards.shape)}")
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) <= tol


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs (Schulman, 2020).

    With ``log_r = ref_logp - logp``:

    * k1 = -log_r: unbiased but high variance, and negative on many tokens.
    * k2 = log_r**2 / 2: low variance and non-negative, but biased.
    * k3 = exp(log_r) - 1 - log_r: unbiased (E[r - 1] = 0 under pi) and non-negative (e^x >= 1 + x),
      with low variance; what GRPO and the Seg-R1 paper use.

    Unbiasedness assumes the tokens were sampled from pi; the log-ratio is clamped to +-20 so one
    extreme token cannot overflow.
    """
    log_r = (ref_logp - logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        return log_r.exp() - 1 - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean") -> torch.Tensor:
    """Reduce per-token ``values`` to a scalar over the completion tokens.

    ``token_mean`` averages over every token in the batch, so long completions weigh more in total
    (DAPO's choice); ``seq_mean`` averages each sequence's tokens, then the sequences, so each
    completion weighs the same (the original GRPO). Sequences with no tokens are skipped.
    """
    mask = mask.to(values.dtype)
    if mode == "token_mean":
        return (values * mask).sum() / mask.sum().clamp(min=1)
    if mode == "seq_mean":
        lengths = mask.sum(dim=1)
        per_seq = (values * mask).sum(dim=1) / lengths.clamp(min=1)
        present = lengths > 0
        return per_seq[present].sum() / present.sum().clamp(min=1)
    raise ValueError(f"unknown aggregation {mode!r}; expected one of {AGGREGATIONS}")


@dataclass(frozen=True)
class LossSettings:
    """Clipped-surrogate settings.

    ``clip_low``/``clip_high`` bound the ratio to ``[1 - clip_low, 1 + clip_high]``; a larger
    ``clip_high`` (DAPO's 0.28) lets unlikely tokens that did well grow faster. ``dual_clip`` (c > 1)
    caps the loss of a negative-advantage token at ``c x |A|``, so a token whose ratio exploded cannot
    dominate the batch. ``kl_coef`` scales the KL penalty against the reference policy.
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.04
    kl_estimator: str = "k3"
    aggregation: str = "token_mean"
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.clip_low < 1:
            raise ValueError(f"LossSettings.clip_low must be in [0, 1), got {self.clip_low}")
        if not self.clip_high >= 0:
            raise ValueError(f"LossSettings.clip_high must be >= 0, got {self.clip_high}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"LossSettings.dual_clip must be > 1 or None, got {self.dual_clip}")
        if not self.kl_coef >= 0:
            raise ValueError(f"LossSettings.kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"LossSettings.kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"LossSettings.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")


def policy_loss(
    logp: torch.Tensor,
    behavior_logp: torch.Tensor,
    advantages: torch.Tensor,
    settings: LossSettings,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate loss ``-min(r A, clip(r) A)`` (with the dual clip when set).

    ``r = exp(logp - behavior_logp)`` is the per-token importance ratio against the policy that
    sampled the tokens, which is what makes one-step off-policy (async) samples usable. Returns
    ``(loss, ratio, clipped, dual_clipped)``, the last two as bool masks for logging.
    """
    adv = advantages.unsqueeze(1)
    log_ratio = (logp - behavior_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped_ratio = ratio.clamp(1 - settings.clip_low, 1 + settings.clip_high)
    clipped = -adv * clipped_ratio
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    was_dual_clipped = torch.zeros_like(was_clipped)
    if settings.dual_clip is not None:
        cap = -adv * settings.dual_clip  # positive where adv < 0
        was_dual_clipped = (adv < 0) & (loss > cap)
        loss = torch.where(was_dual_clipped, cap, loss)
    return loss, ratio, was_clipped, was_dual_clipped


def grpo_loss(
    logp: torch.Tensor,
    behavior_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: LossSettings,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO objective for one micro-batch: clipped surrogate + ``kl_coef`` x KL - ``entropy_coef``
    x entropy, each aggregated over completion tokens. Returns the loss and logging metrics."""
    if logp.shape != behavior_logp.shape or logp.shape != mask.shape or logp.ndim != 2:
        raise ValueError(
            f"logp {tuple(logp.shape)}, behavior_logp {tuple(behavior_logp.shape)} and mask "
            f"{tuple(mask.shape)} must share one [B, T] shape"
        )
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B] = {tuple(logp.shape[:1])}, got {tuple(advantages.shape)}")
    if settings.kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp")

    mode = settings.aggregation
    token_loss, ratio, clipped, dual_clipped = policy_loss(logp, behavior_logp, advantages.to(logp.dtype), settings)
    pg_loss = aggregate(token_loss, mask, mode)
    loss = pg_loss
    with torch.no_grad():
        metrics = {
            "pg_loss": pg_loss.item(),
            "clip_frac": aggregate(clipped.to(logp.dtype), mask, "token_mean").item(),
            "dual_clip_frac": aggregate(dual_clipped.to(logp.dtype), mask, "token_mean").item(),
            "ratio_mean": aggregate(ratio, mask, "token_mean").item(),
        }
    if ref_logp is not None:
        kl = aggregate(kl_penalty(logp, ref_logp, settings.kl_estimator), mask, mode)
        metrics["kl"] = kl.item()
        if settings.kl_coef > 0:
            loss = loss + settings.kl_coef * kl
    if entropy is not None:
        mean_entropy = aggregate(entropy, mask, mode)
        metrics["entropy"] = mean_entropy.item()
        if settings.entropy_coef > 0:
            loss = loss - settings.entropy_coef * mean_entropy
    metrics["loss"] = loss.item()
    return loss, metrics
