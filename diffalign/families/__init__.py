"""Model families behind one interface, plus detection from a checkpoint's model_index.json."""

from __future__ import annotations

import json
from pathlib import Path

from diffalign.errors import ConfigError, closest
from diffalign.families.base import DiffusionComponents, Family
from diffalign.families.sd import StableDiffusionFamily
from diffalign.families.sd3 import StableDiffusion3Family
from diffalign.families.sdxl import StableDiffusionXLFamily

FAMILIES: dict[str, Family] = {
    family.name: family for family in (StableDiffusionFamily(), StableDiffusionXLFamily(), StableDiffusion3Family())
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family '{name}'.{closest(name, FAMILIES)}")
    return FAMILIES[name]


def read_model_index(pretrained: str, revision: str | None = None) -> dict:
    local = Path(pretrained)
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise ConfigError(f"{pretrained} has no model_index.json; model.pretrained must be a diffusers-format folder")
        return json.loads(index.read_text())
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(pretrained, "model_index.json", revision=revision)).read_text())
    except Exception as error:  # offline, missing repo, gated model: say what to do
        raise ConfigError(
            f"could not read model_index.json for model.pretrained='{pretrained}': {error}. Give a local diffusers "
            "folder, a reachable hub id (log in with `hf auth login` for gated models), or tiny:sd15 offline."
        ) from error


def detect_family(pretrained: str, revision: str | None = None) -> Family:
    class_name = read_model_index(pretrained, revision).get("_class_name", "")
    for family in FAMILIES.values():
        if class_name in family.pipeline_class_names:
            return family
    raise ConfigError(f"{pretrained} is a {class_name or 'unknown pipeline'}; supported: "
                      + ", ".join(n for f in FAMILIES.values() for n in f.pipeline_class_names)
                      + ". Set model.family to force one.")


def load_components(model_cfg) -> DiffusionComponents:
    """Resolve ``model.pretrained`` (tiny specs are built on first use) and load the family's components."""
    from diffalign.tiny import resolve_model_spec

    path = resolve_model_spec(model_cfg.pretrained)
    family = detect_family(path, model_cfg.revision) if model_cfg.family == "auto" else get_family(model_cfg.family)
    return family.load(model_cfg, path)


__all__ = ["DiffusionComponents", "Family", "FAMILIES", "detect_family", "get_family", "load_components"]
