"""The online losses, as pure functions of per-sample tensors (tested against their formulas).

GRPO / DDPO's clipped surrogate (Schulman et al. 2017 PPO; Black et al. 2023 DDPO; Liu et al. 2025 Flow-GRPO),
per sample of one trained step:

    ratio = exp(log p_theta(x_{i+1} | x_i) - log p_old(x_{i+1} | x_i))
    loss  = mean over samples of max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)),   A = clip(A, -c, c)

The KL to the reference for one Gaussian step with a shared std (Flow-GRPO): mean over elements of
(mu_theta - mu_ref)^2 / (2 s^2).

DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117; NVlabs/DiffusionNFT ``train_nft_sd3.py``): with the policy's
raw prediction p, the old policy's p_old (no grad) and mixing strength beta,

    p+ = beta p + (1 - beta) p_old          (implicit positive policy)
    p- = (1 + beta) p_old - beta p          (implicit negative policy)
    loss = c * mean over samples of [r |x0(p+) - x0|^2 / w+ + (1 - r) |x0(p-) - x0|^2 / w-] / beta

where x0(.) is the clean estimate the family reads from a raw prediction at x_t (so epsilon, v and flow targets
all work), |.|^2 is the mean over elements, w = mean |x0(.) - x0| (detached, at least 1e-5) is the paper's
adaptive weight, r the optimality probability and c the advantage clip (the reference's loss scale).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ADAPTIVE_WEIGHT_FLOOR = 1e-5


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
              advantage_clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate for (N,) log-probabilities (policy, with grad; sampling policy) and advantages.

    Returns the scalar loss and detached metrics: ratio_mean, ratio_max, clip_fraction (|ratio - 1| > eps),
    approx_kl (mean of (log ratio)^2 / 2, as DDPO logs it).
    """
    advantages = advantages.float().clamp(-advantage_clip, advantage_clip)
    log_ratio = log_prob.float() - old_log_prob.float()
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    detached = ratio.detach()
    metrics = {"ratio_mean": detached.mean(), "ratio_max": detached.max(),
               "clip_fraction": ((detached - 1).abs() > clip_range).float().mean(),
               "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean()}
    return loss, metrics


def gaussian_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N,) KL between two Gaussians with the same std (N, 1, 1, 1): mean over elements of
    (mean - reference_mean)^2 / (2 std^2)."""
    values = (mean.float() - reference_mean.float()) ** 2 / (2 * std.float() ** 2)
    return values.mean(dim=tuple(range(1, values.ndim)))


def nft_loss(pred: torch.Tensor, old_pred: torch.Tensor, x0: torch.Tensor, r: torch.Tensor, beta: float,
             advantage_clip: float, clean_estimate: Callable[[torch.Tensor], torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's loss for (N, C, h, w) raw predictions of the policy (with grad) and the old policy, the
    clean latents ``x0`` and optimality probabilities ``r`` (N,). ``clean_estimate`` maps a raw prediction to
    its x0 estimate at this batch's x_t (the family's ``split_prediction``)."""
    old_pred = old_pred.detach().float()
    pred = pred.float()
    dims = tuple(range(1, x0.ndim))
    positive = beta * pred + (1 - beta) * old_pred
    negative = (1 + beta) * old_pred - beta * pred

    def weighted_error(raw: torch.Tensor) -> torch.Tensor:
        error = clean_estimate(raw) - x0.float()
        weight = error.detach().abs().mean(dim=dims).clamp(min=ADAPTIVE_WEIGHT_FLOOR)
        return (error ** 2).mean(dim=dims) / weight

    r = r.float()
    per_sample = (r * weighted_error(positive) + (1 - r) * weighted_error(negative)) / beta
    loss = advantage_clip * per_sample.mean()
    metrics = {"old_deviation": ((pred.detach() - old_pred) ** 2).mean(), "optimality_mean": r.mean()}
    return loss, metrics
