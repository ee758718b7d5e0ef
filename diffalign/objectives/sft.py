"""Supervised fine-tuning on the preferred image only: the baseline every preference paper compares against.

    loss = mean over pairs of L_w,   L_w = mean((pred_w - target_w)^2)

No reference model is used and the dispreferred image is ignored (it is not even run through the model).
There are no hyperparameters beyond the learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffalign.objectives.base import Objective, ObjectiveInputs, ObjectiveOutput, register_objective


@dataclass
class SFTParams:
    pass


def sft_objective(inputs: ObjectiveInputs, params: SFTParams) -> ObjectiveOutput:
    policy_w = inputs.policy_err[:, 0]
    loss = policy_w.mean()
    return ObjectiveOutput(loss=loss, metrics={"policy_mse_w": policy_w.detach().mean()})


register_objective(
    Objective(
        name="sft",
        params_cls=SFTParams,
        loss_fn=sft_objective,
        needs_reference=False,
        images_per_record=1,  # only the preferred image of each pair is used
        description="MSE on the preferred image only",
        source="the SFT baseline of Wallace et al. 2023",
    )
)
