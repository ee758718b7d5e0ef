"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from diffalign.errors import ConfigError


def build_optimizer(params, train_cfg, learning_rate: float) -> torch.optim.Optimizer:
    kwargs = dict(
        lr=learning_rate,
        betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
        weight_decay=train_cfg.adam_weight_decay,
        eps=train_cfg.adam_epsilon,
    )
    if train_cfg.use_8bit_adam:
        try:  # optional (diffalign[bitsandbytes]), imported only when asked for
            import bitsandbytes as bnb
        except ImportError as error:
            raise ConfigError("train.use_8bit_adam=true needs bitsandbytes: pip install 'diffalign[bitsandbytes]'") from error
        return bnb.optim.AdamW8bit(params, **kwargs)
    params = list(params)
    # The fused CUDA kernel updates every tensor in one launch instead of several per tensor (PyTorch's AdamW
    # docs); it needs every parameter on CUDA, in a floating dtype.
    fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, fused=fused, **kwargs)


def effective_learning_rate(train_cfg, num_processes: int) -> float:
    """``train.scale_lr`` multiplies by the global batch, as the original Diffusion-DPO recipe does
    (lr 1e-8 x 2048 pairs ~= 2e-5)."""
    if not train_cfg.scale_lr:
        return train_cfg.learning_rate
    return train_cfg.learning_rate * train_cfg.batch_size * train_cfg.gradient_accumulation_steps * num_processes


def build_lr_scheduler(optimizer, train_cfg, num_processes: int):
    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
    try:
        return get_scheduler(
            train_cfg.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=train_cfg.lr_warmup_steps * num_processes,
            num_training_steps=train_cfg.max_steps * num_processes,
        )
    except ValueError as error:
        raise ConfigError(f"train.lr_scheduler={train_cfg.lr_scheduler!r}: {error}") from error


def set_base_learning_rate(lr_scheduler, learning_rate: float) -> float | None:
    """Make ``learning_rate`` the schedule's base lr from the current step on (after a resume, whose optimizer
    and scheduler state carry the lr they were saved with). Returns the previous base lr when it changed.

    diffusers' schedulers are ``LambdaLR``s: lr = base_lr x lambda(step), so the schedule's shape (warmup, decay)
    goes on from where it was, scaled to the new base."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # unwrap accelerate's AcceleratedScheduler
    previous = list(scheduler.base_lrs)
    if all(abs(value - learning_rate) <= 1e-12 * max(abs(value), abs(learning_rate)) for value in previous):
        return None
    scheduler.base_lrs = [learning_rate] * len(previous)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return previous[0]
