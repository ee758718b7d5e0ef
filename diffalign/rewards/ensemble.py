"""Combining several rewards: a weighted mean of per-prompt z-scores, and a majority vote over pairs.

Raw scores of different rewards live on different scales (HPS ~0.28, PickScore ~21, aesthetic ~5), and scores
are only comparable within one prompt, so each reward is standardised within each prompt's group of images
before averaging. A group of one image (or with zero spread) contributes z = 0.
"""

from __future__ import annotations

import torch

from diffalign.errors import ConfigError


def per_prompt_zscores(scores: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """(N,) scores -> (N,) z-scores computed within each prompt's images."""
    z = torch.zeros_like(scores, dtype=torch.float32)
    groups: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(index)
    for indices in groups.values():
        values = scores[indices].float()
        if len(indices) < 2:
            continue
        std = values.std(unbiased=False)
        if std > 0:
            z[indices] = (values - values.mean()) / std
    return z


def zscore_ensemble(scores: dict[str, torch.Tensor], prompts: list[str],
                    weights: dict[str, float] | None = None) -> torch.Tensor:
    """Weighted mean over rewards of per-prompt z-scores; weights default to 1 each."""
    weights = weights or {}
    unknown = set(weights) - set(scores)
    if unknown:
        raise ConfigError(f"weights given for rewards that were not scored: {sorted(unknown)}")
    total = sum(weights.get(name, 1.0) for name in scores)
    if total <= 0:
        raise ConfigError("ensemble weights must sum to a positive number")
    combined = sum(weights.get(name, 1.0) * per_prompt_zscores(values, prompts) for name, values in scores.items())
    return combined / total


def consensus_preference(scores_a: dict[str, torch.Tensor], scores_b: dict[str, torch.Tensor]) -> torch.Tensor:
    """Majority vote across rewards of "a beats b", per pair: 1.0 (a), 0.0 (b) or 0.5 (no majority).

    A reward with equal scores abstains. Used for multi-metric preference labels.
    """
    if set(scores_a) != set(scores_b):
        raise ValueError("both sides must be scored by the same rewards")
    votes_a = sum((scores_a[name] > scores_b[name]).int() for name in scores_a)
    votes_b = sum((scores_a[name] < scores_b[name]).int() for name in scores_a)
    return torch.where(votes_a > votes_b, 1.0, torch.where(votes_b > votes_a, 0.0, 0.5))
