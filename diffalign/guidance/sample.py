"""``diffalign sample``: images for a set of prompts, with any guidance mode, plus a samples.jsonl record.

Image j of prompt i is drawn with seed ``seed + i * num_images + j``, so two setups sampled with the same
prompts and seed are compared image by image (the win-rate protocol). Prompts are read by
``diffalign.evaluation.prompts`` (``read_prompts``, ``load_prompts``).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffalign.errors import ConfigError
from diffalign.images import labelled_grid


@dataclass
class SampleSettings:
    num_images: int = 1  # per prompt
    seed: int = 0
    steps: int = 25
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 4
    true_cfg_scale: float | None = None  # FLUX: true CFG's scale (a negative branch; NPO guidance there needs it)


def check_true_cfg(family, true_cfg_scale: float | None, npo: bool, where: str = "") -> None:
    """Refuse, before any sampling, a true-CFG scale on a family without true CFG, and NPO guidance on one with
    it (FLUX) but no true CFG. Raises ``ConfigError``."""
    if true_cfg_scale is not None and not family.true_cfg:
        raise ConfigError(f"{where}--true-cfg is FLUX's true CFG; {family.name} models run classifier-free guidance "
                          "with --guidance instead")
    if npo and family.true_cfg and not (true_cfg_scale or 0) > 1:
        raise ConfigError(f"{where}NPO guidance on {family.name} runs in true CFG's negative branch: pass "
                          "--true-cfg 4 (true_cfg_scale > 1)")


def takes_true_cfg(pipe) -> bool:
    """Whether the pipeline runs true CFG (a separate negative branch: FluxPipeline's ``true_cfg_scale``)."""
    return "true_cfg_scale" in inspect.signature(type(pipe).__call__).parameters


def negative_kwargs(pipe, settings, count: int) -> dict:
    """The pipeline's negative-prompt arguments for ``count`` images of ``settings`` (``SampleSettings`` or
    ``PairSettings``): with ``true_cfg_scale`` (FluxPipeline's true CFG, which runs only with a negative prompt),
    the scale and the negative prompt, the empty one when none is given. Raises ``ConfigError`` for a true-CFG
    scale on a pipeline without true CFG (it would be ignored, or fail inside diffusers)."""
    negative = settings.negative_prompt
    true_cfg = getattr(settings, "true_cfg_scale", None)
    if true_cfg is None:
        return {"negative_prompt": [negative] * count if negative else None}
    if not takes_true_cfg(pipe):
        raise ConfigError(f"--true-cfg is FLUX's true CFG; {type(pipe).__name__} runs classifier-free guidance "
                          "with --guidance instead")
    return {"negative_prompt": [negative or ""] * count, "true_cfg_scale": true_cfg}


def sample_to_folder(pipe, prompts: list[str], settings: SampleSettings, out_dir: str | Path,
                     setup: dict | None = None) -> Path:
    """Write one PNG per image, ``samples.jsonl`` (prompt, seed, settings per image) and ``overview/grid.png``
    (in a subfolder, so that scoring the folder sees only the samples).

    Args:
        pipe: a diffusers text-to-image pipeline (e.g. ``guidance.load_pipeline``).
        prompts: image j of prompt i is ``{i:04d}_{j:02d}.png``, drawn with seed ``seed + i * num_images + j``.
        setup: extra keys recorded on every samples.jsonl line (the setup name, its adapters, ...).

    Returns:
        The path of ``samples.jsonl``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(i, j, prompt, settings.seed + i * settings.num_images + j)
            for i, prompt in enumerate(prompts) for j in range(settings.num_images)]
    records, grid_images = [], []
    pipe.set_progress_bar_config(disable=True)
    with open(out_dir / "samples.jsonl", "w") as log, tqdm(total=len(jobs), desc="sampling", disable=None) as bar:
        for start in range(0, len(jobs), settings.batch_size):
            batch = jobs[start : start + settings.batch_size]
            images = pipe(
                [prompt for _, _, prompt, _ in batch],
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                height=settings.height,
                width=settings.width,
                generator=[torch.Generator(device="cpu").manual_seed(seed) for *_, seed in batch],
                **negative_kwargs(pipe, settings, len(batch)),
            ).images
            for (i, j, prompt, seed), image in zip(batch, images):
                file_name = f"{i:04d}_{j:02d}.png"
                image.save(out_dir / file_name)
                settings_fields = {k: v for k, v in asdict(settings).items() if k not in ("seed", "batch_size")}
                record = {"file_name": file_name, "prompt": prompt, "seed": seed, "prompt_index": i,
                          "image_index": j, **settings_fields, **(setup or {})}
                log.write(json.dumps(record) + "\n")
                records.append(record)
                if i < 16:
                    grid_images.append(image)
            bar.update(len(batch))
    if grid_images:  # a row per prompt (the first 16), a column per image
        per_row = settings.num_images
        rows = [grid_images[start : start + per_row] for start in range(0, len(grid_images), per_row)]
        (out_dir / "overview").mkdir(exist_ok=True)
        labelled_grid(rows, row_labels=prompts[: len(rows)]).save(out_dir / "overview" / "grid.png")
    return out_dir / "samples.jsonl"
