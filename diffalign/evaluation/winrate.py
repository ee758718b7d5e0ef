"""Win rate of an aligned setup against the base, under one reward, with a bootstrap 95% interval.

Protocol: both setups sample the same prompts with the same seeds; image i of the aligned setup is compared
with image i of the base (scores are only comparable within one prompt). A win is r(aligned) > r(base); a tie
counts half, so identical setups score exactly 0.5.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from diffalign.errors import DataError


@dataclass
class WinRate:
    rate: float
    low: float  # bootstrap interval
    high: float
    wins: int
    ties: int
    n: int
    mean_aligned: float
    mean_base: float

    def as_dict(self) -> dict:
        return asdict(self)


def outcomes(aligned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 win, 0.5 tie, 0 loss.

    Args:
        aligned, base: ``(n,)`` scores of the same n (prompt, seed) pairs under one reward.

    Returns:
        ``(n,)`` float outcomes. Raises ``DataError`` when the shapes differ or are not 1-d.
    """
    if aligned.shape != base.shape or aligned.ndim != 1:
        raise DataError(f"paired scores must be two 1-d tensors of one length, got {tuple(aligned.shape)} "
                         f"and {tuple(base.shape)}")
    return (aligned > base).float() + 0.5 * (aligned == base).float()


def bootstrap_interval(values: torch.Tensor, confidence: float = 0.95, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (deterministic for a seed)."""
    if values.numel() == 0:
        raise DataError("no values to bootstrap")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, values.numel(), (resamples, values.numel()), generator=generator)
    means = values.float()[picks].mean(dim=1)
    tail = (1.0 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail]))
    return float(low), float(high)


def compare(aligned: torch.Tensor, base: torch.Tensor, confidence: float = 0.95, resamples: int = 10_000,
            seed: int = 0) -> WinRate:
    """Win rate of ``aligned`` over ``base`` (paired scores under one reward) with its bootstrap interval."""
    result = outcomes(aligned, base)
    low, high = bootstrap_interval(result, confidence, resamples, seed)
    return WinRate(rate=float(result.mean()), low=low, high=high, wins=int((result == 1).sum()),
                   ties=int((result == 0.5).sum()), n=result.numel(), mean_aligned=float(aligned.float().mean()),
                   mean_base=float(base.float().mean()))
