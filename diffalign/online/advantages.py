"""From rewards to what the update uses: group-relative advantages, running per-prompt statistics, in-group win
rates (Pref-GRPO) and optimality probabilities (DiffusionNFT).

Shapes: a round holds M images, M = P prompts x G images, in prompt-major order (image k belongs to group
k // G); every function here works on the whole round, gathered from every process, so a group may span
processes.

- ``group_advantages``: A = (r - mean of the group) / (std + eps), the std over the group or over the whole
  round ("global std", Flow-GRPO's default); GRPO (Shao et al. 2024, arXiv 2402.03300) as Flow-GRPO applies it.
- ``PromptStatTracker``: DDPO's running per-prompt statistics (kvablack/ddpo-pytorch, ``stat_tracking.py``): the
  last ``buffer_size`` rewards of each prompt, across rounds; a prompt seen fewer than ``min_count`` times uses
  the round's mean and std.
- ``win_rates``: Pref-GRPO (Wang et al. 2025, arXiv 2508.20751): every pair of a group compared, an image's
  reward is its mean probability of winning against the G - 1 others.
- ``optimality``: DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117): r = clip(A, -c, c) / (2 c) + 1/2 in [0, 1].
"""

from __future__ import annotations

from collections import deque

import torch

STD_EPS = 1e-4  # added to the std, as Flow-GRPO and DDPO do: a group of equal rewards gets A = 0, not NaN


def group_advantages(rewards: torch.Tensor, group_size: int, std: str = "group") -> torch.Tensor:
    """(M,) rewards in prompt-major groups of ``group_size`` -> (M,) float32 advantages.

    ``std``: "group" (each group's population std) or "global" (the round's). Each group's advantages sum to 0.
    Raises ``ValueError`` when M is not a multiple of the group size or ``std`` is unknown.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.double().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if std == "group":
        scale = grouped.std(dim=1, unbiased=False, keepdim=True)
    elif std == "global":
        scale = rewards.double().std(unbiased=False)
    else:
        raise ValueError(f"unknown std mode {std!r}: group or global")
    return (centred / (scale + STD_EPS)).flatten().float()


class PromptStatTracker:
    """DDPO's running per-prompt reward statistics; saved in checkpoints (``state_dict`` is plain JSON data).

    Memory: at most ``buffer_size`` floats per distinct prompt seen.
    """

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque] = {}

    def advantages(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """(M,) advantages of one round (prompts (M,), rewards (M,)), after adding the round to the buffers."""
        values = rewards.double()
        result = torch.empty_like(values)
        round_mean, round_std = values.mean(), values.std(unbiased=False)
        groups: dict[str, list[int]] = {}
        for index, prompt in enumerate(prompts):  # one pass, not one per distinct prompt
            groups.setdefault(prompt, []).append(index)
        for prompt, indices in groups.items():
            rows = torch.tensor(indices)
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[rows].tolist())
            if len(buffer) < self.min_count:
                mean, std = round_mean, round_std
            else:
                seen = torch.tensor(list(buffer), dtype=torch.float64)
                mean, std = seen.mean(), seen.std(unbiased=False)
            result[rows] = (values[rows] - mean) / (std + STD_EPS)
        return result.float()

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {prompt: list(buffer) for prompt, buffer in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {prompt: deque(values, maxlen=self.buffer_size) for prompt, values in state["buffers"].items()}


def sigmoid_preferences(rewards: torch.Tensor, group_size: int, temperature: float) -> torch.Tensor:
    """(M,) scalar rewards -> (M/G, G, G) P(i beats j) = sigmoid((r_i - r_j) / temperature) within each group."""
    grouped = rewards.double().view(-1, group_size)
    return torch.sigmoid((grouped[:, :, None] - grouped[:, None, :]) / temperature)


def win_rates(preferences: torch.Tensor) -> torch.Tensor:
    """(groups, G, G) P(i beats j) -> (groups * G,) each image's mean win probability over the G - 1 others
    (the diagonal is ignored). Raises ``ValueError`` for groups of fewer than 2 images."""
    size = preferences.shape[-1]
    if size < 2:
        raise ValueError("win rates need groups of at least 2 images")
    off_diagonal = ~torch.eye(size, dtype=torch.bool)
    return (preferences.double() * off_diagonal).sum(dim=-1).div(size - 1).flatten().float()


def pair_indices(group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The G (G - 1) / 2 unordered pairs (i < j) of a group, as two (pairs,) long tensors."""
    first, second = torch.triu_indices(group_size, group_size, offset=1)
    return first, second


def preferences_from_pairs(probabilities: torch.Tensor, group_size: int) -> torch.Tensor:
    """(groups, pairs) P(i beats j) for the pairs of ``pair_indices`` -> (groups, G, G), with P(j beats i) =
    1 - P(i beats j) and 0.5 on the diagonal."""
    first, second = pair_indices(group_size)
    matrix = torch.full((probabilities.shape[0], group_size, group_size), 0.5, dtype=torch.float64)
    matrix[:, first, second] = probabilities.double()
    matrix[:, second, first] = 1 - probabilities.double()
    return matrix


def optimality(advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """DiffusionNFT's optimality probability r in [0, 1] from advantages: clip(A, -c, c) / (2 c) + 1/2."""
    return (advantages.clamp(-clip, clip) / (2 * clip) + 0.5).clamp(0, 1)
