"""The arithmetic of one training step, separate from the loop so it can be tested on its own."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def step_generator(seed: int, micro_step: int, process_index: int) -> torch.Generator:
    """Noise, timesteps and prompt dropout come from a generator seeded by (seed, micro-step, rank), so a
    resumed run draws exactly what an uninterrupted one would have drawn."""
    return torch.Generator().manual_seed((seed * 1_000_003 + micro_step) * 1_009 + process_index)


def per_sample_errors(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.ndim)))


def image_major(tensor: torch.Tensor) -> torch.Tensor:
    """(B, K, ...) -> (K*B, ...) in [image 0 of every record; image 1 of every record; ...] order: for pairs,
    winners then losers. ``.view(k, batch).T`` on a (K*B,) result goes back to (B, K)."""
    return tensor.transpose(0, 1).reshape(tensor.shape[0] * tensor.shape[1], *tensor.shape[2:])


def expand_cond(cond: dict[str, torch.Tensor], k: int, per_image_keys=()) -> dict[str, torch.Tensor]:
    """Conditioning for the K*B latents in [image 0 of every record; image 1 of every record; ...] order.

    Per-prompt tensors (B, ...) are repeated K times; per-image ones (``per_image_keys``, shaped (B, K, ...),
    e.g. SDXL's time ids) are reordered image-major to match.
    """
    return {name: value.transpose(0, 1).flatten(0, 1) if name in per_image_keys
            else value.repeat(k, *([1] * (value.ndim - 1))) for name, value in cond.items()}


@dataclass
class StepErrors:
    policy: torch.Tensor  # (B, K)
    reference: torch.Tensor | None  # (B, K)
    residuals: torch.Tensor | None  # (B, K, C, h, w), detached
    timesteps: torch.Tensor  # (B,)


def denoising_errors(family, components, model, latents, cond, generator, device, reference=None,
                     timestep_cfg=None, with_residuals: bool = False) -> StepErrors:
    """Per-sample denoising errors of the policy (and the reference) on one shared noisy input per record.

    Each record's K images share one noise draw and one timestep (drawn from ``generator`` in that order).
    Per-timestep weights (``train.timesteps.weighting``) multiply both the policy and the reference errors.

    Args:
        family, components: the model family and its loaded parts.
        model: the policy denoiser (possibly DDP-wrapped); its forward is the one with gradients.
        latents: (B, K, C, h, w).
        cond: per-record conditioning (B, ...) plus the family's per-image entries (B, K, ...) (``expand_cond``).
        generator: CPU generator for the noise and the timesteps.
        reference: a strategy from ``training.reference``; None runs no reference pass.
        timestep_cfg: ``train.timesteps`` (interval, density, weighting); None: the family's defaults.
        with_residuals: also return the detached residuals pred - target.

    Returns:
        ``StepErrors``: policy (B, K), reference (B, K) or None, residuals (B, K, C, h, w) or None,
        timesteps (B,).
    """
    batch, k = latents.shape[:2]
    noise = torch.randn((batch, 1, *latents.shape[2:]), generator=generator).to(device).expand_as(latents)
    timesteps = family.sample_timesteps(components, batch, generator, timestep_cfg).to(device)
    x0, eps = image_major(latents), image_major(noise)
    t = timesteps.repeat(k)
    per_image_keys = family.per_image_cond_keys
    cond = expand_cond(cond, k, per_image_keys)
    x_t, target = family.noisy_input_and_target(components, x0, eps, t)
    pred = family.predict(model, x_t, t, cond)
    policy_err = per_sample_errors(pred, target).view(k, batch).T
    residuals = None
    if with_residuals:
        residuals = (pred.detach().float() - target.float()).view(k, batch, *pred.shape[1:]).transpose(0, 1)
    ref_err = None
    if reference is not None:
        with torch.no_grad(), reference.model_for_pass(model) as reference_model:
            ref_pred = family.predict(reference_model, x_t, t, cond)
            ref_err = per_sample_errors(ref_pred, target).view(k, batch).T
    weights = family.timestep_weights(components, timesteps, timestep_cfg) if timestep_cfg is not None else None
    if weights is not None:
        weights = weights.to(device).view(batch, 1)
        policy_err = policy_err * weights
        ref_err = ref_err * weights if ref_err is not None else None
    return StepErrors(policy_err, ref_err, residuals, timesteps)


def batch_tensors(batch: dict, family, components, device, weight_dtype, empty_cond, prompt_dropout: float,
                  generator: torch.Generator):
    """Latents (B, K, C, h, w) and conditioning for a collated batch, cached or not, with prompt dropout.

    Prompt dropout replaces the prompt's conditioning only; per-image conditioning (SDXL's time ids, from the
    batch's ``image_sizes``) describes the image and is kept.
    """
    if "latents" in batch:
        latents = batch["latents"].to(device)
        cond = {name: value.to(device) for name, value in batch["cond"].items()}
    else:  # uncached: encode every step, as the diffusers reference script does
        pixels = batch["pixels"]
        latents = family.encode_images(components, pixels.flatten(0, 1)).float()
        latents = latents.view(*pixels.shape[:2], *latents.shape[1:])
        cond = family.encode_prompts(components, batch["prompts"])
    if empty_cond is not None:
        drop = (torch.rand(latents.shape[0], generator=generator) < prompt_dropout).to(device)
        cond = {name: torch.where(drop.view(-1, *[1] * (value.ndim - 1)), empty_cond[name].to(value.dtype), value)
                for name, value in cond.items()}
    if "image_sizes" in batch:
        cond.update(family.image_cond(components, batch["image_sizes"].to(device)))
    cond.update(family.run_cond(components, latents.shape[0], device))
    return latents.to(weight_dtype), {name: value.to(weight_dtype) for name, value in cond.items()}
