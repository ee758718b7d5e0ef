"""Diffusion-NPO: negative preference optimization (Wang et al., 2025, "Diffusion-NPO: Negative Preference
Optimization for Better Preference Aligned Generation of Diffusion Models", ICLR 2025).

Paper: https://openreview.net/forum?id=iJi7nz5Cxc -- code: G-U-N/Diffusion-NPO (train_dpo_bad.py).

Intuition: train a model that prefers what humans *dislike*, then use it where classifier-free guidance already
pushes away from: the negative / unconditional branch. Guidance then moves samples away from the dispreferred
direction as well as towards the prompt.

Training is the Diffusion-DPO objective with winner and loser swapped (the dispreferred image takes the "w" slot);
nothing else changes. With L (policy) and R (reference) errors on the preferred (w) and dispreferred (l) image:

    logits = (R_l - R_w) - (L_l - L_w)
    loss   = -logsigmoid(0.5 * beta * logits)       (or the hinge / IPO forms of dpo.py)

The result is a *negative* LoRA. It is not meant to be sampled alone (alone it makes worse images, by design).
At inference it feeds the negative branch of CFG ("NPO guidance"):

    eps = eps_neg(x_t, uncond) + s * (eps_pos(x_t, cond) - eps_neg(x_t, uncond))
    theta_pos = base + delta_pos,   theta_neg = base + delta_npo + (1 - m) * delta_pos

where delta_pos is an optional DPO/SPO LoRA (or zero) and m the merge weight (default 0).

Beta: 0.5-factor convention of dpo.py. The authors' SD1.5 beta is 500 *without* the 0.5 factor, which is
beta = 1000 here (the default); their SDXL beta 2000 is 4000 here.

Metrics are those of DPO computed on the swapped pair: ``implicit_acc`` is the fraction of pairs where the policy
prefers the *dispreferred* image more than the reference does (it should rise). ``policy_mse_w`` / ``_l`` keep the
data's roles (w = the image humans preferred).
"""

from __future__ import annotations

from dataclasses import dataclass

from diffalign.objectives.base import (
    Objective,
    ObjectiveInputError,
    ObjectiveInputs,
    ObjectiveOutput,
    check_positive,
    register_objective,
)
from diffalign.objectives.dpo import check_variant, dpo_losses, dpo_metrics


@dataclass
class NPOParams:
    beta: float = 1000.0  # 0.5-factor convention; the authors' 500 (no 0.5) for SD1.5
    variant: str = "sigmoid"  # sigmoid | hinge | ipo

    def __post_init__(self):
        check_variant(self.variant)
        check_positive(self, "beta")


def npo_objective(inputs: ObjectiveInputs, params: NPOParams) -> ObjectiveOutput:
    if inputs.ref_err is None:
        raise ObjectiveInputError("NPO needs reference errors")
    policy, ref = inputs.policy_err, inputs.ref_err
    # swapped: the dispreferred image (column 1) is the "winner" of the DPO math
    losses, logits = dpo_losses(policy[:, 1], policy[:, 0], ref[:, 1], ref[:, 0], params.beta, params.variant)
    return ObjectiveOutput(loss=losses.mean(), metrics=dpo_metrics(inputs, logits, params.beta))


register_objective(
    Objective(
        name="npo",
        params_cls=NPOParams,
        loss_fn=npo_objective,
        description="Diffusion-NPO: DPO with winner and loser swapped; a negative LoRA for the CFG negative branch",
        source="Wang et al., ICLR 2025; G-U-N/Diffusion-NPO",
    )
)
