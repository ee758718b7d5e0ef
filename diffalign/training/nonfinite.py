"""Guards that keep non-finite values out of the weights: every process agrees on each decision, or DDP's
collective calls would fall out of step and hang."""

from __future__ import annotations

import torch


def apply_update(accelerator, optimizer, lr_scheduler, trainable, max_grad_norm: float) -> bool:
    """Clip the gradients, then step the optimizer and lr scheduler only when the gradient norm is finite on
    every process. Returns whether the update was applied.

    A loss can be finite while its gradient overflows (a large learning rate blows the weights up, the next
    step's gradient is inf); stepping then would write NaN into every weight. Under fp16 accelerate's grad scaler
    makes that call itself (skipping the step and lowering its scale), so its verdict is taken too."""
    grad_norm = accelerator.clip_grad_norm_(trainable, max_grad_norm)
    finite = all_processes(accelerator, grad_norm is None or bool(torch.isfinite(grad_norm)))
    if not finite and accelerator.scaler is None:
        return False
    optimizer.step()
    if accelerator.scaler is not None and (optimizer.step_was_skipped or not finite):
        return False
    lr_scheduler.step()
    return True


def weights_finite(params) -> bool:
    return bool(torch.stack([torch.isfinite(param).all() for param in params]).all())


def all_processes(accelerator, flag: bool) -> bool:
    """True when ``flag`` holds on every process: steps are skipped or taken everywhere at once, or DDP's
    gradient all-reduce would hang."""
    count = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum")
    return int(count.item()) == accelerator.num_processes
