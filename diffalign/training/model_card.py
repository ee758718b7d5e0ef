"""The README.md model card written into every run folder."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_model_card(cfg, output_dir: Path, run_info: dict, family, base_path: str | None = None) -> Path:
    """``base_path`` is what to pass to from_pretrained (the resolved folder for a tiny: spec); ``family`` names
    the denoiser's class and pipeline component (for loading a full fine-tune) and the default LoRA targets."""
    denoiser_class, component = family.denoiser_class_name, family.denoiser_subfolder
    base_path = base_path or cfg.model.pretrained
    metrics = run_info.get("final_metrics") or {}
    metric_rows = "\n".join(f"| {name} | {value:.6g} |" for name, value in sorted(metrics.items())) or "| (none) | |"
    data = run_info.get("data", {})
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(data.get("skipped", {}).items())) or "none"
    params = ", ".join(f"{k}={v}" for k, v in cfg.objective.selected.items()) or "none"
    from diffalign.config import resolve_reference

    reference = resolve_reference(cfg)
    if cfg.lora.enabled:
        alpha = cfg.lora.alpha if cfg.lora.alpha is not None else cfg.lora.rank
        lora_row = f"LoRA rank {cfg.lora.rank}, alpha {alpha}, on {', '.join(cfg.lora.target_modules or family.default_lora_targets)}"
        how_to_load = f"""```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base_path}")
pipe.load_lora_weights("{output_dir}")
image = pipe("a photo of a cat").images[0]
```

For ComfyUI / A1111, export the kohya format: `diffalign export {output_dir} --format kohya`."""
    else:
        lora_row = f"full fine-tune of the denoiser, saved as a diffusers folder in `{component}/`"
        how_to_load = f"""```python
from diffusers import DiffusionPipeline, {denoiser_class}

{component} = {denoiser_class}.from_pretrained("{output_dir}/{component}")
pipe = DiffusionPipeline.from_pretrained("{base_path}", {component}={component})
image = pipe("a photo of a cat").images[0]
```"""
    if cfg.objective.name in ("npo", "self_npo"):
        how_to_load += ("\n\nThis is a *negative* LoRA (NPO): it is meant for the unconditional branch of "
                        "classifier-free guidance, not to be sampled alone.")
    front_matter = yaml.safe_dump(
        {"base_model": cfg.model.pretrained, "library_name": "diffusers",
         "tags": ["diffalign", "lora", cfg.objective.name, "text-to-image"]},
        sort_keys=False,
    )
    card = f"""---
{front_matter}---

# {cfg.objective.name} {"LoRA" if cfg.lora.enabled else "fine-tune"} for `{cfg.model.pretrained}`

Trained with [diffalign](https://pypi.org/project/diffalign/).

| | |
|---|---|
| base model | `{cfg.model.pretrained}` |
| objective | `{cfg.objective.name}` ({params}) |
| data | `{cfg.data.source}`: {data.get("kept", "?")} records used, skipped: {skipped} |
| steps | {run_info["global_step"]} optimizer steps ({run_info.get("skipped_steps", 0)} skipped), batch {cfg.train.batch_size} x accumulation {cfg.train.gradient_accumulation_steps} x {run_info.get("num_processes", 1)} processes |
| learning rate | {cfg.train.learning_rate} ({cfg.train.lr_scheduler}, warmup {cfg.train.lr_warmup_steps}) |
| weights | {lora_row} |
| reference | {reference} |
| mixed precision | {cfg.train.mixed_precision} |

## Final metrics (mean over the last logging window)

| metric | value |
|---|---|
{metric_rows}

## How to load

{how_to_load}
The full resolved config is in `config.yaml`; validation grids are in `samples/`; tensorboard logs in `logs/`.
"""
    path = output_dir / "README.md"
    path.write_text(card)
    return path
