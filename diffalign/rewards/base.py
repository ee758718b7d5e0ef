"""The reward seam: every reward model scores a batch of (image, prompt) pairs, higher is better.

    reward = build_reward("hpsv21", weights="/models/HPS_v2.1_compressed.pt", device="cuda")
    scores = reward.score(images, prompts)          # (N,) float32 tensor on the CPU

Each reward module registers a builder; ``build_reward`` looks it up by name. Builders take ``weights`` (a local
file or folder; None means the real hub id and file name, downloaded once by huggingface_hub) and never
unpickle arbitrary objects: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from diffalign.errors import ConfigError, closest


class RewardModel:
    """Base class. Subclasses set ``name`` and implement ``score``; ``device`` and ``dtype`` say where it runs."""

    name: str = ""
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class RewardSpec:
    name: str
    builder: Callable[..., RewardModel]  # builder(weights=None, device=None, dtype=None, **options)
    description: str = ""
    backbone: str = ""
    weights_source: str = ""  # real hub id / file the builder downloads when weights=None
    score_range: str = ""


_REGISTRY: dict[str, RewardSpec] = {}


def register_reward(spec: RewardSpec) -> RewardSpec:
    _REGISTRY[spec.name] = spec
    return spec


def reward_spec(name: str) -> RewardSpec:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown reward '{name}'.{closest(name, _REGISTRY)} Available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def build_reward(name: str, weights: str | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, **options) -> RewardModel:
    return reward_spec(name).builder(weights=weights, device=device, dtype=dtype, **options)
