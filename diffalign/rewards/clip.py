"""CLIP score: how well an image matches its prompt according to a CLIP model.

    score = 100 * cos(E_img(image), E_txt(prompt))            (about 15-35 for CLIP ViT-L/14 on matching pairs)

Source: Hessel et al. 2021 (CLIPScore); torchmetrics ``CLIPScore`` uses the same 100 x cosine but clamps the
*mean* at 0 (``max(mean, 0)``). We return per-image scores and do not clamp, so negative cosines stay visible.

Model: any open_clip architecture and pretrained tag (default ``ViT-L-14`` / ``openai``, the OpenAI weights
from the hub via open_clip) with open_clip's own preprocessing for that tag (OpenAI: shortest side to 224,
bicubic, centre crop, OpenAI mean/std). Options:

- ``model_name``: open_clip architecture, or ``local-dir:DIR`` (config and weights from DIR, as open_clip does).
- ``pretrained``: open_clip tag naming what the weights are (its QuickGELU flag and preprocessing are used
  even for a local file), or a state-dict file path.
- ``weights``: a local state-dict file (``.safetensors``, or torch file read with ``weights_only=True``), or a
  folder with ``reward.json``; None downloads the tag's weights.
- ``image_size``, ``quick_gelu`` (None = from the tag), ``model_config`` (a dict registered under
  ``model_name``).
"""

from __future__ import annotations

import torch
from PIL import Image

from diffalign.rewards.base import REWARDS, RewardModel, RewardSpec
from diffalign.rewards.common import (
    load_open_clip,
    open_clip_embeddings,
    resolve_device,
    resolve_dtype,
    resolve_options,
    rgb_images,
)


class OpenClipScore(RewardModel):
    """100 x cosine similarity of open_clip image and text embeddings."""

    name = "clip"
    scale = 100.0

    def __init__(self, model, preprocess, tokenizer, device: torch.device, dtype: torch.dtype):
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.device, self.dtype = device, dtype

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.preprocess(image) for image in images])

    @torch.no_grad()
    def embed(self, images: list[Image.Image], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised float32 (image, text) embeddings, one row per image."""
        images = rgb_images(images, prompts)
        return open_clip_embeddings(self.model, self.tokenizer, self.pixels(images), prompts,
                                    self.device, self.dtype)

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        if len(images) == 0:
            return torch.zeros(0, dtype=torch.float32)
        image_emb, text_emb = self.embed(images, prompts)
        return (self.scale * (image_emb * text_emb).sum(dim=-1)).float().cpu()


DEFAULTS = dict(model_name="ViT-L-14", pretrained="openai", image_size=None, quick_gelu=None, model_config=None)


def build_clip(weights=None, device=None, dtype=None, **options) -> OpenClipScore:
    """Options (see the module docstring): model_name, pretrained, image_size, quick_gelu, model_config."""
    weights, options = resolve_options(weights, options, DEFAULTS, "clip")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    model, preprocess, tokenizer = load_open_clip(weights=weights, device=device, dtype=dtype, **options)
    return OpenClipScore(model, preprocess, tokenizer, device, dtype)


REWARDS.register(
    "clip",
    RewardSpec(build_clip, backbone="open_clip ViT-L-14 (configurable)",
               weights_source="open_clip tag 'openai' (hub timm/vit_large_patch14_clip_224.openai)",
               score_range="100 x cosine, roughly 15-35 for matching pairs"),
    description="CLIP score: 100 * cos(image, text) with an open_clip model (no clamp at 0)",
    source="Hessel et al. 2021 (CLIPScore, arXiv 2104.08718); mlfoundations/open_clip",
)
