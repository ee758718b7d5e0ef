"""MaPO: margin-aware preference optimization without a reference (Hong et al., 2024, "Margin-aware Preference
Optimization for Aligning Diffusion Models without Reference").

Paper: https://arxiv.org/abs/2406.06424 -- code: mapo-t2i/mapo (utils.py, compute_loss).

Intuition: ORPO for diffusion. Fit the preferred image (plain denoising loss on it) while widening a likelihood
margin between preferred and dispreferred images, with no reference model: the frozen copy and its forward pass
are not needed, which saves memory and time.

With policy errors L_w, L_l (this objective never reads reference errors) and

    f(m) = s * m / (exp(s * m) - 1)           (decreasing in m; f(0) = 1 as a limit)
    loss = mean(L_w) - beta * mean(logsigmoid(T * (f(L_w) - f(L_l))))

f is evaluated with expm1 and, near s*m = 0, with its Taylor series 1 - x/2 + x^2/12, so f(0) is exactly 1 with
the right gradient (-s/2) instead of 0/0.

Defaults (authors): beta = 0.1 (``beta_mapo``), snr_scale s = 0.5 (``snr_value``), temperature T = 1000 (the
scheduler's number of training timesteps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffalign.objectives.base import (
    Objective,
    ObjectiveInputs,
    ObjectiveOutput,
    check_positive,
    register_objective,
)


@dataclass
class MaPOParams:
    beta: float = 0.1  # weight of the margin (ratio) term, the authors' beta_mapo
    temperature: float = 1000.0  # T, the authors use num_train_timesteps
    snr_scale: float = 0.5  # s in f(m), the authors' snr_value

    def __post_init__(self):
        check_positive(self, "beta", "temperature", "snr_scale")


def mapo_odds(err: torch.Tensor, snr_scale: float) -> torch.Tensor:
    """f(m) = s*m / (exp(s*m) - 1), stable; exactly 1 at m = 0."""
    x = snr_scale * err
    small = x.abs() < 1e-4
    safe = torch.where(small, torch.ones_like(x), x)
    series = 1 - x / 2 + x * x / 12
    return torch.where(small, series, safe / torch.expm1(safe))


def mapo_objective(inputs: ObjectiveInputs, params: MaPOParams) -> ObjectiveOutput:
    policy_w, policy_l = inputs.policy_err[:, 0], inputs.policy_err[:, 1]
    margin = mapo_odds(policy_w, params.snr_scale) - mapo_odds(policy_l, params.snr_scale)
    ratio = F.logsigmoid(params.temperature * margin)
    loss = policy_w.mean() - params.beta * ratio.mean()
    margin = margin.detach()
    metrics = {
        "policy_mse_w": policy_w.detach().mean(),
        "policy_mse_l": policy_l.detach().mean(),
        "ratio_logsigmoid": ratio.detach().mean(),  # mean logsigmoid(T * margin); the loss subtracts beta times it
        "margin_acc": (margin > 0).to(margin.dtype).mean(),
    }
    return ObjectiveOutput(loss=loss, metrics=metrics)


register_objective(
    Objective(
        name="mapo",
        params_cls=MaPOParams,
        loss_fn=mapo_objective,
        needs_reference=False,
        description="MaPO: reference-free; winner MSE plus a margin term on SNR-scaled likelihoods",
        source="Hong et al. 2024, arXiv 2406.06424; mapo-t2i/mapo",
    )
)
