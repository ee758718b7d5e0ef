"""The Self-NPO training step (``objective.name=self_npo``); the algorithm is in ``diffalign.objectives.self_npo``.

``self_npo_step`` takes keyword arguments family, components, model (the student), reference (the EMA teacher),
latents, cond, empty_cond, generator, device and params (``SelfNPOParams``) and returns an ``ObjectiveOutput``.
Registered as the step procedure ``"self_npo"`` in ``diffalign.training.steps.STEPS`` (it needs the empty
prompt's conditioning for guidance); the trainer calls it through ``StepContext`` like any other step.

Every random draw (grid index, noise, t', re-noise) comes from ``generator`` (CPU) in a fixed order, so a resumed
run draws exactly what an uninterrupted one would have. The schedule arithmetic runs in float32; the networks see
inputs in the latents' dtype. The model family supplies the noise levels (``family.noise_levels``) and the reading
of its predictions (``family.split_prediction``), so any prediction type works.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.errors import ConfigError
from diffalign.objectives.base import ObjectiveInputError, ObjectiveOutput
from diffalign.objectives.self_npo import (
    SelfNPOParams,
    ddim_step,
    guided_prediction,
    pseudo_huber,
    renoise_variance_exploding,
)
from diffalign.training.step import expand_cond, image_major
from diffalign.training.steps import STEPS, StepContext, StepProcedure


@dataclass
class TeacherTargets:
    """What the teacher produced for one batch of N = K * B images."""

    t_start: torch.Tensor  # (N,) long: t_s, on the DDIM grid
    t_end: torch.Tensor  # (N,) long: t_e = max(t_s - stride * teacher_steps, 0)
    x_prev: torch.Tensor  # (N, C, h, w) float32: the teacher's sample at t_e
    target: torch.Tensor  # (N, C, h, w) float32: the teacher's guided x0 prediction at t_e


def ddim_grid(num_train_timesteps: int, grid_steps: int) -> tuple[torch.Tensor, int]:
    """The teacher's DDIM timesteps (stride - 1, 2 stride - 1, ..., grid_steps * stride - 1) and the stride."""
    if grid_steps > num_train_timesteps:
        raise ConfigError(f"objective.self_npo.grid_steps={grid_steps} exceeds the {num_train_timesteps} training "
                         "timesteps of the model")
    stride = num_train_timesteps // grid_steps
    return torch.arange(1, grid_steps + 1) * stride - 1, stride


def levels_at(family, components, timesteps: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of the family's schedule, each shaped (N, 1, 1, 1) on ``device``."""
    alpha, sigma = family.noise_levels(components, timesteps.cpu())
    return alpha.to(device).view(-1, 1, 1, 1), sigma.to(device).view(-1, 1, 1, 1)


def teacher_prediction(family, teacher, x: torch.Tensor, t: torch.Tensor, cond: dict, uncond: dict, w: float,
                       dtype) -> torch.Tensor:
    """The guided raw prediction cond + w (cond - uncond), float32; one batched call, one branch when w is 0 or -1."""
    x_in = x.to(dtype)
    if w == 0:
        return family.predict(teacher, x_in, t, cond).float()
    if w == -1:
        return family.predict(teacher, x_in, t, uncond).float()
    both = {name: torch.cat([cond[name], uncond[name]]) for name in cond}
    pred_cond, pred_uncond = family.predict(teacher, torch.cat([x_in, x_in]), torch.cat([t, t]), both).float().chunk(2)
    return guided_prediction(pred_cond, pred_uncond, w)


@torch.no_grad()
def teacher_targets(family, components, teacher, x0: torch.Tensor, cond: dict, uncond: dict,
                    generator: torch.Generator, device, params: SelfNPOParams) -> TeacherTargets:
    """Steps 1-2: noise x0 to t_s on the grid, run the teacher's guided DDIM steps down to t_e, predict x0 there."""
    grid, stride = ddim_grid(family.num_train_timesteps(components), params.grid_steps)
    count = x0.shape[0]
    index = torch.randint(0, params.grid_steps, (count,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    t_start = grid[index]
    alpha, sigma = levels_at(family, components, t_start, device)
    x = alpha * x0.float() + sigma * noise
    t = t_start.clone()
    w = params.guidance_weight
    for _ in range(params.teacher_steps):
        t_prev = torch.clamp(t - stride, min=0)
        moving = t_prev < t  # samples already at t = 0 stay there
        if not moving.any():
            break
        pred = teacher_prediction(family, teacher, x, t.to(device), cond, uncond, w, x0.dtype)
        x0_hat, eps_hat = family.split_prediction(components, pred, x, alpha, sigma)
        alpha_prev, sigma_prev = levels_at(family, components, t_prev, device)
        x = torch.where(moving.to(device).view(-1, 1, 1, 1), ddim_step(x0_hat, eps_hat, alpha_prev, sigma_prev), x)
        t, alpha, sigma = t_prev, alpha_prev, sigma_prev
    pred = teacher_prediction(family, teacher, x, t.to(device), cond, uncond, w, x0.dtype)
    target, _ = family.split_prediction(components, pred, x, alpha, sigma)
    return TeacherTargets(t_start=t_start, t_end=t, x_prev=x, target=target)


def self_npo_step(*, family, components, model, reference, latents: torch.Tensor, cond: dict, empty_cond: dict,
                  generator: torch.Generator, device, params: SelfNPOParams) -> ObjectiveOutput:
    """One Self-NPO step for latents (B, K, C, h, w): the pseudo-Huber loss of the student's x0 at t' against the
    teacher's x0 at t_e. The teacher is ``reference.model_for_pass(model)`` (the EMA), run under no_grad; the
    student forward through ``model`` (possibly DDP-wrapped) is the only one with gradients."""
    if reference is None:
        raise ObjectiveInputError("objective self_npo needs a teacher: objective.reference must be ema (the "
                                  "default), lora_disabled or frozen_copy, not none")
    if empty_cond is None:
        raise ObjectiveInputError("objective self_npo needs the empty-prompt conditioning (empty_cond) for guidance")
    k = latents.shape[1]
    x0 = image_major(latents)  # as denoising_errors orders them
    per_image_keys = family.per_image_cond_keys
    cond = expand_cond(cond, k, per_image_keys)
    count = x0.shape[0]
    # The empty prompt replaces the prompt's conditioning; the rest (SDXL's per-image time ids, FLUX's
    # guidance value) is kept.
    uncond = {name: value for name, value in cond.items() if name not in empty_cond}
    uncond.update({name: value.to(device=device, dtype=cond[name].dtype).expand(count, *value.shape[1:])
                   for name, value in empty_cond.items()})
    with reference.model_for_pass(model) as teacher:
        teach = teacher_targets(family, components, teacher, x0, cond, uncond, generator, device, params)

    # Step 3: t' uniform on the integers in (t_e, T - 1], and the variance-exploding re-noise from t_e to t'.
    num_train_timesteps = family.num_train_timesteps(components)
    span = (num_train_timesteps - 1 - teach.t_end).float()
    t_student = teach.t_end + 1 + (torch.rand(count, generator=generator) * span).long()
    t_student = torch.minimum(t_student, torch.full_like(t_student, num_train_timesteps - 1))
    z = torch.randn(x0.shape, generator=generator).to(device)
    alpha_s, sigma_s = levels_at(family, components, t_student, device)
    alpha_e, sigma_e = levels_at(family, components, teach.t_end, device)  # t_e < t' <= T - 1: alpha_e > 0
    x_student = renoise_variance_exploding(teach.x_prev, alpha_e, sigma_e, alpha_s, sigma_s, z)

    # Steps 4-5: the student's x0 at t' (the one call with gradients) against the teacher's target.
    pred = family.predict(model, x_student.to(latents.dtype), t_student.to(device), cond).float()
    x0_student, _ = family.split_prediction(components, pred, x_student, alpha_s, sigma_s)
    loss = pseudo_huber(x0_student, teach.target, params.huber_c)
    metrics = {
        "loss": loss.detach(),
        "t_start": teach.t_start.float().mean(),
        "t_end": teach.t_end.float().mean(),
        "t_student": t_student.float().mean(),
        "target_mse_to_x0": ((teach.target - x0.float()) ** 2).mean(),  # how far the teacher pulls from the data
    }
    return ObjectiveOutput(loss=loss, metrics=metrics)


def run_self_npo_step(context: StepContext) -> ObjectiveOutput:
    """The ``"self_npo"`` step procedure: ``self_npo_step`` on the context's batch."""
    return self_npo_step(family=context.family, components=context.components, model=context.model,
                         reference=context.reference, latents=context.latents, cond=context.cond,
                         empty_cond=context.empty_cond, generator=context.generator, device=context.device,
                         params=context.params)


STEPS.register("self_npo", StepProcedure(run_self_npo_step, needs_empty_cond=True),
               description="Self-NPO: the EMA teacher's guided DDIM steps, re-noising, pseudo-Huber loss in x0 space",
               source="G-U-N/Diffusion-NPO (Self-NPO/train.py, train_xl.py)")
