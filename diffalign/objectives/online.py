"""Online RL objectives: GRPO (DDPO / Flow-GRPO), Pref-GRPO and DiffusionNFT.

Each step of these objectives samples images from the current model, scores them with rewards and updates the
model (``diffalign.online``; the ``online`` config section says what a round samples). Their data kind is
``prompts``: no preference data is read. The hyperparameters here say how rewards become advantages and how the
loss is formed; the formulas are in ``diffalign.online.advantages`` and ``diffalign.online.losses``.

- ``grpo``: group-relative advantages, the clipped importance ratio over the sampler's Gaussian steps, an optional
  KL to the reference (LoRA disabled). DDPO's running per-prompt statistics with ``stat_buffer > 0``.
- ``pref_grpo``: GRPO on each image's win rate inside its group, every pair compared by a preference function:
  sigmoid((r_a - r_b) / temperature) of a scalar reward, or a pairwise reward model (``toy_redness_judge``,
  ``pickscore_pairwise``).
- ``nft``: DiffusionNFT, the denoising loss on implicit positive and negative policies against the old policy
  (an EMA of the policy, which also samples); no likelihoods, any sampler.

Published settings: DDPO (SD1.5 aesthetic): clip 1e-4, advantage clip 5, lr 3e-4, stat buffer 32 / min count 16;
Flow-GRPO (SD3.5-M PickScore): clip 1e-4, advantage clip 5, KL 0.01, global std; DiffusionNFT (SD3.5-M): beta 1,
advantage clip 5, KL 1e-4, old-policy decay min(0.001 step, 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.objectives.base import Objective, check_positive, register_objective
from diffalign.online.advantages import (
    PromptStatTracker,
    group_advantages,
    optimality,
    sigmoid_preferences,
    win_rates,
)


@dataclass
class ScoredRound:
    """What advantages are computed from: the whole round, gathered from every process, prompt-major.

    rewards: (M,) the weighted reward sum. prompts: (M,) each image's prompt. group_size: G.
    preferences: (M / G, G, G) P(i beats j) from a pairwise reward model, or None.
    """

    rewards: torch.Tensor
    prompts: list[str]
    group_size: int
    preferences: torch.Tensor | None = None


def check_std(std: str) -> None:
    if std not in ("group", "global"):
        raise ValueError(f"std must be group or global, got {std!r}")


@dataclass
class GRPOParams:
    clip_range: float = 1e-4  # eps of the clipped ratio (DDPO, Flow-GRPO)
    advantage_clip: float = 5.0  # advantages clipped to [-c, c]
    kl_coef: float = 0.0  # weight of the KL to the reference (Flow-GRPO: 0.01-0.04; DDPO: none)
    std: str = "group"  # group | global: the std advantages are divided by (Flow-GRPO's recipes: global)
    stat_buffer: int = 0  # > 0: DDPO's running per-prompt statistics over the last N rewards of each prompt
    stat_min_count: int = 16  # ... used once a prompt has this many; before that the round's mean and std

    def __post_init__(self):
        check_positive(self, "clip_range", "advantage_clip")
        check_std(self.std)
        if self.kl_coef < 0 or self.stat_buffer < 0 or self.stat_min_count < 1:
            raise ValueError("kl_coef and stat_buffer must be >= 0 and stat_min_count >= 1")

    def tracker(self) -> PromptStatTracker | None:
        return PromptStatTracker(self.stat_buffer, self.stat_min_count) if self.stat_buffer else None

    def advantages(self, scored: ScoredRound, tracker: PromptStatTracker | None) -> torch.Tensor:
        """(M,) advantages of the gathered round."""
        if tracker is not None:
            return tracker.advantages(scored.prompts, scored.rewards)
        return group_advantages(scored.rewards, scored.group_size, self.std)


@dataclass
class PrefGRPOParams(GRPOParams):
    temperature: float = 1.0  # scalar rewards: P(a beats b) = sigmoid((r_a - r_b) / temperature)

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "temperature")
        if self.stat_buffer:
            raise ValueError("stat_buffer does not apply: win rates are relative to the group by construction")

    def advantages(self, scored: ScoredRound, tracker: PromptStatTracker | None) -> torch.Tensor:
        preferences = scored.preferences
        if preferences is None:
            preferences = sigmoid_preferences(scored.rewards, scored.group_size, self.temperature)
        return group_advantages(win_rates(preferences), scored.group_size, self.std)


@dataclass
class NFTParams:
    beta: float = 1.0  # mixing strength of the implicit policies (not the KL weight: that is kl_coef)
    advantage_clip: float = 5.0  # advantages clipped to [-c, c] before r = A / (2 c) + 1/2
    kl_coef: float = 1e-4  # weight of mean((pred - base pred)^2), the base being the LoRA disabled
    std: str = "global"  # as DiffusionNFT's recipes
    old_decay_flat: int = 0  # old policy <- d old + (1 - d) policy, d = 0 for the first N steps, then ...
    old_decay_rate: float = 0.001  # ... d = rate (step - N) ...
    old_decay_max: float = 0.5  # ... at most this (DiffusionNFT's decay type 1; its OCR recipe: 75, 0.0075, 0.999)

    def __post_init__(self):
        check_positive(self, "beta", "advantage_clip")
        check_std(self.std)
        if self.kl_coef < 0 or self.old_decay_flat < 0 or self.old_decay_rate < 0:
            raise ValueError("kl_coef, old_decay_flat and old_decay_rate must be >= 0")
        if not 0 <= self.old_decay_max < 1:
            raise ValueError(f"old_decay_max must be in [0, 1), got {self.old_decay_max}")

    def tracker(self) -> None:
        return None

    def old_decay(self, step: int) -> float:
        """The old policy's EMA decay after optimizer step ``step``."""
        return 0.0 if step < self.old_decay_flat else min((step - self.old_decay_flat) * self.old_decay_rate,
                                                          self.old_decay_max)

    def advantages(self, scored: ScoredRound, tracker: None) -> torch.Tensor:
        """(M,) optimality probabilities r in [0, 1] (what NFT's loss weighs with)."""
        return optimality(group_advantages(scored.rewards, scored.group_size, self.std), self.advantage_clip)


register_objective(Objective(
    name="grpo", optional_reference=True, params_cls=GRPOParams, step="grpo", needs_reference=False, images_per_record=None,
    data_kind="prompts",
    description="online GRPO: groups sampled per prompt, group-relative advantages, clipped importance ratio over "
                "the sampler's Gaussian steps (DDIM eta > 0, or the Flow-GRPO SDE)",
    source="Black et al. 2023 (DDPO, arXiv 2305.13301); Liu et al. 2025 (Flow-GRPO, arXiv 2505.05470)",
))
register_objective(Objective(
    name="pref_grpo", optional_reference=True, params_cls=PrefGRPOParams, step="grpo", needs_reference=False, images_per_record=None,
    data_kind="prompts",
    description="online Pref-GRPO: GRPO on each image's win rate in its group under a pairwise preference",
    source="Wang et al. 2025 (Pref-GRPO, arXiv 2508.20751); CodeGoat24/Pref-GRPO",
))
register_objective(Objective(
    name="nft", params_cls=NFTParams, step="nft", needs_reference=True, images_per_record=None,
    data_kind="prompts", default_reference="ema",
    reference_overrides=lambda params: {"ema_decay": params.old_decay, "ema_update_every": 1},
    description="online DiffusionNFT: denoising loss on implicit positive / negative policies against the EMA old "
                "policy; forward process only, any sampler, CFG-free",
    source="Zheng et al. 2025 (DiffusionNFT, arXiv 2509.16117); NVlabs/DiffusionNFT",
))
