"""Shared pieces of the reward models: devices and dtypes, safe checkpoint loading, open_clip construction.

Checkpoints are read with safetensors or ``torch.load(weights_only=True)``: a file that holds pickled objects
other than tensors and plain containers is refused, never executed. A ``weights`` folder holding a
``reward.json`` (written by :func:`diffalign.rewards.tiny.build_tiny_reward`, or by hand) names the weights
file and the builder options inside that folder, so ``build_reward(name, weights=DIR)`` needs nothing else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from diffalign.errors import ConfigError, ModelError, closest
from diffalign.images import to_rgb

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
REWARD_JSON = "reward.json"

# A tiny open_clip architecture for offline tests (random weights are written by rewards.tiny).
TINY_OPEN_CLIP_NAME = "diffalign-tiny-clip"
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device,
                  cuda_default: torch.dtype = torch.float16) -> torch.dtype:
    """None -> ``cuda_default`` on CUDA, float32 elsewhere (half-precision matmuls on CPU are slow or missing)."""
    if dtype is None:
        return cuda_default if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ConfigError(f"unknown dtype '{dtype}'; use one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    return dtype


def rgb_images(images: Sequence[Image.Image], prompts: Sequence[str]) -> list[Image.Image]:
    """Check the batch and convert every image to RGB (RGBA on white, 16-bit rescaled, grayscale expanded)."""
    if len(images) != len(prompts):
        raise ValueError(f"score() got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
    return [to_rgb(image) for image in images]


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file read with ``weights_only=True``.

    A ``{"state_dict": ...}`` wrapper (HPS, Lightning) is unwrapped and a DDP ``module.`` prefix stripped.
    Files that need arbitrary unpickling (pickled modules, custom classes) raise ``ModelError``.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        checkpoint = load_file(str(path), device="cpu")
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ModelError(f"{path}: not a plain state dict; refusing to unpickle arbitrary objects "
                             f"(torch.load weights_only=True said: {str(error).splitlines()[0]})") from error
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ModelError(f"{path}: expected a dict of tensors (or {{'state_dict': ...}}), got {type(checkpoint)}")
    if all(key.startswith("module.") for key in checkpoint):
        checkpoint = {key[len("module."):]: value for key, value in checkpoint.items()}
    return checkpoint


def resolve_options(weights: str | os.PathLike | None, options: dict, defaults: dict,
                    reward: str) -> tuple[str | None, dict]:
    """(weights path, options) from the builder defaults, then ``reward.json``, then the caller's options.

    If ``weights`` is a folder with ``reward.json`` its ``weights`` entry (default: the folder) and ``options``
    are used; relative paths in it (the weights, and any option naming an existing file or folder) are resolved
    against the folder. Unknown option names are a ConfigError naming the closest valid one.
    """
    for key in options:
        if key not in defaults:
            raise ConfigError(f"reward '{reward}' has no option '{key}'.{closest(key, defaults)}")
    merged = dict(defaults)
    if weights is not None and (Path(weights) / REWARD_JSON).is_file():
        root = Path(weights)
        try:
            spec = json.loads((root / REWARD_JSON).read_text())
        except json.JSONDecodeError as error:
            raise ModelError(f"{root / REWARD_JSON} is not valid JSON: {error}") from error

        def resolve(value):
            if isinstance(value, str) and value and (root / value).exists():
                return str(root / value)
            return value

        merged.update({key: resolve(value) for key, value in spec.get("options", {}).items() if key in defaults})
        weights = resolve(spec.get("weights", "."))
    merged.update(options)
    return (None if weights is None else str(weights)), merged


def ensure_open_clip_config(model_name: str, model_config: dict | None = None) -> None:
    """Register ``model_config`` (or the built-in tiny config) with open_clip under ``model_name``."""
    import open_clip  # heavy (timm, torchvision): imported when a CLIP-based reward is built

    if model_config is None and model_name == TINY_OPEN_CLIP_NAME:
        model_config = TINY_OPEN_CLIP_CONFIG
    if model_config is None or open_clip.factory.get_model_config(model_name) == model_config:
        return
    folder = Path(tempfile.mkdtemp(prefix="diffalign-open-clip-"))
    (folder / f"{model_name}.json").write_text(json.dumps(model_config))
    open_clip.add_model_config(folder / f"{model_name}.json")


def tag_config(model_name: str, pretrained: str | None) -> dict:
    """open_clip's record for a pretrained tag (hub id, mean/std, resize mode, ``quick_gelu``), {} if unknown."""
    import open_clip  # heavy: see ensure_open_clip_config

    return dict(open_clip.get_pretrained_cfg(model_name, pretrained)) if pretrained else {}


def load_open_clip(model_name: str, pretrained: str | None, weights: str | None, device: torch.device,
                   dtype: torch.dtype, image_size: int | None = None, quick_gelu: bool | None = None,
                   model_config: dict | None = None):
    """(model, preprocess, tokenizer) for an open_clip architecture in eval mode on ``device``/``dtype``.

    ``pretrained`` is an open_clip tag ("openai", "laion2b_s32b_b79k"): it says what the weights are, so its
    activation (QuickGELU for OpenAI weights) and preprocessing apply even when ``weights`` names a local
    state-dict file. ``weights=None`` downloads the tag's weights. ``local-dir:DIR`` model names load the
    config and weights from DIR, as open_clip does. Note: open_clip 3.x only *warns* when a QuickGELU tag is
    built without QuickGELU; ``quick_gelu=None`` follows the tag to avoid that silent mismatch.
    """
    import open_clip  # heavy: see ensure_open_clip_config

    ensure_open_clip_config(model_name, model_config)
    if weights is not None and os.path.isdir(weights):
        raise ConfigError(f"weights={weights} is a folder without {REWARD_JSON}; pass the state-dict file, or "
                          f"model_name='local-dir:{weights}' for an open_clip folder (open_clip_config.json)")
    if pretrained and os.path.isfile(pretrained) and weights is None:  # open_clip style pretrained=<file>
        pretrained, weights = None, pretrained
    tag_cfg = tag_config(model_name, pretrained)
    if quick_gelu is None:
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    kwargs = dict(force_quick_gelu=quick_gelu, force_image_size=image_size, weights_only=True)
    if model_name.startswith("local-dir:") or model_name.startswith("hf-hub:"):
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, **kwargs)
    elif weights is None:
        if not pretrained:
            raise ConfigError(f"open_clip model '{model_name}' needs weights: a pretrained tag or a weights file")
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, **kwargs)
    else:
        if tag_cfg:
            kwargs.update(image_mean=tag_cfg["mean"], image_std=tag_cfg["std"],
                          image_interpolation=tag_cfg["interpolation"], image_resize_mode=tag_cfg["resize_mode"])
        with quiet_open_clip("initialized randomly"):  # open_clip warns about the random init we overwrite next
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, **kwargs)
        load_into(model, load_state_dict_file(weights))
    model = model.eval().requires_grad_(False).to(device=device, dtype=dtype)
    return model, preprocess, open_clip.get_tokenizer(model_name)


class _QuietOpenClip(logging.Filter):
    """Drops open_clip's records that contain ``text``; every other record passes."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        from_open_clip = f"{os.sep}open_clip{os.sep}" in record.pathname or record.name.startswith("open_clip")
        return not (from_open_clip and self.text in record.getMessage())


@contextlib.contextmanager
def quiet_open_clip(text: str):
    """Silence open_clip's messages containing ``text`` while the block runs.

    open_clip (2.x and 3.x, ``factory.py``) logs through the module-level ``logging.warning``, i.e. on the root
    logger, not on a logger of its own, so a filter on ``logging.getLogger("open_clip")`` would never see them.
    The filter therefore sits on the root logger, for the block only, and drops only records emitted from
    open_clip's files.
    """
    quiet, loggers = _QuietOpenClip(text), (logging.getLogger(), logging.getLogger("open_clip"))
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Strict load with open_clip's position-embedding resize; mismatches name the keys."""
    from open_clip.model import resize_pos_embed  # heavy: see ensure_open_clip_config

    state_dict = dict(state_dict)
    resize_pos_embed(state_dict, model)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ModelError(f"checkpoint does not match the architecture: missing {missing[:5]} "
                         f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")


def open_clip_image_size(model) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, tuple | list) else size)


@torch.no_grad()
def open_clip_embeddings(model, tokenizer, pixels: torch.Tensor, prompts: Sequence[str],
                         device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised (image, text) embeddings in float32."""
    image = model.encode_image(pixels.to(device=device, dtype=dtype)).float()
    text = model.encode_text(tokenizer(list(prompts)).to(device)).float()
    return torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1)
