"""The README.md model card written into every run folder: Hugging Face front matter, a settings table, the final
metrics and how to load the weights with stock diffusers."""

from __future__ import annotations

from pathlib import Path

import yaml

from diffalign.config import Config, resolve_reference

CARD = """---
{front_matter}---

# {objective} {kind} for `{base}`

Trained with [diffalign](https://pypi.org/project/diffalign/).

| | |
|---|---|
| base model | `{base}` |
| objective | `{objective}` ({params}) |
| data | {data_row} |
| steps | {steps} optimizer steps ({skipped_steps} skipped), batch {batch} x accumulation {accumulation} x {processes} processes |
| learning rate | {lr} ({scheduler}, warmup {warmup}) |
| weights | {weights} |
| reference | {reference} |
| mixed precision | {precision} |

## Final metrics (mean over the last logging window)

| metric | value |
|---|---|
{metric_rows}

## How to load

{how_to_load}
The full resolved config is in `config.yaml`; validation grids are in `samples/`; tensorboard logs in `logs/`.
"""

LOAD_LORA = """```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base_path}")
pipe.load_lora_weights("{output_dir}")
image = pipe("a photo of a cat").images[0]
```"""

KOHYA_NOTE = """

For ComfyUI / A1111, export the kohya format: `diffalign export {output_dir} --format kohya`."""

LOAD_FULL = """```python
from diffusers import DiffusionPipeline, {denoiser_class}

{component} = {denoiser_class}.from_pretrained("{output_dir}/{component}")
pipe = DiffusionPipeline.from_pretrained("{base_path}", {component}={component})
image = pipe("a photo of a cat").images[0]
```"""

NEGATIVE_NOTE = ("\n\nThis is a *negative* LoRA (NPO): it is meant for the unconditional branch of "
                 "classifier-free guidance, not to be sampled alone.")


def data_row(cfg: Config, run_info: dict) -> str:
    """What the run trained on: records of ``data.source``, or an online run's sampled rounds."""
    online = run_info.get("online")
    if online is not None:
        rewards = ", ".join(f"{name} x {weight:g}" for name, weight in cfg.online.rewards.items())
        return (f"online: {online['rounds']} rounds of {online['images_per_round']} images sampled from the model, "
                f"prompts `{cfg.online.prompts}`, rewards {rewards}")
    data = run_info.get("data", {})
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(data.get("skipped", {}).items())) or "none"
    return f"`{cfg.data.source}`: {data.get('kept', '?')} records used, skipped: {skipped}"


def write_model_card(cfg: Config, output_dir: Path, run_info: dict, family, base_path: str | None = None,
                     lora_targets: tuple[str, ...] | None = None) -> Path:
    """Write ``output_dir/README.md``.

    Args:
        run_info: the run's ``run_info.json`` content (steps, skipped steps, processes, data report, metrics).
        family: names the denoiser's class and pipeline component (for loading a full fine-tune) and the default
            LoRA targets.
        lora_targets: the default targets for this denoiser (``family.lora_targets``), when not the family's.
        base_path: what to pass to ``from_pretrained`` (the resolved folder for a ``tiny:`` spec); default
            ``model.pretrained``.
    """
    metrics = run_info.get("final_metrics") or {}
    card = CARD.format(
        front_matter=yaml.safe_dump({"base_model": cfg.model.pretrained, "library_name": "diffusers",
                                     "tags": ["diffalign", "lora", cfg.objective.name, "text-to-image"]},
                                    sort_keys=False),
        objective=cfg.objective.name, kind="LoRA" if cfg.lora.enabled else "fine-tune", base=cfg.model.pretrained,
        params=", ".join(f"{k}={v}" for k, v in cfg.objective.selected.items()) or "none",
        data_row=data_row(cfg, run_info),
        steps=run_info["global_step"], skipped_steps=run_info.get("skipped_steps", 0), batch=cfg.train.batch_size,
        accumulation=cfg.train.gradient_accumulation_steps, processes=run_info.get("num_processes", 1),
        lr=cfg.train.learning_rate, scheduler=cfg.train.lr_scheduler, warmup=cfg.train.lr_warmup_steps,
        weights=weights_row(cfg, lora_targets or family.default_lora_targets, family),
        reference=resolve_reference(cfg), precision=cfg.train.mixed_precision,
        metric_rows="\n".join(f"| {name} | {value:.6g} |" for name, value in sorted(metrics.items())
                              if name != "compile_graphs") or "| (none) | |",
        how_to_load=how_to_load(cfg, family, output_dir, base_path or cfg.model.pretrained),
    )
    path = output_dir / "README.md"
    path.write_text(card)
    return path


def weights_row(cfg: Config, default_targets, family) -> str:
    if not cfg.lora.enabled:
        return f"full fine-tune of the denoiser, saved as a diffusers folder in `{family.denoiser_subfolder}/`"
    alpha = cfg.lora.alpha if cfg.lora.alpha is not None else cfg.lora.rank
    base = (f" (trained on a {cfg.model.quantize}-quantised frozen base; it loads into the unquantised one)"
            if cfg.model.quantize != "none" else "")
    return (f"LoRA rank {cfg.lora.rank}, alpha {alpha}, on {', '.join(cfg.lora.target_modules or default_targets)}"
            f"{base}")


def how_to_load(cfg: Config, family, output_dir: Path, base_path: str) -> str:
    """Python that loads the weights with stock diffusers (plus the kohya export for a LoRA)."""
    if cfg.lora.enabled:
        text = LOAD_LORA.format(base_path=base_path, output_dir=output_dir)
        text += KOHYA_NOTE.format(output_dir=output_dir) if family.kohya_export else ""
    else:
        text = LOAD_FULL.format(denoiser_class=family.denoiser_class_name, component=family.denoiser_subfolder,
                                output_dir=output_dir, base_path=base_path)
    return text + (NEGATIVE_NOTE if cfg.objective.name in ("npo", "self_npo") else "")
