"""HPSv2 and HPSv2.1: Human Preference Score v2 (Wu et al. 2023, tgxs002/HPSv2).

    score = cos(E_img(letterbox(image)), E_txt(prompt))       (L2-normalised features; typically 0.2-0.3)

The HPS benchmark tables report this x100. v2.0 and v2.1 are different fine-tunes: their scores are not
comparable with each other; compare images only under one version.

Model: open_clip ``ViT-H-14`` (GELU, the laion2b_s32b_b79k architecture) whose whole state dict is replaced by
the HPS checkpoint, read with ``torch.load(path, map_location="cpu", weights_only=True)["state_dict"]`` (a bare
state dict or a ``.safetensors`` file also works). Weights: hub repo ``xswu/HPSv2``, file
``HPS_v2_compressed.pt`` (hpsv2) or ``HPS_v2.1_compressed.pt`` (hpsv21), downloaded with
``huggingface_hub.hf_hub_download`` only when ``weights`` is None. We use open_clip directly: the ``hpsv2``
wheel is broken (missing BPE file, pins pytest and protobuf<4, reloads weights on every call).

Preprocessing (HPS's ``ResizeMaxSize``): resize the LONGEST side to the model's image size (224) with bicubic
resampling, pad with black pixels to a centred square, then OpenAI CLIP mean/std. No centre crop, so the whole
image is seen. HPS skips the pad when the longest side is already 224 (a non-square input then breaks the
ViT); :func:`letterbox` always pads, which equals HPS for every input HPS accepts.

Options: ``model_name`` (default ``ViT-H-14``; a small registered config in tests), ``image_size``,
``quick_gelu`` (False), ``model_config``, ``hub_repo`` (``xswu/HPSv2``), ``filename`` (the version's file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from huggingface_hub import hf_hub_download
from PIL import Image

from diffalign.images import to_rgb
from diffalign.rewards.base import REWARDS, RewardSpec
from diffalign.rewards.clip import OpenClipScore
from diffalign.rewards.common import (
    OPENAI_MEAN,
    OPENAI_STD,
    load_open_clip,
    open_clip_image_size,
    resolve_device,
    resolve_dtype,
    resolve_options,
)

HUB_REPO = "xswu/HPSv2"
FILES = {"hpsv2": "HPS_v2_compressed.pt", "hpsv21": "HPS_v2.1_compressed.pt"}


def letterbox(image: Image.Image, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """(3, size, size) float32: longest side resized to ``size`` (bicubic), black-padded to a centred square
    (extra pixel of an odd pad on the right/bottom, as HPS), then normalised with ``mean``/``std``."""
    image = to_rgb(image)
    width, height = image.size
    scale = size / max(width, height)
    new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(image, ((size - new_width) // 2, (size - new_height) // 2))
    pixels = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (pixels - mean) / std


class HPSv2(OpenClipScore):
    """Cosine of the HPS-tuned ViT-H-14 image and text features, on letterboxed images."""

    name = "hpsv2"
    scale = 1.0

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        size = open_clip_image_size(self.model)
        return torch.stack([letterbox(image, size) for image in images])


def _builder(version: str):
    defaults = dict(model_name="ViT-H-14", image_size=None, quick_gelu=False, model_config=None,
                    hub_repo=HUB_REPO, filename=FILES[version])

    def build(weights=None, device=None, dtype=None, **options) -> HPSv2:
        weights, options = resolve_options(weights, options, defaults, version)
        if weights is None:
            weights = hf_hub_download(options["hub_repo"], options["filename"])
        elif Path(weights).is_dir():  # a folder holding the hub file
            weights = str(Path(weights) / options["filename"])
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        model, _, tokenizer = load_open_clip(
            options["model_name"], None, weights, device, dtype, image_size=options["image_size"],
            quick_gelu=options["quick_gelu"], model_config=options["model_config"])
        reward = HPSv2(model, None, tokenizer, device, dtype)
        reward.name = version
        return reward

    build.__doc__ = f"HPS {version}. Options: {', '.join(defaults)} (see the module docstring)."
    return build


for _version, _title in (("hpsv2", "HPSv2.0"), ("hpsv21", "HPSv2.1")):
    REWARDS.register(
        _version,
        RewardSpec(_builder(_version), backbone="open_clip ViT-H-14",
                   weights_source=f"hub {HUB_REPO} / {FILES[_version]}",
                   score_range="cosine, about 0.2-0.3 (benchmarks report x100); v2.0 and v2.1 are not comparable"),
        description=f"{_title}: cosine of HPS-tuned open_clip ViT-H-14 features, letterboxed input",
        source="Wu et al. 2023 (HPSv2, arXiv 2306.09341); tgxs002/HPSv2",
    )
