"""Validation images: fixed prompts and seeds, rendered with the current weights into one PNG grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffalign.images import labelled_grid
from diffalign.training.metrics import tracker_or_none


@torch.no_grad()
def render_validation(components, denoiser, log_cfg, device, path: Path) -> Image.Image:
    """One row per prompt, one column per seed."""
    pipeline = components.family.build_pipeline(components, denoiser)
    pipeline.set_progress_bar_config(disable=True)
    rows = []
    was_training = denoiser.training
    denoiser.eval()
    try:
        for prompt in log_cfg.validation_prompts:  # one batched call per prompt, a generator per seed
            seeds = log_cfg.validation_seeds
            result = pipeline(
                [prompt] * len(seeds),
                num_inference_steps=log_cfg.validation_inference_steps,
                guidance_scale=(log_cfg.validation_guidance_scale if log_cfg.validation_guidance_scale is not None
                                else components.family.default_guidance_scale),
                height=components.resolution,
                width=components.resolution,
                generator=[torch.Generator(device="cpu").manual_seed(seed) for seed in seeds],
            )
            rows.append(result.images)
    finally:
        denoiser.train(was_training)
    grid = labelled_grid(rows, row_labels=list(log_cfg.validation_prompts))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid


def log_validation(accelerator, components, model, cfg, step: int, output_dir: Path) -> None:
    """The main process renders ``samples/step-<step>.png`` and sends it to tensorboard when in use."""
    if not accelerator.is_main_process:
        return
    path = output_dir / "samples" / f"step-{step}.png"
    # Under mixed precision the pipeline's parts differ in dtype (bf16 denoiser and text encoders, an fp32 VAE
    # for SDXL and SD3): autocast lets them meet, as in training.
    with accelerator.autocast():
        grid = render_validation(components, model, cfg.log, accelerator.device, path)
    tracker = tracker_or_none(accelerator, "tensorboard")
    if tracker is not None:
        tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
