"""Tiny random-weight reward models, saved in exactly the on-disk format the real loaders read.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> from diffalign.rewards import build_reward
    >>> folder = build_tiny_reward(Path(tempfile.mkdtemp()) / "hps", "hpsv2")
    >>> reward = build_reward("hpsv2", weights=folder)          # reads folder/reward.json
    >>> reward.score([Image.new("RGB", (32, 32))], ["a fox"]).shape
    torch.Size([1])

Each folder holds the weights plus ``reward.json`` = {"reward", "weights", "options"}: the builder options that
load it (the tiny open_clip architecture name, local processor folder, ...), paths relative to the folder.

- clip: ``open_clip_model.pt``, a torch-saved open_clip state dict of the tiny architecture.
- hpsv2 / hpsv21: ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` = ``torch.save({"state_dict": ...})``.
- aesthetic: ``sac+logos+ava1-l14-linearMSE.pth`` (MLP state dict, keys ``layers.{0,2,4,6,7}.*``, input = the
  tiny CLIP's embedding width) plus ``clip_model.pt`` (the tiny open_clip state dict).
- pickscore: ``model/`` (``CLIPModel.save_pretrained`` of a small config with the real 49,408-token vocabulary)
  and ``processor/`` (``CLIPProcessor``: the offline CLIP tokenizer and a CLIPImageProcessor configured like
  PickScore's: shortest edge resize, bicubic, centre crop, OpenAI mean/std, at 32 px instead of 224).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffalign.errors import ConfigError
from diffalign.offline.models import build_clip_tokenizer
from diffalign.paths import build_atomically, cache_root
from diffalign.rewards.aesthetic import FILENAME, AestheticMLP
from diffalign.rewards.common import (
    OPENAI_MEAN,
    OPENAI_STD,
    TINY_OPEN_CLIP_CONFIG,
    TINY_OPEN_CLIP_NAME,
    ensure_open_clip_config,
)

TINY_IMAGE_SIZE = 32


def tiny_open_clip_state_dict(seed: int) -> dict[str, torch.Tensor]:
    import open_clip  # heavy (timm, torchvision): imported only when a tiny reward is built

    ensure_open_clip_config(TINY_OPEN_CLIP_NAME)
    torch.manual_seed(seed)
    return open_clip.create_model(TINY_OPEN_CLIP_NAME).state_dict()


def _clip(out_dir: Path, seed: int) -> dict:
    torch.save(tiny_open_clip_state_dict(seed), out_dir / "open_clip_model.pt")
    return {"weights": "open_clip_model.pt", "options": {"model_name": TINY_OPEN_CLIP_NAME, "pretrained": None}}


def _hps(filename: str):
    def build(out_dir: Path, seed: int) -> dict:
        torch.save({"state_dict": tiny_open_clip_state_dict(seed)}, out_dir / filename)
        return {"weights": filename, "options": {"model_name": TINY_OPEN_CLIP_NAME}}

    return build


def _aesthetic(out_dir: Path, seed: int) -> dict:
    torch.save(tiny_open_clip_state_dict(seed), out_dir / "clip_model.pt")
    torch.manual_seed(seed + 1)
    torch.save(AestheticMLP(TINY_OPEN_CLIP_CONFIG["embed_dim"]).state_dict(), out_dir / FILENAME)
    return {"weights": FILENAME, "options": {"clip_model_name": TINY_OPEN_CLIP_NAME, "clip_pretrained": None,
                                             "clip_weights": "clip_model.pt"}}


def _pickscore(out_dir: Path, seed: int) -> dict:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor  # heavy, as open_clip

    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407)
    vision = dict(image_size=TINY_IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(
        str(out_dir / "model"))
    image_processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": TINY_IMAGE_SIZE}, resample=3,  # 3 = PIL bicubic
        do_center_crop=True, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        do_rescale=True, do_normalize=True, image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD),
        do_convert_rgb=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer()).save_pretrained(
        str(out_dir / "processor"))
    return {"weights": "model", "options": {"processor": "processor"}}


BUILDERS = {"clip": _clip, "hpsv2": _hps("HPS_v2_compressed.pt"), "hpsv21": _hps("HPS_v2.1_compressed.pt"),
            "aesthetic": _aesthetic, "pickscore": _pickscore}
TINY_REWARDS = tuple(BUILDERS)  # the rewards with a tiny version (`diffalign tiny reward --reward`)


def build_tiny_reward(out_dir: str | Path, reward: str, seed: int = 0) -> Path:
    """Write a tiny ``reward`` to ``out_dir`` with ``reward.json``; ``build_reward(reward, weights=out_dir)``
    loads it."""
    if reward not in BUILDERS:
        raise ConfigError(f"no tiny version of reward '{reward}'; available: {', '.join(BUILDERS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = BUILDERS[reward](out_dir, seed)
    (out_dir / "reward.json").write_text(json.dumps({"reward": reward, **spec}, indent=2) + "\n")
    return out_dir


def tiny_reward_path(reward: str, seed: int = 0) -> Path:
    """The cached tiny ``reward`` under ``$DIFFALIGN_CACHE/tiny`` (built on first use, atomically)."""
    target = cache_root() / "tiny" / f"reward-{reward}-seed{seed}"
    return build_atomically(target, lambda tmp: build_tiny_reward(tmp, reward, seed))
