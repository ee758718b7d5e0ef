"""Diffusion-DPO (Wallace et al., 2023, "Diffusion Model Alignment Using Direct Preference Optimization").

Paper: https://arxiv.org/abs/2311.12908 -- code: SalesforceAIResearch/DiffusionDPO.

Intuition: the denoising error is a stand-in for the negative log-likelihood. The policy should lower its error
on the preferred image *more* than the reference does, relative to the dispreferred image.

With per-sample errors L (policy) and R (reference), for winner w and loser l sharing noise and timestep:

    model_diff = L_w - L_l,   ref_diff = R_w - R_l,   logits = ref_diff - model_diff
    sigmoid: loss = -logsigmoid(0.5 * beta * logits)            (mean over pairs)
    hinge:   loss = relu(1 - 0.5 * beta * logits)
    ipo:     loss = (logits - 1 / (2 * 0.5 * beta))^2

Beta convention: **with the 0.5 factor**, as in the original repository and diffusers' SDXL script, where the
published beta is 5000 for SD1.5 and SDXL. diffusers' SD1.5 script drops the 0.5 and uses beta_dpo = 2500: the
same objective. To convert a "no 0.5" beta to ours, multiply it by 2 (2500 -> 5000; NPO's 500 -> 1000).
The hinge and IPO forms use the same effective scale 0.5 * beta so that one beta means the same strength.

Defaults (authors): beta = 5000, sigmoid. Typical range: 1000-10000 for SD-scale models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffalign.objectives.base import (
    Objective,
    ObjectiveInputError,
    ObjectiveInputs,
    ObjectiveOutput,
    check_positive,
    register_objective,
)


@dataclass
class DPOParams:
    beta: float = 5000.0  # with the 0.5 factor (original repo); diffusers' SD1.5 beta_dpo=2500 is the same
    variant: str = "sigmoid"  # sigmoid | hinge | ipo

    def __post_init__(self):
        check_variant(self.variant)
        check_positive(self, "beta")


def check_variant(variant: str) -> None:
    """``variant`` of the DPO-family params (DPO, NPO): sigmoid, hinge or ipo."""
    if variant not in ("sigmoid", "hinge", "ipo"):
        raise ValueError(f"variant must be sigmoid, hinge or ipo, got {variant!r}")


def implicit_accuracy(logits: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs where the policy prefers the winner more than the reference does (ties count half)."""
    return (logits > 0).float().mean() + 0.5 * (logits == 0).float().mean()


def dpo_losses(
    policy_w: torch.Tensor,
    policy_l: torch.Tensor,
    ref_w: torch.Tensor,
    ref_l: torch.Tensor,
    beta: float,
    variant: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair Diffusion-DPO losses and logits (ref_diff - model_diff).

    Args:
        policy_w, policy_l: (B,) policy errors on the preferred / dispreferred image.
        ref_w, ref_l: (B,) reference errors (no grad) on the same noisy inputs.
        beta: KL strength, 0.5-factor convention (see module docstring).
        variant: "sigmoid" (the paper), "hinge" or "ipo".
    """
    logits = (ref_w - ref_l) - (policy_w - policy_l)
    scaled = 0.5 * beta * logits
    if variant == "sigmoid":
        losses = -F.logsigmoid(scaled)
    elif variant == "hinge":
        losses = torch.relu(1 - scaled)
    elif variant == "ipo":
        losses = (logits - 1 / (2 * 0.5 * beta)) ** 2
    else:
        raise ObjectiveInputError(f"unknown DPO variant {variant!r}")
    return losses, logits


def dpo_metrics(inputs: ObjectiveInputs, logits: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    policy, ref = inputs.policy_err.detach(), inputs.ref_err.detach()
    return {
        "implicit_acc": implicit_accuracy(logits.detach()),
        # implicit reward margin r_w - r_l, with r = -0.5 * beta * (L - R)
        "reward_margin": (0.5 * beta * logits.detach()).mean(),
        "policy_mse_w": policy[:, 0].mean(),
        "policy_mse_l": policy[:, 1].mean(),
        "ref_mse_w": ref[:, 0].mean(),
        "ref_mse_l": ref[:, 1].mean(),
    }


def dpo_objective(inputs: ObjectiveInputs, params: DPOParams) -> ObjectiveOutput:
    if inputs.ref_err is None:
        raise ObjectiveInputError("DPO needs reference errors")
    losses, logits = dpo_losses(
        inputs.policy_err[:, 0], inputs.policy_err[:, 1], inputs.ref_err[:, 0], inputs.ref_err[:, 1],
        params.beta, params.variant,
    )
    return ObjectiveOutput(loss=losses.mean(), metrics=dpo_metrics(inputs, logits, params.beta))


register_objective(
    Objective(
        name="dpo",
        params_cls=DPOParams,
        loss_fn=dpo_objective,
        description="Diffusion-DPO (Wallace et al. 2023); variants sigmoid, hinge, ipo",
        source="Wallace et al. 2023, arXiv 2311.12908; SalesforceAIResearch/DiffusionDPO",
    )
)
