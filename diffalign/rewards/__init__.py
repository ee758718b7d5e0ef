"""Reward models for evaluation and data labelling: each scores (image, prompt) pairs, higher is better, or
(pairwise ones) gives P(image a preferred over image b) for a prompt.

    >>> from diffalign.rewards import REWARDS, build_reward, is_pairwise
    >>> sorted(name for name in REWARDS.names() if not is_pairwise(name))
    ['aesthetic', 'clip', 'hpsv2', 'hpsv21', 'pickscore', 'toy_redness']
    >>> sorted(name for name in REWARDS.names() if is_pairwise(name))
    ['pickscore_pairwise', 'toy_redness_judge']

``build_reward("hpsv21", device="cuda")`` downloads the real checkpoint once (``weights=None``); its
``score(images, prompts)`` gives an (N,) float32 CPU tensor for one batch.

Registered in ``REWARDS``, each with a one-line description and its source (``diffalign list rewards``):
``clip`` (100 x cosine, open_clip), ``hpsv2`` / ``hpsv21`` (HPS v2.0 / v2.1, ViT-H-14, letterbox input),
``pickscore`` (PickScore_v1, transformers CLIP-H), ``aesthetic`` (LAION aesthetic v2 MLP on CLIP ViT-L/14),
``toy_redness`` (the toy world's pixel statistic). Pairwise (``RewardSpec.pairwise``, for Pref-GRPO; scalar
consumers refuse them with ``require_scalar``): ``toy_redness_judge`` (the toy world's hard judge) and
``pickscore_pairwise`` (sigmoid of the PickScore difference), in ``rewards.pairwise``. Each module's docstring
gives the formula, source, weights and options; ``rewards.tiny`` writes tiny random-weight versions in the real
on-disk formats for offline tests.

ImageReward (THUDM) is left out on purpose: the ``image-reward`` wheel pins timm==0.6.13 (conflicting with
open_clip 3.x) and fails to import on transformers 5, and porting its BLIP ViT-L + BERT-with-cross-attention
"med" model by hand is a separate job. MPS is left out too: its checkpoint is a pickled module, unsafe to load.
"""

from diffalign.rewards import aesthetic, clip, hpsv2, pairwise, pickscore, toy  # noqa: F401  (importing registers)
from diffalign.rewards.base import (
    REWARDS,
    PairwiseRewardModel,
    RewardModel,
    RewardSpec,
    available_rewards,
    build_reward,
    is_pairwise,
    require_scalar,
    reward_spec,
)

__all__ = ["REWARDS", "PairwiseRewardModel", "RewardModel", "RewardSpec", "available_rewards", "build_reward",
           "is_pairwise", "require_scalar", "reward_spec"]
