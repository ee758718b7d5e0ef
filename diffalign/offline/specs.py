"""``tiny:<name>`` specs: offline models and data, built from a seed on first use and cached.

    >>> resolve_model_spec("tiny:sd15")    # a diffusers folder, built on first use
    '.../tiny/sd15-seed0'
    >>> resolve_data_spec("tiny:pairs")
    '.../tiny/pairs-v3-seed0/jsonl'

``TINY_MODELS`` names each tiny model after the checkpoint it imitates (``sd15``, ``sd2v``, ``sdxl``, ``sd3``:
random weights; the family that loads one is read from its ``model_index.json``, as for any checkpoint), plus
``toy``, the toy world's base, pre-trained on CPU (minutes) instead of random. ``TINY_DATASETS`` are views of one
synthetic preference set (``diffalign.offline.data``). Folders are built atomically under ``$DIFFALIGN_CACHE``
(default ``~/.cache/diffalign``), so a killed build leaves nothing behind.

Importing this module registers ``tiny`` in ``diffalign.families.MODEL_SOURCES``, so ``model.pretrained:
tiny:sd15`` loads through ``load_components`` while the families never import the offline builders.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from diffalign.families import MODEL_SOURCES
from diffalign.logs import get_logger
from diffalign.offline.data import build_tiny_pairs
from diffalign.offline.models import (
    build_tiny_flux,
    build_tiny_flux_schnell,
    build_tiny_sd2v,
    build_tiny_sd3,
    build_tiny_sd15,
    build_tiny_sd35,
    build_tiny_sdxl,
)
from diffalign.offline.toy_base import TOY_VERSION, build_toy_base
from diffalign.paths import build_atomically, cache_root
from diffalign.registry import Registry

logger = get_logger(__name__)

TINY_DATA_VERSION = "v3"  # bump when the tiny data changes, so stale caches are not reused

# name -> builder(out_dir, seed=...) -> the folder written
TINY_MODELS: Registry[Callable[..., Path]] = Registry("tiny model", "tiny:<model>")
TINY_MODELS.register(
    "sd15", build_tiny_sd15,
    description="SD1.5-shaped, random weights (family sd): epsilon prediction, one CLIP text encoder",
    source="the layout of stable-diffusion-v1-5/stable-diffusion-v1-5",
)
TINY_MODELS.register(
    "sd2v", build_tiny_sd2v,
    description="SD2.x 768-v-shaped, random weights (family sd): v-prediction, linear-projection attention",
    source="the layout of stabilityai/stable-diffusion-2-1",
)
TINY_MODELS.register(
    "sdxl", build_tiny_sdxl,
    description="SDXL-shaped, random weights (family sdxl): two CLIP text encoders, text_time conditioning",
    source="the layout of stabilityai/stable-diffusion-xl-base-1.0",
)
TINY_MODELS.register(
    "sd3", build_tiny_sd3,
    description="SD3-shaped, random weights (family sd3): MMDiT, flow matching, two CLIP text encoders and T5",
    source="the layout of stabilityai/stable-diffusion-3-medium-diffusers",
)
TINY_MODELS.register(
    "sd35", build_tiny_sd35,
    description="SD3.5-medium-shaped, random weights (family sd3): SD3's plus a dual-attention block (attn2) and "
                "QK norm",
    source="the layout of stabilityai/stable-diffusion-3.5-medium",
)
TINY_MODELS.register(
    "flux", build_tiny_flux,
    description="FLUX.1-dev-shaped, random weights (family flux): double and single-stream blocks, embedded "
                "guidance, dynamic shifting, CLIP pooled + T5",
    source="the layout of black-forest-labs/FLUX.1-dev",
)
TINY_MODELS.register(
    "flux-schnell", build_tiny_flux_schnell,
    description="FLUX.1-schnell-shaped, random weights (family flux): as tiny:flux without the guidance embedding, "
                "static shift 1",
    source="the layout of black-forest-labs/FLUX.1-schnell",
)
TINY_MODELS.register(
    "toy", build_toy_base,
    description="the toy world's base (family sd): pre-trained here on red or blue shapes, a few minutes on CPU "
                "the first time",
    source="diffalign.offline.toy_base",
)

# name -> the file or folder of the built data set that the spec names
TINY_DATASETS: Registry[str] = Registry("tiny dataset", "tiny:<dataset>")
TINY_DATASETS.register("pairs", "jsonl",
                       description="red (chosen) vs blue (rejected) shape pairs: metadata.jsonl + PNG files")
TINY_DATASETS.register("pairs-parquet", "pairs.parquet",
                       description="the same pairs as a Pick-a-Pic-schema parquet file (winner side shuffled), "
                                   "plus tie rows that readers drop")
TINY_DATASETS.register("scored-pairs", "scored", description="the pairs with toy_redness scores (for SmPO)")
TINY_DATASETS.register("ranked", "ranked", description="4 images per prompt with toy_redness scores (for RankDPO)")
TINY_DATASETS.register("captions", "captions",
                       description="single images captioned with their colour, no labels (for Self-NPO)")


def is_tiny_spec(spec: str) -> bool:
    """Whether ``spec`` is a ``tiny:<name>`` spec (anything else is a path or hub id)."""
    return isinstance(spec, str) and spec.startswith("tiny:")


def build_tiny_model(out_dir: str | Path, name: str = "sd15", seed: int = 0) -> Path:
    """Write the tiny model ``name`` (see ``TINY_MODELS``) to ``out_dir`` as a diffusers ``save_pretrained``
    folder. Raises ``ConfigError`` for an unknown name."""
    return TINY_MODELS.get(name)(out_dir, seed=seed)


def without_touching_global_rng(build: Callable, *args, **kwargs):
    """Run a builder with torch's global generator saved and restored: the builders seed it, and a run that
    builds its tiny model on first use must then draw (LoRA initialisation, ...) exactly what a run that found it
    cached draws."""
    with torch.random.fork_rng(devices=[]):
        return build(*args, **kwargs)


def resolve_model_spec(spec: str, seed: int = 0) -> str:
    """``tiny:<model>`` -> the path of the cached tiny model (built on first use); anything else unchanged.

    ``tiny:toy`` is cached as ``tiny/toy-<TOY_VERSION>-seed<seed>`` (its recipe is versioned), the others as
    ``tiny/<model>-seed<seed>``. Raises ``ConfigError`` for an unknown name."""
    if not is_tiny_spec(spec):
        return spec
    name = spec.split(":", 1)[1]
    build = TINY_MODELS.get(name)
    target = cache_root() / "tiny" / (f"toy-{TOY_VERSION}-seed{seed}" if name == "toy" else f"{name}-seed{seed}")
    if name == "toy" and not target.exists():
        logger.info(f"building the toy base model (pre-training a VAE and UNet on CPU, a few minutes) into {target}")
    return str(build_atomically(target, lambda tmp: without_touching_global_rng(build, tmp, seed=seed)))


def resolve_data_spec(spec: str, seed: int = 0) -> str:
    """``tiny:<dataset>`` -> the path of that view of the cached tiny preference set (built on first use);
    anything else unchanged. ``tiny:pairs`` -> the jsonl folder, ``tiny:pairs-parquet`` -> the parquet file,
    ``tiny:scored-pairs`` -> pairs with redness scores, ``tiny:ranked`` -> 4 scored images per prompt,
    ``tiny:captions`` -> single images with captions (no labels). Raises ``ConfigError`` for an unknown name."""
    if not is_tiny_spec(spec):
        return spec
    view = TINY_DATASETS.get(spec.split(":", 1)[1])
    root = build_atomically(cache_root() / "tiny" / f"pairs-{TINY_DATA_VERSION}-seed{seed}",
                            lambda tmp: without_touching_global_rng(build_tiny_pairs, tmp, seed=seed))
    return str(root / view)


MODEL_SOURCES.register(
    "tiny", resolve_model_spec,
    description="offline tiny models, built from a seed on first use and cached: "
                + ", ".join(f"tiny:{name}" for name in TINY_MODELS),
    source="diffalign.offline",
)
