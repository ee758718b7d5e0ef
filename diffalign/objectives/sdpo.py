"""Diffusion-SDPO: safeguarded DPO (Fu et al., 2025, "Diffusion-SDPO: Safeguarded Direct Preference Optimization
for Diffusion Models").

Paper: https://arxiv.org/abs/2511.03317 -- code: AIDC-AI/Diffusion-SDPO (train.py, get_adaptive_lose_l_scale).

Intuition: DPO only widens the *margin* between winner and loser, so it can raise the winner's error as long as the
loser's rises faster. SDPO scales down the loser's gradient whenever it points the same way as the winner's, so that
to first order an update never increases the winner's error.

With residuals r = pred - target (detached) over the whole batch and A = mean(r_w^2), B = mean(r_l^2):

    gA = dA/dpred_w = 2 r_w / numel(r_w),   gB = dB/dpred_l = 2 r_l / numel(r_l)
    lambda = (1 - mu) * |gA|^2 / (gB . gA + 1e-9)   if gB . gA > 0,   else 1
    lambda = clamp(lambda, 0, 1), detached: one scalar per batch
    L_l'   = L_l.detach() + lambda * (L_l - L_l.detach())          (straight-through)
    loss   = DPO loss with L_l' as the policy loser error (reference errors unchanged)

The forward value is exactly Diffusion-DPO's; only the gradient through L_l is multiplied by lambda.
lambda is computed on the local (per-process) batch, as the authors do per micro-batch.

Defaults: beta = 5000 (0.5-factor convention, as the authors), mu = 0.0. The authors use mu = 0.9 for SD1.5
Diffusion-DPO and mu = 0.6 for SDXL; larger mu is more conservative (smaller lambda).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.objectives.base import (
    Objective,
    ObjectiveInputError,
    ObjectiveInputs,
    ObjectiveOutput,
    check_positive,
    register_objective,
)
from diffalign.objectives.dpo import dpo_losses, dpo_metrics


@dataclass
class SDPOParams:
    beta: float = 5000.0  # 0.5-factor convention, as dpo.py
    mu: float = 0.0  # safeguard strength in [0, 1]; authors: 0.9 (SD1.5), 0.6 (SDXL)

    def __post_init__(self):
        check_positive(self, "beta")
        if not 0.0 <= self.mu <= 1.0:
            raise ValueError(f"mu must be in [0, 1], got {self.mu}")


def sdpo_lambda(residuals: torch.Tensor, mu: float, eps: float = 1e-9) -> torch.Tensor:
    """The loser-gradient scale, a detached scalar in [0, 1].

    Args:
        residuals: (B, 2, ...) policy pred - target; column 0 the winner, column 1 the loser.
        mu: safeguard strength in [0, 1].
    """
    r = residuals.detach()
    if r.dtype not in (torch.float32, torch.float64):  # the sums underflow in half precision
        r = r.float()
    r_w, r_l = r[:, 0], r[:, 1]
    g_a = 2 * r_w / r_w.numel()
    g_b = 2 * r_l / r_l.numel()
    dot = (g_b * g_a).sum()
    cap = (1.0 - mu) * (g_a * g_a).sum() / (dot + eps)
    lam = torch.where(dot > 0, cap, torch.ones_like(cap))
    return lam.clamp(0.0, 1.0).detach()


def sdpo_objective(inputs: ObjectiveInputs, params: SDPOParams) -> ObjectiveOutput:
    if inputs.ref_err is None:
        raise ObjectiveInputError("SDPO needs reference errors")
    if inputs.residuals is None:
        raise ObjectiveInputError("SDPO needs residuals (policy pred - target)")
    policy, ref = inputs.policy_err, inputs.ref_err
    lam = sdpo_lambda(inputs.residuals, params.mu).to(policy.dtype)
    loser = policy[:, 1]
    loser_scaled = loser.detach() + lam * (loser - loser.detach())
    losses, logits = dpo_losses(policy[:, 0], loser_scaled, ref[:, 0], ref[:, 1], params.beta)
    metrics = dpo_metrics(inputs, logits, params.beta)
    metrics["sdpo_lambda"] = lam.detach()
    return ObjectiveOutput(loss=losses.mean(), metrics=metrics)


register_objective(
    Objective(
        name="sdpo",
        params_cls=SDPOParams,
        loss_fn=sdpo_objective,
        needs_residuals=True,
        description="Diffusion-SDPO: DPO with the loser's gradient scaled so the winner's error does not rise",
        source="Fu et al. 2025, arXiv 2511.03317; AIDC-AI/Diffusion-SDPO",
    )
)
