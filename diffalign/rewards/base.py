"""The reward seam: a scalar reward scores (image, prompt) pairs, a pairwise one says which of two images wins.

    >>> from PIL import Image
    >>> red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    >>> reward = build_reward("toy_redness")             # real models: build_reward("hpsv21", weights=..., device="cuda")
    >>> reward.score([red], ["a red square"])            # (N,) float32 tensor on the CPU, higher is better
    tensor([1.])
    >>> judge = build_reward("toy_redness_judge")        # pairwise: is_pairwise("toy_redness_judge") is True
    >>> judge.prefer([red, blue], [blue, blue], ["a red square"] * 2)   # (N,) P(a preferred over b)
    tensor([1.0000, 0.5000])

Scalar rewards (``RewardModel.score``) rate each image on its own; pairwise rewards (``PairwiseRewardModel.prefer``)
compare two images for one prompt, as a VLM judge or a preference model does, and are what Pref-GRPO's win rates
are built from. ``RewardSpec.pairwise`` says which kind a name builds; ``require_scalar`` refuses a pairwise reward
(a ``ConfigError``) where single images are scored (``diffalign score``, ``pairs``, ``eval``).

Each reward module registers a ``RewardSpec`` in ``REWARDS`` (a ``diffalign.registry.Registry``, with a
one-line description and its source); ``build_reward`` looks it up by name, and ``diffalign list rewards``
prints them. Builders take ``weights`` (a local file or folder; None means the real hub id and file name,
downloaded once by huggingface_hub) and never unpickle arbitrary objects: safetensors, or
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from PIL import Image

from diffalign.errors import ConfigError
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


class PairwiseRewardModel:
    """Base class of pairwise rewards (preference models, VLM judges). Subclasses set ``name`` and implement
    ``prefer``; ``device`` and ``dtype`` say where it runs. It has no ``score``: one image alone gets no value."""

    name: str = ""
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @torch.no_grad()
    def prefer(self, images_a: list[Image.Image], images_b: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """Compare N pairs, pair i being (images_a[i], images_b[i]) for prompts[i].

        Args:
            images_a, images_b: N PIL images each, any mode and size.
            prompts: N prompts, one per pair.

        Returns:
            (N,) float32 CPU tensor in [0, 1]: P(images_a[i] preferred over images_b[i]). A hard judge returns
            1, 0 or 0.5 (a tie). A consistent judge has P(a > b) + P(b > a) = 1; that is expected, not enforced.

        Raises:
            ValueError: the three lists differ in length (``check_pairs``).
        """
        raise NotImplementedError


def check_pairs(images_a: list, images_b: list, prompts: list) -> int:
    """N, the common length of ``prefer``'s three lists; ``ValueError`` when they differ."""
    if not len(images_a) == len(images_b) == len(prompts):
        raise ValueError(f"{len(images_a)} images_a, {len(images_b)} images_b and {len(prompts)} prompts: "
                         "give one prompt per pair")
    return len(prompts)


@dataclass(frozen=True)
class RewardSpec:
    """How to build one reward, and what its model card says (the README's reward table)."""

    builder: Callable[..., RewardModel | PairwiseRewardModel]  # (weights=None, device=None, dtype=None, **options)
    backbone: str = ""
    weights_source: str = ""  # real hub id / file the builder downloads when weights=None
    score_range: str = ""
    pairwise: bool = False  # True: the builder returns a PairwiseRewardModel (``prefer``), not a RewardModel


REWARDS: Registry[RewardSpec] = Registry("reward", "--reward")


def reward_spec(name: str) -> RewardSpec:
    """The registered spec. Raises ``ConfigError`` for an unknown name, naming the closest one."""
    return REWARDS.get(name)


def available_rewards() -> list[str]:
    return sorted(REWARDS.names())


def is_pairwise(name: str) -> bool:
    """Whether reward ``name`` compares two images (``PairwiseRewardModel``) rather than scoring one. Raises
    ``ConfigError`` for an unknown name."""
    return reward_spec(name).pairwise


def require_scalar(rewards: str | Iterable[str] | Mapping[str, object], purpose: str) -> None:
    """Refuse pairwise rewards where single images are scored, before any work is done.

    Args:
        rewards: a reward name, several names (each looked up in ``REWARDS``), or {name: built reward} as the
            scorers take them (each judged by its class, so names need not be registered).
        purpose: what needs a scalar reward, for the message ("diffalign score").

    Raises:
        ConfigError: "reward 'X' is pairwise (it compares two images); <purpose> needs a scalar reward: choose one
        of ..." (or the unknown-name error of ``REWARDS`` for an unregistered name).
    """
    if isinstance(rewards, str):
        rewards = [rewards]
    if isinstance(rewards, Mapping):
        pairwise = [name for name, reward in rewards.items() if isinstance(reward, PairwiseRewardModel)]
    else:
        pairwise = [name for name in rewards if is_pairwise(name)]
    if pairwise:
        scalar = [name for name in available_rewards() if not is_pairwise(name)]
        raise ConfigError(f"reward '{pairwise[0]}' is pairwise (it compares two images); {purpose} needs a scalar "
                          f"reward: choose one of {', '.join(scalar)}")


def build_reward(name: str, weights: str | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, **options) -> RewardModel | PairwiseRewardModel:
    """The reward ``name`` (see ``REWARDS``): a ``RewardModel`` ready to ``score``, or for a pairwise one
    (``is_pairwise(name)``) a ``PairwiseRewardModel`` ready to ``prefer``.

    Args:
        weights: a local weights file or folder (a folder with ``reward.json`` names its own files); None
            downloads the real checkpoint once (``RewardSpec.weights_source``).
        device, dtype: where the backbone runs (default: CUDA in float16 when available, else CPU float32).
        options: builder options, as each reward module's docstring lists them (unknown ones: ``ConfigError``).
    """
    return reward_spec(name).builder(weights=weights, device=device, dtype=dtype, **options)
