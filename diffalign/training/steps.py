"""The training step: the one place an objective plugs into the loop.

Every micro-step the loop builds a ``StepContext`` and calls the objective's step procedure,
``STEPS.get(objective.step).run(context) -> ObjectiveOutput``; it then backpropagates ``output.loss`` and logs
``output.metrics``. There is no other branch on the objective in the loop.

- ``"errors"`` (the default, every objective with a ``loss_fn``): ``denoising_errors`` (one policy forward over
  the K*B latents, one reference forward under no_grad) then ``objective.loss_fn`` on the (B, K) errors.
- ``"self_npo"`` (registered by ``diffalign.training.self_npo``): teacher DDIM steps, re-noising and a loss in x0
  space (G-U-N/Diffusion-NPO, Self-NPO).
- ``"grpo"`` and ``"nft"`` (registered by ``diffalign.online.steps``): online RL; the step samples a round from the
  model at the round's first micro-step, scores it, and trains on it (``context.online``, ``context.work``).

A new procedure is a function
``run(context) -> ObjectiveOutput`` registered here with ``STEPS.register(name, StepProcedure(run, ...),
description=..., source=...)``, and an objective that names it in ``Objective(step=name)``.

Contract for a procedure:
    - all randomness comes from ``context.generator`` (CPU, seeded by (seed, micro-step, rank)), in a fixed
      order, so a resumed run draws exactly what an uninterrupted one would have;
    - the policy forward with gradients goes through ``context.model`` (possibly DDP-wrapped); reference passes
      run under ``torch.no_grad`` inside ``context.reference.model_for_pass(context.model)``;
    - it returns a scalar ``loss`` and detached scalar ``metrics``; the loop does the backward pass, the
      optimizer step, the non-finite guards and the reference's update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from diffalign.config import TimestepConfig
from diffalign.families.base import DiffusionComponents, Family
from diffalign.objectives.base import Objective, ObjectiveInputs, ObjectiveOutput, local_mean
from diffalign.registry import Registry
from diffalign.training.reference import Reference
from diffalign.training.step import denoising_errors


@dataclass
class StepContext:
    """Everything one training step may use, for B records of K images on this process.

    Args:
        objective, params: the objective and its parsed hyperparameters (``objective.parse_params``).
        family, components: the model family and the loaded pipeline parts.
        model: the trained denoiser, possibly DDP-wrapped: its forward is the one with gradients.
        reference: the reference strategy (``training.reference``), or None for ``objective.reference=none``.
        latents: (B, K, C, h, w) in the training dtype; for pairs column 0 is the preferred image (None for online
            objectives, whose images are sampled by the step itself).
        cond: the family's conditioning, per record (B, ...) plus per-image entries (B, K, ...) such as
            SDXL's time ids (``family.per_image_cond_keys``); prompt dropout is already applied.
        empty_cond: the empty prompt's conditioning, a batch of one; set when the procedure declares
            ``needs_empty_cond`` (or under prompt dropout), else None.
        labels: (B, K) 1 = desirable, 0 = undesirable, or None.
        scores: (B, K) reward scores, higher is better, or None.
        generator: CPU generator for every random draw of the step.
        device: where the model runs.
        timesteps: ``train.timesteps`` (interval, density, weighting), for procedures that sample timesteps.
        global_mean: tensor -> its mean over the global batch (all processes), e.g. KTO's reference point.
        online, work: for online objectives (data kind ``prompts``), the rounds and this micro-step's work item
            (``diffalign.online.rounds``); None otherwise.
    """

    objective: Objective
    params: object
    family: Family
    components: DiffusionComponents
    model: torch.nn.Module
    reference: Reference | None
    latents: torch.Tensor | None
    cond: dict[str, torch.Tensor] | None
    empty_cond: dict[str, torch.Tensor] | None
    labels: torch.Tensor | None
    scores: torch.Tensor | None
    generator: torch.Generator
    device: torch.device
    timesteps: TimestepConfig | None = None
    global_mean: Callable[[torch.Tensor], torch.Tensor] = local_mean
    online: Any = None  # online objectives: the run's ``OnlineRounds`` (rounds sampled from the model)
    work: Any = None  # ... and this micro-step's ``WorkItem`` (round, inner epoch, batch position, trained slot)


@dataclass(frozen=True)
class StepProcedure:
    """A registered training step.

    Args:
        run: ``(StepContext) -> ObjectiveOutput``.
        needs_empty_cond: the procedure uses ``context.empty_cond`` (guidance against the empty prompt), so the
            trainer encodes the empty prompt once before training.
    """

    run: Callable[[StepContext], ObjectiveOutput]
    needs_empty_cond: bool = False


STEPS: Registry[StepProcedure] = Registry("training step", "Objective.step")


def errors_step(context: StepContext) -> ObjectiveOutput:
    """``denoising_errors`` then the objective's ``loss_fn``: errors (B, K) for the policy and the reference."""
    errors = denoising_errors(context.family, context.components, context.model, context.latents, context.cond,
                              context.generator, context.device, context.reference, context.timesteps,
                              with_residuals=context.objective.needs_residuals)
    inputs = ObjectiveInputs(policy_err=errors.policy, ref_err=errors.reference, residuals=errors.residuals,
                             labels=context.labels, scores=context.scores, global_mean=context.global_mean)
    return context.objective(inputs, context.params)


STEPS.register("errors", StepProcedure(errors_step),
               description="per-sample denoising errors of the policy and the reference, then the objective's loss",
               source="Wallace et al. 2023, arXiv 2311.12908 (Diffusion-DPO's training step)")
