"""SmPO: smoothed preference optimization ("Smoothed Preference Optimization via ReNoise Inversion for Aligning
Diffusion Models with Varied Human Preferences", ICML 2025).

Paper: https://arxiv.org/abs/2506.02698 -- code: JaydenLyh/SmPO (train.py).

Intuition: a binary label says nothing about *how much* one image is preferred. SmPO turns two reward scores into
a soft preference probability and scales the Diffusion-DPO loss by how strong the preference is: near-ties pull
little, clear wins pull hard.

With reward scores s_w, s_l (PickScore in the paper; column 0 is the labelled winner):

    n   = (s - score_min) / (score_max - score_min)
    p_w = softmax(n_w, n_l)[0] = sigmoid(n_w - n_l)
    loss = mean(-logsigmoid(-0.5 * beta * (2 p_w - 1) * smoothing_scale * (model_diff - ref_diff)))

with model_diff = L_w - L_l and ref_diff = R_w - R_l. It is Diffusion-DPO with a per-pair beta of
beta * smoothing_scale * (2 p_w - 1). Equal scores give p_w = 0.5: the loss is exactly log 2 with zero gradient.
If the scores disagree with the label (p_w < 0.5) the pair pushes towards the higher-scored image.

Defaults (authors' train.py): beta = 5000 in the 0.5-factor convention of dpo.py (their examples: 2000 for SD1.5,
5000 for SDXL), smoothing_scale = 10, score_min = 0.11544, score_max = 0.28202 (the authors' constants for the
PickScore values of their preprocessed Pick-a-Pic; set them to the range of the reward the scores come from).
The authors also build x_t by DDIM (ReNoise) inversion; that is a data-path choice outside this objective. Their
code reads ``probs[0]`` for the whole batch (per-device batch 1 there); here every pair uses its own p_w.
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
from diffalign.objectives.dpo import dpo_losses, dpo_metrics, implicit_accuracy


@dataclass
class SmPOParams:
    beta: float = 5000.0  # 0.5-factor convention, as dpo.py
    smoothing_scale: float = 10.0
    score_min: float = 0.11544  # PickScore normalisation constants from the authors' train.py
    score_max: float = 0.28202

    def __post_init__(self):
        check_positive(self, "beta", "smoothing_scale")
        if self.score_max <= self.score_min:
            raise ValueError(f"score_max must exceed score_min, got {self.score_max} <= {self.score_min}")


def smpo_preference(scores: torch.Tensor, score_min: float, score_max: float) -> torch.Tensor:
    """p_w: softmax over the pair of min-max normalised scores, (B, 2) -> (B,)."""
    normalised = (scores - score_min) / (score_max - score_min)
    return torch.softmax(normalised, dim=1)[:, 0]


def smpo_objective(inputs: ObjectiveInputs, params: SmPOParams) -> ObjectiveOutput:
    if inputs.ref_err is None:
        raise ObjectiveInputError("SmPO needs reference errors")
    if inputs.scores is None:
        raise ObjectiveInputError("SmPO needs reward scores for both images of each pair")
    policy, ref = inputs.policy_err, inputs.ref_err
    if inputs.scores.shape != policy.shape:
        raise ObjectiveInputError(f"scores shape {tuple(inputs.scores.shape)} != errors shape {tuple(policy.shape)}")
    p_w = smpo_preference(inputs.scores.detach().to(policy.dtype), params.score_min, params.score_max)
    strength = 2 * p_w - 1
    pair_beta = params.beta * params.smoothing_scale * strength
    losses, logits = dpo_losses(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], pair_beta)
    metrics = dpo_metrics(inputs, logits, params.beta)
    metrics["reward_margin"] = (0.5 * pair_beta * logits.detach()).mean()
    # the authors' accuracy: the policy moves towards the higher-scored image (ties count half)
    metrics["implicit_acc"] = implicit_accuracy(strength * logits.detach())
    metrics["pref_prob_w"] = p_w.mean()
    return ObjectiveOutput(loss=losses.mean(), metrics=metrics)


register_objective(
    Objective(
        name="smpo",
        params_cls=SmPOParams,
        loss_fn=smpo_objective,
        data_kind="scored_pair",
        description="SmPO: Diffusion-DPO scaled per pair by a soft preference from two reward scores",
        source="ICML 2025, arXiv 2506.02698; JaydenLyh/SmPO",
    )
)
