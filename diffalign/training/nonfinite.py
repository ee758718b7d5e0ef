"""Guards that keep non-finite values out of the weights: every process agrees on each decision, or DDP's
collective calls would fall out of step and hang. ``NonFiniteGuard`` is the loop's policy (skip, count, stop)."""

from __future__ import annotations

from pathlib import Path

import torch

from diffalign.errors import TrainingStopped
from diffalign.logs import get_logger
from diffalign.training.checkpoint import kept_checkpoint_note

logger = get_logger(__name__)


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


class NonFiniteGuard:
    """The loop's non-finite policy: skip a step whose loss or gradient is not finite on some process, stop after
    ``train.max_consecutive_nonfinite`` skips in a row, and stop at once when an applied update made the weights
    non-finite. Finite checkpoints written before a stop are kept (their folder is named in the message).

    Per optimizer step: ``backward`` for every micro-step of the accumulation window, ``apply_update`` at the
    window's end, then ``end_step``.

    Attributes:
        window_finite: every loss of the current accumulation window was finite on every process.
        consecutive_bad: optimizer steps skipped in a row (0 after an applied update).
        skipped_steps: optimizer steps skipped in the whole run (resumed runs start from the checkpoint's count).

    Args:
        trainable: the trained parameters.
        train_cfg: the ``train`` section (``max_consecutive_nonfinite``, ``max_grad_norm``).
        output_dir: the run folder, whose newest finite checkpoint a stop message names.
        skipped_steps: the count so far (a resumed run's, from its checkpoint).
    """

    def __init__(self, accelerator, trainable, train_cfg, output_dir: Path, skipped_steps: int = 0):
        self.accelerator, self.trainable, self.output_dir = accelerator, trainable, output_dir
        self.max_consecutive, self.max_grad_norm = train_cfg.max_consecutive_nonfinite, train_cfg.max_grad_norm
        self.window_finite, self.consecutive_bad, self.skipped_steps, self.skip_reason = True, 0, skipped_steps, ""

    def backward(self, loss: torch.Tensor) -> bool:
        """Backpropagate ``loss`` when it is finite on every process, and return True; otherwise mark the window
        bad and backpropagate a zero loss over the trainable weights, which keeps DDP's collective calls in step
        on every process."""
        if all_processes(self.accelerator, bool(torch.isfinite(loss))):
            self.accelerator.backward(loss)
            return True
        self.window_finite = False
        self.accelerator.backward(sum(p.sum() for p in self.trainable) * 0.0)
        return False

    def apply_update(self, optimizer, lr_scheduler, step: int) -> bool:
        """At the end of an accumulation window: the optimizer step when the window's losses and the gradient
        norm are finite (``apply_update``). Returns whether it was applied. Raises ``TrainingStopped`` when the
        update left the weights non-finite (``step``: the optimizer step being taken, from 1)."""
        applied = self.window_finite and apply_update(self.accelerator, optimizer, lr_scheduler, self.trainable,
                                                      self.max_grad_norm)
        if applied:
            if not all_processes(self.accelerator, weights_finite(self.trainable)):
                raise TrainingStopped(
                    f"step {step}: the update made the trained weights non-finite; stopped "
                    f"without saving them. {kept_checkpoint_note(self.output_dir)} Check "
                    "train.learning_rate, train.max_grad_norm and train.adam_epsilon.")
            self.consecutive_bad = 0
        else:
            self.skipped_steps += 1
            self.consecutive_bad += 1
            self.skip_reason = "loss" if not self.window_finite else "gradient norm"
        return applied

    def end_step(self, step: int) -> None:
        """After optimizer step ``step``: say so when it was skipped, stop after too many skips in a row, and
        open a new accumulation window."""
        if self.consecutive_bad:
            logger.info(f"step {step}: non-finite {self.skip_reason}, step skipped ({self.consecutive_bad} in a row)")
        if self.consecutive_bad >= self.max_consecutive:
            raise TrainingStopped(
                f"stopped at step {step}: {self.consecutive_bad} steps in a row skipped for a non-finite loss or "
                f"gradient. {kept_checkpoint_note(self.output_dir)} Lower train.learning_rate (a resume uses the new "
                "value) or check the data; if the kept weights have already grown too far, start afresh."
            )
        self.window_finite = True

    def report(self, global_step: int) -> None:
        """At the end of the loop: how many steps were skipped, if any."""
        if self.skipped_steps:
            logger.info(f"{self.skipped_steps} of {global_step} steps were skipped for a non-finite loss or gradient "
                        "(skipped_steps in run_info.json)")


def check_final_weights(accelerator, trainable, output_dir: Path) -> None:
    """Before saving: the trained weights are finite on every process (never false while the guards hold)."""
    if not all_processes(accelerator, weights_finite(trainable)):
        raise TrainingStopped(f"the trained weights are non-finite; nothing was saved. {kept_checkpoint_note(output_dir)}")
