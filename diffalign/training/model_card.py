"""The README.md model card written into every run folder."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_model_card(cfg, output_dir: Path, run_info: dict, base_path: str | None = None) -> Path:
    """``base_path`` is what to pass to from_pretrained (the resolved folder for a tiny: spec)."""
    base_path = base_path or cfg.model.pretrained
    metrics = run_info.get("final_metrics") or {}
    metric_rows = "\n".join(f"| {name} | {value:.6g} |" for name, value in sorted(metrics.items())) or "| (none) | |"
    data = run_info.get("data", {})
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(data.get("skipped", {}).items())) or "none"
    params = ", ".join(f"{k}={v}" for k, v in cfg.objective.selected.items()) or "none"
    front_matter = yaml.safe_dump(
        {"base_model": cfg.model.pretrained, "library_name": "diffusers",
         "tags": ["diffalign", "lora", cfg.objective.name, "text-to-image"]},
        sort_keys=False,
    )
    card = f"""---
{front_matter}---

# {cfg.objective.name} LoRA for `{cfg.model.pretrained}`

Trained with [diffalign](https://pypi.org/project/diffalign/).

| | |
|---|---|
| base model | `{cfg.model.pretrained}` |
| objective | `{cfg.objective.name}` ({params}) |
| data | `{cfg.data.source}`: {data.get("kept", "?")} records used, skipped: {skipped} |
| steps | {run_info["global_step"]} optimizer steps ({run_info.get("skipped_steps", 0)} skipped), batch {cfg.train.batch_size} x accumulation {cfg.train.gradient_accumulation_steps} x {run_info.get("num_processes", 1)} processes |
| learning rate | {cfg.train.learning_rate} ({cfg.train.lr_scheduler}, warmup {cfg.train.lr_warmup_steps}) |
| LoRA | rank {cfg.lora.rank}, alpha {cfg.lora.alpha if cfg.lora.alpha is not None else cfg.lora.rank}, on {", ".join(cfg.lora.target_modules)} |
| mixed precision | {cfg.train.mixed_precision} |

## Final metrics (mean over the last logging window)

| metric | value |
|---|---|
{metric_rows}

## How to load

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base_path}")
pipe.load_lora_weights("{output_dir}")
image = pipe("a photo of a cat").images[0]
```

For ComfyUI / A1111, export the kohya format: `diffalign export {output_dir} --format kohya`.
The full resolved config is in `config.yaml`; validation grids are in `samples/`; tensorboard logs in `logs/`.
"""
    path = output_dir / "README.md"
    path.write_text(card)
    return path
