"""LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor): prompt-independent.

    score = MLP(e / |e|),  e = CLIP ViT-L/14 (OpenAI) image embedding          (a 1-10 rating; ~5-7 typical)

MLP: Linear 768->1024, Dropout 0.2, Linear ->128, Dropout 0.2, Linear ->64, Dropout 0.1, Linear ->16,
Linear ->1, with NO activations (the authors commented them out; the dropouts are inactive at eval). Its
state-dict keys are exactly ``layers.{0,2,4,6,7}.{weight,bias}``. Weights: ``sac+logos+ava1-l14-linearMSE.pth``
(trained on SAC + LAION-Logos + AVA with MSE), downloaded from hub repo ``camenduru/improved-aesthetic-predictor``
(a mirror of the GitHub file; option ``hub_repo``) when ``weights`` is None, read with
``torch.load(weights_only=True)`` or safetensors. The CLIP is open_clip ``ViT-L-14`` / ``openai`` (QuickGELU,
shortest side 224 bicubic, centre crop, OpenAI mean/std, as the ``clip`` package the authors used).

Options: ``clip_model_name``, ``clip_pretrained`` (open_clip tag), ``clip_weights`` (a local state-dict file for
that tag's weights), ``clip_image_size``, ``clip_quick_gelu`` (None = from the tag), ``clip_model_config``,
``hub_repo``, ``filename``. The prompts passed to ``score`` are ignored.
"""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from PIL import Image
from torch import nn

from diffalign.errors import ModelError
from diffalign.rewards.base import REWARDS, RewardModel, RewardSpec
from diffalign.rewards.common import (
    load_open_clip,
    load_state_dict_file,
    resolve_device,
    resolve_dtype,
    resolve_options,
    rgb_images,
)

HUB_REPO = "camenduru/improved-aesthetic-predictor"
FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
MLP_KEYS = {f"layers.{index}.{kind}" for index in (0, 2, 4, 6, 7) for kind in ("weight", "bias")}
DEFAULTS = dict(clip_model_name="ViT-L-14", clip_pretrained="openai", clip_weights=None, clip_image_size=None,
                clip_quick_gelu=None, clip_model_config=None, hub_repo=HUB_REPO, filename=FILENAME)


class AestheticMLP(nn.Module):
    """The LAION aesthetic v2 head (no activations, as released)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)


def load_mlp(path: str | Path) -> AestheticMLP:
    state_dict = load_state_dict_file(path)
    if set(state_dict) != MLP_KEYS:
        raise ModelError(f"{path}: not an aesthetic v2 MLP; keys {sorted(state_dict)[:6]}..., expected "
                         f"layers.{{0,2,4,6,7}}.(weight|bias)")
    mlp = AestheticMLP(state_dict["layers.0.weight"].shape[1])
    mlp.load_state_dict(state_dict)
    return mlp.eval().requires_grad_(False)


class Aesthetic(RewardModel):
    name = "aesthetic"

    def __init__(self, mlp: AestheticMLP, clip, preprocess, device: torch.device, dtype: torch.dtype):
        self.mlp, self.clip, self.preprocess = mlp, clip, preprocess
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """L2-normalised float32 CLIP image embeddings."""
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device, self.dtype)
        return torch.nn.functional.normalize(self.clip.encode_image(pixels).float(), dim=-1)

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str] | None = None) -> torch.Tensor:
        if len(images) == 0:
            return torch.zeros(0, dtype=torch.float32)
        images = rgb_images(images, prompts if prompts is not None else [""] * len(images))
        return self.mlp(self.embed(images)).squeeze(-1).float().cpu()


def build_aesthetic(weights=None, device=None, dtype=None, **options) -> Aesthetic:
    """Options: clip_model_name, clip_pretrained, clip_weights, clip_image_size, clip_quick_gelu,
    clip_model_config, hub_repo, filename (see the module docstring)."""
    weights, options = resolve_options(weights, options, DEFAULTS, "aesthetic")
    if weights is None:
        weights = hf_hub_download(options["hub_repo"], options["filename"])
    elif Path(weights).is_dir():
        weights = str(Path(weights) / options["filename"])
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    clip, preprocess, _ = load_open_clip(
        options["clip_model_name"], options["clip_pretrained"], options["clip_weights"], device, dtype,
        image_size=options["clip_image_size"], quick_gelu=options["clip_quick_gelu"],
        model_config=options["clip_model_config"])
    mlp = load_mlp(weights).to(device)  # the head stays float32, as the authors ran it
    width = clip.visual.output_dim
    if mlp.layers[0].in_features != width:
        raise ModelError(f"aesthetic MLP expects {mlp.layers[0].in_features}-d embeddings, the CLIP gives {width}")
    return Aesthetic(mlp, clip, preprocess, device, dtype)


REWARDS.register(
    "aesthetic",
    RewardSpec(build_aesthetic, backbone="open_clip ViT-L-14 (openai) + 5-layer linear MLP",
               weights_source=f"hub {HUB_REPO} / {FILENAME}; CLIP: open_clip tag 'openai'",
               score_range="about 1-10 (typical images 4-7)"),
    description="LAION aesthetic v2: linear MLP on the normalised CLIP ViT-L/14 image embedding (prompt ignored)",
    source="LAION-Aesthetics v2 (Schuhmann 2022); christophschuhmann/improved-aesthetic-predictor",
)
