"""Diffusion-KTO: alignment from per-image binary feedback (Li et al., 2024, "Aligning Diffusion Models by
Optimizing Human Utility").

Paper: https://arxiv.org/abs/2404.04465 -- code: jacklishufan/diffusion-kto (train_kto_sd_v1.5.py).

Intuition: Kahneman-Tversky optimization. No pairs: every image carries a like (y = 1) or dislike (y = 0). The
policy should lower its error, relative to the reference, on liked images and raise it on disliked ones, measured
against a reference point z (the batch's average improvement), through a saturating sigmoid "value function".

With the policy error L and reference error R of each image:

    g = R - L                                         (implicit reward: > 0 where the policy fits better)
    z = clamp(mean of g over the *global* batch, min=0), detached
    loss = mean(lambda_y * (1 - sigmoid((2y - 1) * beta * (g - z))))

lambda_y is lambda_desirable for y = 1, lambda_undesirable for y = 0. z uses ``inputs.global_mean``, which the
trainer sets to an all-process mean (the authors' ``accelerator.reduce(..., 'mean')``).

Beta: used as is, there is no 0.5 factor here (the authors' ``beta_dpo * g``). Defaults (authors): beta = 1000,
lambda_desirable = lambda_undesirable = 1 ("halo" = sigmoid). Authors' settings: lr 1e-7, 20k steps.
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
from diffalign.objectives.dpo import implicit_accuracy


@dataclass
class KTOParams:
    beta: float = 1000.0  # no 0.5 factor
    lambda_desirable: float = 1.0
    lambda_undesirable: float = 1.0

    def __post_init__(self):
        check_positive(self, "beta", "lambda_desirable", "lambda_undesirable")


def kto_objective(inputs: ObjectiveInputs, params: KTOParams) -> ObjectiveOutput:
    if inputs.ref_err is None:
        raise ObjectiveInputError("KTO needs reference errors")
    if inputs.labels is None:
        raise ObjectiveInputError("KTO needs labels (1 = desirable, 0 = undesirable)")
    policy, ref = inputs.policy_err, inputs.ref_err
    if inputs.labels.shape != policy.shape:
        raise ObjectiveInputError(f"labels shape {tuple(inputs.labels.shape)} != errors shape {tuple(policy.shape)}")
    if not ((inputs.labels == 0) | (inputs.labels == 1)).all():
        raise ObjectiveInputError("labels must be 0 or 1")
    desirable = inputs.labels == 1
    sign = desirable.to(policy.dtype) * 2 - 1
    weight = torch.where(desirable, params.lambda_desirable, params.lambda_undesirable).to(policy.dtype)

    g = ref - policy
    z = inputs.global_mean(g.detach()).clamp(min=0).detach()
    signed = sign * (g - z)
    loss = (weight * (1 - torch.sigmoid(params.beta * signed))).mean()

    g, signed = g.detach(), signed.detach()
    n_des, n_und = desirable.sum(), (~desirable).sum()
    zero = torch.zeros((), dtype=policy.dtype, device=policy.device)
    metrics = {
        "kl_reference_point": z,
        # fraction of images moved the right way relative to z (ties count half)
        "implicit_acc": implicit_accuracy(signed),
        # mean g per label; 0 when the batch has none of that label (see the counts)
        "reward_desirable": torch.where(desirable, g, zero).sum() / n_des.clamp(min=1),
        "reward_undesirable": torch.where(~desirable, g, zero).sum() / n_und.clamp(min=1),
        "n_desirable": n_des.to(policy.dtype),
        "n_undesirable": n_und.to(policy.dtype),
        "policy_mse": policy.detach().mean(),
        "ref_mse": ref.detach().mean(),
    }
    return ObjectiveOutput(loss=loss, metrics=metrics)


register_objective(
    Objective(
        name="kto",
        params_cls=KTOParams,
        loss_fn=kto_objective,
        images_per_record=1,
        data_kind="labelled",
        description="Diffusion-KTO: unpaired images labelled desirable / undesirable, sigmoid utility",
        source="Li et al. 2024, arXiv 2404.04465; jacklishufan/diffusion-kto",
    )
)
