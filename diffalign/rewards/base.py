"""The reward seam: every reward model scores a batch of (image, prompt) pairs, higher is better.

    >>> from PIL import Image
    >>> reward = build_reward("toy_redness")             # real models: build_reward("hpsv21", weights=..., device="cuda")
    >>> reward.score([Image.new("RGB", (8, 8), (255, 0, 0))], ["a red square"])   # (N,) float32 tensor on the CPU
    tensor([1.])

Each reward module registers a ``RewardSpec`` in ``REWARDS`` (a ``diffalign.registry.Registry``, with a
one-line description and its source); ``build_reward`` looks it up by name, and ``diffalign list rewards``
prints them. Builders take ``weights`` (a local file or folder; None means the real hub id and file name,
downloaded once by huggingface_hub) and never unpickle arbitrary objects: safetensors, or
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from diffalign.registry import Registry


class RewardModel:
    """Base class. Subclasses set ``name`` and implement ``score``; ``device`` and ``dtype`` say where it runs."""

    name: str = ""
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """Score one batch.

        Args:
            images: N PIL images, any mode and size (each reward converts and resizes them itself).
            prompts: N prompts, one per image (prompt-independent rewards ignore them).

        Returns:
            (N,) float32 CPU tensor, higher is better.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class RewardSpec:
    """How to build one reward, and what its model card says (the README's reward table)."""

    builder: Callable[..., RewardModel]  # builder(weights=None, device=None, dtype=None, **options)
    backbone: str = ""
    weights_source: str = ""  # real hub id / file the builder downloads when weights=None
    score_range: str = ""


REWARDS: Registry[RewardSpec] = Registry("reward", "--reward")


def reward_spec(name: str) -> RewardSpec:
    """The registered spec. Raises ``ConfigError`` for an unknown name, naming the closest one."""
    return REWARDS.get(name)


def available_rewards() -> list[str]:
    return sorted(REWARDS.names())


def build_reward(name: str, weights: str | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, **options) -> RewardModel:
    """The reward ``name`` (see ``REWARDS``), ready to ``score``.

    Args:
        weights: a local weights file or folder (a folder with ``reward.json`` names its own files); None
            downloads the real checkpoint once (``RewardSpec.weights_source``).
        device, dtype: where the backbone runs (default: CUDA in float16 when available, else CPU float32).
        options: builder options, as each reward module's docstring lists them (unknown ones: ``ConfigError``).
    """
    return reward_spec(name).builder(weights=weights, device=device, dtype=dtype, **options)
