"""Model families behind one interface: the ``FAMILIES`` registry (``model.family``), detection from a
checkpoint's ``model_index.json``, and ``load_components``.

    >>> import diffalign.offline                  # registers the tiny:<model> source
    >>> from diffalign.config import ModelConfig
    >>> components = load_components(ModelConfig(pretrained="tiny:sd15"))   # resolved, detected, loaded
    >>> components.family.name, get_family("sdxl").name
    ('sd', 'sdxl')

Families: ``sd`` (Stable Diffusion 1.x and 2.x, epsilon or v-prediction), ``sdxl``, ``sd3`` (SD3 / SD3.5) and
``flux`` (FLUX.1 [dev] / [schnell]).

``model.pretrained`` is a hub id, a local diffusers folder, or ``<source>:<name>`` for a source registered in
``MODEL_SOURCES``. ``diffalign.offline`` registers ``tiny`` when it is imported (``tiny:sd15`` is then built on
first use and cached), and the modules that take a config (training, guidance, the CLI) import it. The families
never import the offline builders: those build on the families, not the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from diffalign.errors import ConfigError, ModelError
from diffalign.families.base import DiffusionComponents, Family, read_model_index
from diffalign.families.flux import FluxFamily
from diffalign.families.sd import StableDiffusionFamily
from diffalign.families.sd3 import StableDiffusion3Family
from diffalign.families.sdxl import StableDiffusionXLFamily
from diffalign.registry import Registry

FAMILIES: Registry[Family] = Registry("model family", "model.family")
FAMILIES.register(
    StableDiffusionFamily.name, StableDiffusionFamily(),
    description="Stable Diffusion 1.x and 2.x: UNet, one CLIP text encoder, DDPM noise schedule; the target follows "
                "the scheduler's prediction_type (epsilon, v_prediction or sample)",
    source="Rombach et al. 2022 (arXiv 2112.10752); CompVis/stable-diffusion, Stability-AI/stablediffusion",
)
FAMILIES.register(
    StableDiffusionXLFamily.name, StableDiffusionXLFamily(),
    description="Stable Diffusion XL: UNet with text_time conditioning (pooled text, per-image size and crop ids), "
                "two CLIP text encoders",
    source="Podell et al. 2023 (arXiv 2307.01952); Stability-AI/generative-models",
)
FAMILIES.register(
    StableDiffusion3Family.name, StableDiffusion3Family(),
    description="Stable Diffusion 3 / 3.5: MMDiT transformer, rectified flow (velocity target), two CLIP text "
                "encoders and T5",
    source="Esser et al. 2024 (arXiv 2403.03206); stabilityai/stable-diffusion-3-medium-diffusers",
)
FAMILIES.register(
    FluxFamily.name, FluxFamily(),
    description="FLUX.1 [dev] and [schnell]: MMDiT with single-stream blocks, rectified flow with resolution-dependent "
                "shifting, 2x2 latent packing, CLIP pooled + T5, [dev]'s embedded guidance",
    source="Black Forest Labs 2024 (black-forest-labs/flux); diffusers FluxPipeline",
)
# "<source>:<name>" model specs: source -> resolver(spec) returning a local folder or hub id.
MODEL_SOURCES: Registry[Callable[[str], str]] = Registry("model source", "model.pretrained")


def get_family(name: str) -> Family:
    """The family registered as ``name``. Raises ``ConfigError`` for an unknown name, naming the closest one."""
    return FAMILIES.get(name)


def detect_family(pretrained: str, revision: str | None = None) -> Family:
    """The family whose pipeline class the checkpoint's ``model_index.json`` names (a local folder or hub id)."""
    class_name = read_model_index(pretrained, revision).get("_class_name", "")
    for entry in FAMILIES.entries():
        if class_name in entry.value.pipeline_class_names:
            return entry.value
    raise ModelError(f"{pretrained} is a {class_name or 'unknown pipeline'}; supported: "
                     + ", ".join(n for e in FAMILIES.entries() for n in e.value.pipeline_class_names)
                     + ". Set model.family to force one.")


def resolve_pretrained(pretrained: str) -> str:
    """``model.pretrained`` as a local folder or hub id: a ``<source>:<name>`` spec goes through its registered
    resolver (``MODEL_SOURCES``); anything else is returned unchanged."""
    source, colon, _ = pretrained.partition(":")
    if not colon or len(source) < 2 or Path(pretrained).exists():  # no spec (a one-letter source is a drive)
        return pretrained
    if source not in MODEL_SOURCES:
        registered = ", ".join(f"{name}:" for name in MODEL_SOURCES) or "none"
        raise ConfigError(f"model.pretrained='{pretrained}': unknown model source '{source}' (registered: "
                          f"{registered}; importing diffalign.offline registers tiny:). Give a hub id, a local "
                          "diffusers folder or a registered <source>:<name>.")
    return MODEL_SOURCES.get(source)(pretrained)


def load_components(model_cfg) -> DiffusionComponents:
    """Resolve ``model.pretrained`` (``resolve_pretrained``), pick the family (``model.family``, or detected when
    ``auto``) and load its components."""
    path = resolve_pretrained(model_cfg.pretrained)
    family = detect_family(path, model_cfg.revision) if model_cfg.family == "auto" else get_family(model_cfg.family)
    return family.load(model_cfg, path)


__all__ = ["DiffusionComponents", "FAMILIES", "Family", "MODEL_SOURCES", "detect_family", "get_family",
           "load_components", "read_model_index", "resolve_pretrained"]
