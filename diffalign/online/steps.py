"""The online step procedures, registered in ``diffalign.training.steps.STEPS``: ``"grpo"`` (GRPO and Pref-GRPO)
and ``"nft"`` (DiffusionNFT). Each micro-step trains one step of each sample of one sampling batch; the round is
sampled (``OnlineRounds.ensure``) at its first micro-step.

- ``grpo``: the round is sampled with the current policy. The micro-step recomputes the policy's Gaussian for each
  sample's trained step (same batch, same inputs as sampling: at the first inner epoch, before any update, the
  ratio is exactly 1), then the clipped surrogate; with ``kl_coef`` > 0 the base (LoRA disabled) gives the KL.
- ``nft``: the round is sampled with the old policy (the EMA reference). The micro-step noises each clean sample
  to its trained timestep with fresh noise from the step generator, runs the policy (with grad), the old policy
  and, with ``kl_coef`` > 0, the base, all without CFG, and forms NFT's loss.
"""

from __future__ import annotations

import contextlib

import torch

from diffalign.errors import ConfigError
from diffalign.objectives.base import ObjectiveOutput
from diffalign.online.losses import gaussian_kl, grpo_loss, nft_loss
from diffalign.online.sampling import gaussian_log_prob, step_gaussian
from diffalign.training.lora import adapters_disabled
from diffalign.training.reference import unwrap
from diffalign.training.steps import STEPS, StepContext, StepProcedure


def base_model(model, kl_coef: float, reference=None):
    """The base for the KL term: ``reference`` (GRPO with ``objective.reference=frozen_copy`` or
    ``lora_disabled``) when given, else the policy with its LoRA disabled. Raises ``ConfigError`` for full
    fine-tuning without a frozen copy."""
    if reference is not None:
        return reference.model_for_pass(model)
    module = unwrap(model)
    if not hasattr(module, "disable_adapters") or not getattr(module, "peft_config", None):
        raise ConfigError(f"kl_coef={kl_coef} compares the policy with the base, which is the LoRA disabled: with "
                          "lora.enabled=false set objective.reference=frozen_copy (GRPO) or kl_coef=0")
    return adapters_disabled(module)


def grpo_step(context: StepContext) -> ObjectiveOutput:
    """One GRPO micro-step: log p of each sample's trained step under the policy, the clipped surrogate and KL."""
    rounds, item, params = context.online, context.work, context.params
    round_ = rounds.ensure(item.round, lambda: contextlib.nullcontext(unwrap(context.model)))
    rows = rounds.rows(item.position, round_, item.epoch)
    steps = round_.steps[item.epoch][rows, item.slot]
    device, latents = context.device, round_.trajectory.latents
    x, x_next = latents[rows.to(device), steps.to(device)], latents[rows.to(device), (steps + 1).to(device)]
    cond = {k: v[rows.to(v.device)] for k, v in round_.cond.items()}
    uncond = {k: v[rows.to(v.device)] for k, v in round_.uncond.items()} if round_.uncond is not None else None
    noisy = torch.ones(len(rows), dtype=torch.bool)

    def gaussian(model):
        return step_gaussian(context.family, context.components, model, rounds.grid, rounds.sampler, x, steps, cond,
                             uncond, noisy, rounds.weight_dtype)

    step = gaussian(context.model)
    log_prob = gaussian_log_prob(x_next, step)
    old = round_.trajectory.log_probs[rows.to(device), steps.to(device)]
    loss, metrics = grpo_loss(log_prob, old, round_.advantages[rows.to(device)], params.clip_range,
                              params.advantage_clip)
    if params.kl_coef > 0:
        with torch.no_grad(), base_model(context.model, params.kl_coef, context.reference) as base:
            reference = gaussian(base)
        kl = gaussian_kl(step.mean, reference.mean, step.std).mean()
        loss = loss + params.kl_coef * kl
        metrics["kl"] = kl.detach()
    metrics["policy_loss"] = loss.detach()
    return ObjectiveOutput(loss=loss, metrics={**metrics, **tensors(round_.pop_metrics(), device)})


def nft_step(context: StepContext) -> ObjectiveOutput:
    """One DiffusionNFT micro-step on the clean samples of one sampling batch at their trained timesteps."""
    rounds, item, params = context.online, context.work, context.params
    reference = context.reference
    round_ = rounds.ensure(item.round, lambda: reference.model_for_pass(context.model))
    rows = rounds.rows(item.position, round_, item.epoch)
    steps = round_.steps[item.epoch][rows, item.slot]
    family, components, device, dtype = context.family, context.components, context.device, rounds.weight_dtype
    x0 = round_.trajectory.samples[rows.to(device)]
    timesteps = rounds.grid.timesteps[steps].to(device)
    noise = torch.randn(x0.shape, generator=context.generator).to(device)
    x_t, _ = family.noisy_input_and_target(components, x0, noise, timesteps)
    alpha, sigma = family.noise_levels(components, timesteps.cpu())
    alpha, sigma = alpha.to(device).view(-1, 1, 1, 1), sigma.to(device).view(-1, 1, 1, 1)
    cond = {k: v[rows.to(v.device)] for k, v in round_.cond.items()}
    x_in = x_t.to(dtype)
    pred = family.predict(context.model, x_in, timesteps, cond).float()
    with torch.no_grad(), reference.model_for_pass(context.model) as old_model:
        old_pred = family.predict(old_model, x_in, timesteps, cond).float()

    def clean(raw: torch.Tensor) -> torch.Tensor:
        return family.split_prediction(components, raw, x_t.float(), alpha, sigma)[0]

    loss, metrics = nft_loss(pred, old_pred, x0.float(), round_.advantages[rows.to(device)], params.beta,
                             params.advantage_clip, clean)
    if params.kl_coef > 0:
        with torch.no_grad(), base_model(context.model, params.kl_coef) as base:
            base_pred = family.predict(base, x_in, timesteps, cond).float()
        kl = ((pred - base_pred) ** 2).mean()
        loss = loss + params.kl_coef * kl
        metrics["kl"] = kl.detach()
    metrics["policy_loss"] = loss.detach()
    return ObjectiveOutput(loss=loss, metrics={**metrics, **tensors(round_.pop_metrics(), device)})


def tensors(metrics: dict[str, float], device) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(float(value), device=device) for name, value in metrics.items()}


STEPS.register("grpo", StepProcedure(grpo_step),
               description="online: sample a round with the policy, score, group-relative advantages, clipped ratio "
                           "of the sampler's Gaussian steps (+ KL to the base)",
               source="Black et al. 2023 (DDPO); Liu et al. 2025 (Flow-GRPO); Wang et al. 2025 (Pref-GRPO)")
STEPS.register("nft", StepProcedure(nft_step),
               description="online: sample a round with the old policy, score, DiffusionNFT's implicit positive / "
                           "negative denoising loss (+ KL to the base)",
               source="Zheng et al. 2025 (DiffusionNFT, arXiv 2509.16117)")
