"""LoRA on the denoiser: attach with peft, save in the diffusers format (with alpha metadata), export to kohya."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch
import yaml
from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from diffalign.errors import ConfigError, ModelError
from diffalign.training.kohya_flux import flux_to_kohya, is_flux_lora

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"


def attach_lora(denoiser: torch.nn.Module, lora_cfg, default_targets) -> None:
    """Add a trainable peft LoRA adapter named "default" and freeze everything else."""
    denoiser.requires_grad_(False)
    config = LoraConfig(
        r=lora_cfg.rank,
        lora_alpha=lora_cfg.alpha if lora_cfg.alpha is not None else lora_cfg.rank,
        lora_dropout=lora_cfg.dropout,
        init_lora_weights="gaussian",
        target_modules=list(lora_cfg.target_modules or default_targets),
    )
    denoiser.add_adapter(config)
    if not any(p.requires_grad for p in denoiser.parameters()):
        raise ConfigError(f"lora.target_modules={lora_cfg.target_modules} matched no module of the denoiser")


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """The reference model for LoRA training: the same weights with the adapters off.

    Call it on the *unwrapped* model: under DDP, toggling adapters through the wrapper fails (diffusers #6351).
    """
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


def peft_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in get_peft_model_state_dict(model).items()}


def adapter_metadata(model: torch.nn.Module) -> dict:
    """The peft config as a dict, saved next to the weights (``save_lora_weights(...,
    unet_lora_adapter_metadata=...)``) so lora_alpha survives a reload: without it, diffusers' ``load_lora_weights``
    silently takes alpha = rank, and the outputs differ whenever alpha != rank."""
    return model.peft_config["default"].to_dict()


def trainable_checksum(model: torch.nn.Module) -> str:
    """A hash of the trained weights (the LoRA, or every weight in a full fine-tune): equal across processes
    when DDP kept them in sync."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


def save_lora(family, model: torch.nn.Module, directory: str | Path) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` in the format the family's diffusers pipeline loads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    family.save_lora(str(directory), peft_state_dict(model), adapter_metadata(model))
    return directory / LORA_WEIGHT_NAME


def load_lora_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ModelError(f"LoRA state has keys the model does not: {unexpected[:3]}")


def export_kohya(run_dir: str | Path, out_path: str | Path | None = None, prefix: str = "unet",
                 family: str | None = None) -> Path:
    """Convert a run's diffusers LoRA file to the kohya / ComfyUI / A1111 key format.

    UNet LoRAs (SD1.x/2.x, SDXL: keys under ``unet.``) go through diffusers' converter; diffusers writes each
    module's ``.alpha`` as the rank, we write the real alpha from the saved adapter metadata, so a LoRA trained with
    alpha != rank keeps its strength in other tools. FLUX transformer LoRAs go to ``kohya_flux.flux_to_kohya``
    (BFL's module names, fused qkv). A transformer LoRA counts as FLUX when ``family`` is "flux", when it has
    single-stream blocks, or when the run's ``config.yaml`` (next to the file or one folder up) names a FLUX
    model; SD3 LoRAs are refused.

    Raises ``ModelError`` for a missing file, an SD3 (or unidentified) transformer LoRA, or modules the kohya
    format cannot hold.
    """
    run_dir = Path(run_dir)
    source = run_dir / LORA_WEIGHT_NAME if run_dir.is_dir() else run_dir
    if not source.is_file():
        if any((run_dir / name / "config.json").is_file() for name in ("unet", "transformer")):
            raise ModelError(f"{run_dir} is a full fine-tune (a denoiser folder, no LoRA): the kohya export converts "
                             "LoRAs only")
        if (run_dir / "segments.yaml").is_file():
            raise ModelError(f"{run_dir} is a timestep-segment run: export each segment's LoRA folder (the paths in "
                             "its segments.yaml)")
        raise ModelError(f"no {LORA_WEIGHT_NAME} in {run_dir}; give a finished run folder or checkpoint")
    with safe_open(str(source), framework="pt") as handle:
        header = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    unet_tensors = {k.removeprefix(f"{prefix}."): v for k, v in tensors.items() if k.startswith(f"{prefix}.")}
    metadata = {"ss_network_module": "networks.lora"}
    if unet_tensors:
        kohya = _unet_to_kohya(unet_tensors, prefix, _alpha_from_metadata(header))
    elif any(key.startswith("transformer.") for key in tensors) and _transformer_family(tensors, source, family) == "flux":
        kohya = flux_to_kohya(tensors, header)
        metadata = {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1"}
    elif any(key.startswith("transformer.") for key in tensors):
        raise ModelError(f"{source} is an SD3 / SD3.5 transformer LoRA, which has no kohya layout: an SD3 transformer "
                         "LoRA stays in the diffusers format; load it with pipe.load_lora_weights. (A FLUX LoRA "
                         "without single-stream blocks, outside its run folder: export_kohya(..., family='flux').)")
    else:
        adapted = sorted({key.split(".", 1)[0] for key in tensors})
        raise ModelError(f"{source} holds no '{prefix}.*' LoRA weights (it adapts: {', '.join(adapted)}); the kohya "
                         "export converts UNet (SD1.x/2.x, SDXL) and FLUX.1 LoRAs")
    out_path = Path(out_path) if out_path else source.parent / KOHYA_WEIGHT_NAME
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(out_path), metadata=metadata)
    return out_path


def _unet_to_kohya(unet_tensors: dict[str, torch.Tensor], prefix: str, alpha: float | None) -> dict:
    peft_state = {f"{prefix}.{k}": v for k, v in convert_unet_state_dict_to_peft(unet_tensors).items()}
    kohya = convert_state_dict_to_kohya(peft_state)
    for key in kohya:
        if key.endswith(".alpha") and alpha is not None:
            kohya[key] = torch.tensor(float(alpha))
    return kohya


def _transformer_family(tensors: dict, source: Path, family: str | None) -> str | None:
    """"flux", another family's name, or None when unknown (SD3 and FLUX share the double-block key names)."""
    if family is not None:
        return family
    if is_flux_lora(tensors):
        return "flux"
    return _run_family(source)


def _run_family(source: Path) -> str | None:
    """The family of the run that saved ``source``: its ``config.yaml`` sits next to the weights (run folder) or one
    folder up (``checkpoint-N``); ``model.family``, else detected from ``model.pretrained``'s model_index.json.
    None when there is no readable config or the base model cannot be reached."""
    from diffalign.families import detect_family, resolve_pretrained

    for folder in (source.parent, source.parent.parent):
        config = folder / "config.yaml"
        if not config.is_file():
            continue
        try:
            model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
            if model.get("family", "auto") != "auto":
                return model["family"]
            return detect_family(resolve_pretrained(model["pretrained"]), model.get("revision")).name
        except (OSError, KeyError, AttributeError, ValueError, yaml.YAMLError):  # no base to ask: unknown
            return None
    return None


def _alpha_from_metadata(header: dict) -> float | None:
    """diffusers stores the peft config flat as JSON under "lora_adapter_metadata": {"unet.lora_alpha": 8, ...}."""
    data = json.loads(header.get("lora_adapter_metadata", "{}"))
    alphas = [value for key, value in data.items() if key == "lora_alpha" or key.endswith(".lora_alpha")]
    return float(alphas[0]) if alphas else None
