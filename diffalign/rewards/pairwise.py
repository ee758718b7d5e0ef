"""Pairwise rewards: P(image a preferred over image b for a prompt), the comparisons Pref-GRPO turns into rewards.

Pref-GRPO (Wang et al. 2025, arXiv 2508.20751; CodeGoat24/Pref-GRPO) compares every pair of images sampled for
one prompt with a pairwise preference model and rewards each image with its win rate in the group. Two judges:

- ``toy_redness_judge``: the toy world's hard judge, standing in for a VLM judge (UnifiedReward-Think in
  Pref-GRPO) that returns discrete verdicts. With r = ``diffalign.rewards.toy.redness`` (mean (R - B) / 255)::

      P(a > b) = 1 if r(a) > r(b) + margin,  0 if r(b) > r(a) + margin,  else 0.5 (a tie)

  Option ``margin`` (a finite number >= 0, default 0.0); no weights. P(a > b) + P(b > a) = 1 exactly.
- ``pickscore_pairwise``: PickScore as the pairwise preference model it was trained as (Kirstain et al. 2023)::

      P(a > b) = softmax over (s_a, s_b) = sigmoid(s_a - s_b),   s = the ``pickscore`` score

  Same weights, options (``model_id``, ``processor``, ``processor_backend``), device and dtype as ``pickscore``;
  one batched ``score`` call covers all a's and b's.

Both are ``PairwiseRewardModel``s, registered with ``RewardSpec(pairwise=True)``; scalar consumers refuse them.
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from diffalign.errors import ConfigError, closest
from diffalign.rewards.base import REWARDS, PairwiseRewardModel, RewardSpec, check_pairs
from diffalign.rewards.pickscore import DEFAULTS as PICKSCORE_OPTIONS
from diffalign.rewards.pickscore import MODEL_ID, PROCESSOR_ID, PickScore, build_pickscore
from diffalign.rewards.toy import redness


class ToyRednessJudge(PairwiseRewardModel):
    """The hard toy judge: 1, 0 or 0.5 from the redness difference and ``margin`` (see the module docstring)."""

    name = "toy_redness_judge"

    def __init__(self, margin: float = 0.0):
        self.margin = margin

    @torch.no_grad()
    def prefer(self, images_a: list[Image.Image], images_b: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        check_pairs(images_a, images_b, prompts)
        verdicts = []
        for image_a, image_b in zip(images_a, images_b):
            a, b = redness(image_a), redness(image_b)
            verdicts.append(1.0 if a > b + self.margin else 0.0 if b > a + self.margin else 0.5)
        return torch.tensor(verdicts, dtype=torch.float32)


def build_toy_redness_judge(weights=None, device=None, dtype=None, margin=0.0, **options) -> ToyRednessJudge:
    """Option: ``margin`` (redness units, a finite number >= 0). Raises ``ConfigError`` for weights, other
    options or a bad margin."""
    if weights is not None:
        raise ConfigError("toy_redness_judge has no weights; it compares a pixel statistic")
    if options:
        key = next(iter(options))
        raise ConfigError(f"reward 'toy_redness_judge' has no option '{key}'.{closest(key, ['margin'])}")
    try:
        value = float(margin)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"toy_redness_judge: margin must be a finite number >= 0, got {margin!r}")
    return ToyRednessJudge(value)


class PickScorePairwise(PairwiseRewardModel):
    """sigmoid(s_a - s_b) with the PickScore ``scorer`` (a ``pickscore.PickScore``)."""

    name = "pickscore_pairwise"

    def __init__(self, scorer: PickScore):
        self.scorer = scorer
        self.device, self.dtype = scorer.device, scorer.dtype

    @torch.no_grad()
    def prefer(self, images_a: list[Image.Image], images_b: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        n = check_pairs(images_a, images_b, prompts)
        if n == 0:
            return torch.zeros(0, dtype=torch.float32)
        scores = self.scorer.score(list(images_a) + list(images_b), list(prompts) * 2)  # one batch: a's then b's
        return torch.sigmoid(scores[:n] - scores[n:]).float().cpu()


def build_pickscore_pairwise(weights=None, device=None, dtype=None, **options) -> PickScorePairwise:
    """As ``build_pickscore`` (same weights and options: model_id, processor, processor_backend)."""
    for key in options:
        if key not in PICKSCORE_OPTIONS:
            raise ConfigError(f"reward 'pickscore_pairwise' has no option '{key}'.{closest(key, PICKSCORE_OPTIONS)}")
    return PickScorePairwise(build_pickscore(weights=weights, device=device, dtype=dtype, **options))


REWARDS.register(
    "toy_redness_judge",
    RewardSpec(build_toy_redness_judge, backbone="none (pixel statistic)", weights_source="none",
               score_range="P(a > b) in {0, 0.5, 1}", pairwise=True),
    description="pairwise toy judge: P(a > b) = 1, 0 or 0.5 (tie) by redness difference beyond a margin",
    source="diffalign, the toy world (diffalign/rewards/pairwise.py); stands in for Pref-GRPO's VLM judge",
)

REWARDS.register(
    "pickscore_pairwise",
    RewardSpec(build_pickscore_pairwise, backbone="transformers CLIPModel (ViT-H-14)",
               weights_source=f"hub {MODEL_ID}, processor {PROCESSOR_ID}",
               score_range="P(a > b) = sigmoid(s_a - s_b) in (0, 1)", pairwise=True),
    description="pairwise PickScore: P(a > b) = sigmoid(PickScore(a) - PickScore(b)), its training objective",
    source="Kirstain et al. 2023 (Pick-a-Pic, arXiv 2305.01569); yuvalkirstain/PickScore",
)
