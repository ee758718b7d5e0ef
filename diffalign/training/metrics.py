"""Logged quantities: means over a logging window and over processes, and the hyperparameters trackers record."""

from __future__ import annotations

import torch

from diffalign.config import Config


class MetricWindow:
    """Sums of each logged quantity over the micro-steps since the last log (finite ones only), reduced to means
    over the window and over processes when logged. A quantity reported on some micro-steps only (an online
    round's rewards, once per round) is the mean over the micro-steps that reported it."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        """One micro-step's scalars (``loss`` and the objective's metrics)."""
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
            self.counts[name] = self.counts.get(name, 0) + 1

    def reduce(self) -> dict[str, float]:
        """Mean of each quantity over the window and over processes, by name; the window starts afresh.
        Every process must report the same names (they run the same schedule)."""
        sums, counts = self.sums, self.counts
        self.sums, self.counts = {}, {}
        if not sums:
            return {}
        names = sorted(sums)
        local = torch.tensor([sums[n] / counts[n] for n in names], device=self.accelerator.device)
        mean = self.accelerator.reduce(local, reduction="mean")
        return {name: float(value) for name, value in zip(names, mean)}


def flat_hparams(cfg: Config) -> dict:
    """The config as ``section.key -> scalar`` for the trackers' hyperparameter tables."""
    flat = {}
    for section, values in cfg.to_dict().items():
        if not isinstance(values, dict):  # e.g. the segments list
            flat[section] = str(values)
            continue
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


def tracker_or_none(accelerator, name: str):
    """The accelerate tracker ``name`` (e.g. tensorboard) when it is in use, else None."""
    try:
        return accelerator.get_tracker(name, unwrap=False) if accelerator.log_with else None
    except (ValueError, KeyError):
        return None
