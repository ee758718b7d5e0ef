"""``toy_redness``: the toy world's reward, a pixel statistic that prefers red shapes over blue ones.

    score = mean over pixels of (R - B) / 255        (in [-1, 1]; grey background 0, red > 0, blue < 0)

It ignores the prompt and has no weights. It is registered like any reward, so ``diffalign pairs`` and
``diffalign eval`` use it exactly as they would use HPSv2 or PickScore (see ``diffalign.offline.toy_base``).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from diffalign.errors import ConfigError
from diffalign.rewards.base import REWARDS, RewardModel, RewardSpec


def redness(image: Image.Image) -> float:
    """A toy score: mean (R - B) / 255 over the image, in [-1, 1]. Red shapes score high, blue ones low, bigger
    ones more so; the grey background scores 0."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    return float((pixels[..., 0] - pixels[..., 2]).mean() / 255.0)


class ToyRedness(RewardModel):
    name = "toy_redness"

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return torch.tensor([redness(image) for image in images], dtype=torch.float32)


def build_toy_redness(weights=None, device=None, dtype=None, **options) -> ToyRedness:
    if weights is not None or options:
        raise ConfigError("toy_redness has no weights or options; it is a pixel statistic")
    return ToyRedness()


REWARDS.register(
    "toy_redness",
    RewardSpec(build_toy_redness, backbone="none (pixel statistic)", weights_source="none",
               score_range="[-1, 1]; about +0.1 for a mid-size red shape, -0.1 for a blue one"),
    description="toy world reward: mean (R - B) / 255, red shapes score above blue ones (ignores the prompt)",
    source="diffalign, the toy world (diffalign/rewards/toy.py)",
)
