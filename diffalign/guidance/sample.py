"""``diffalign sample``: images for a set of prompts, with any guidance mode, plus a samples.jsonl record.

Image j of prompt i is drawn with seed ``seed + i * num_images + j``, so two setups sampled with the same
prompts and seed are compared image by image (the win-rate protocol).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffalign.text import LineSkips, describe_value, json_problem, text_lines, text_problem

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "prompts"


def prompt_sets() -> list[str]:
    return sorted(path.stem for path in ASSETS.glob("*.txt"))


def read_prompts(prompt: str | None = None, prompts_file: str | None = None, prompt_set: str | None = None) -> list[str]:
    """Prompts from a string, a file or a shipped set name (``assets/prompts/<name>.txt``).

    Files: ``.txt``, one prompt per line (blank lines ignored, spaces around a prompt stripped), or ``.jsonl``, one
    JSON object with a ``"prompt"`` string per line (other keys ignored). Each line is decoded strictly as UTF-8
    (``diffalign.text.text_lines``; a byte-order mark is dropped). A line that cannot give a prompt (not UTF-8, a
    NUL byte, not JSON, not an object, no ``prompt``, a prompt that is not text) is skipped, and one printed line
    gives the counts per reason and the first example ("line 3 of p.txt is not UTF-8 (byte 0xff at column 12)").
    Raises ``ValueError`` (wrong arguments, an unknown set, a file with no usable prompt) and
    ``FileNotFoundError``.
    """
    if sum(x is not None for x in (prompt, prompts_file, prompt_set)) != 1:
        raise ValueError("give exactly one of --prompt, --prompts FILE or --prompt-set NAME")
    if prompt is not None:
        return [prompt]
    if prompt_set is not None:
        path = ASSETS / f"{prompt_set}.txt"
        if not path.is_file():
            raise ValueError(f"unknown prompt set '{prompt_set}'; shipped sets: {', '.join(prompt_sets())}")
    else:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path} not found")
    prompts, skips = [], LineSkips()
    for number, text, problem in text_lines(path):
        if problem is not None:
            skips.add("bad_text", problem)
        elif text.strip() and path.suffix == ".jsonl":
            prompt, reason, detail = jsonl_prompt(text)
            if reason is not None:
                skips.add(reason, f"line {number} of {path}: {detail}")
            else:
                prompts.append(prompt)
        elif text.strip():
            prompts.append(text.strip())
    summary = skips.summary(f"prompts from {path}", len(prompts))
    if summary:
        print(summary)
    if not prompts:
        raise ValueError(f"{path} holds no prompts" + (f" ({summary})" if summary else ""))
    return prompts


def jsonl_prompt(text: str) -> tuple[str | None, str | None, str | None]:
    """One jsonl line -> (prompt, None, None), or (None, reason, detail) when it gives no prompt."""
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as error:
        return None, "bad_json", f"not JSON ({json_problem(error)})"
    if not isinstance(entry, dict):
        return None, "bad_json", f"{describe_value(entry)}, not a JSON object with a \"prompt\""
    if "prompt" not in entry:
        return None, "missing_field", f"no \"prompt\" key (keys: {sorted(entry)[:10]})"
    prompt = entry["prompt"]
    problem = text_problem(prompt)
    if problem is not None:
        return None, "bad_text", problem
    if not prompt.strip():
        return None, "empty_prompt", "the prompt is blank"
    return prompt.strip(), None, None


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


def sample_to_folder(pipe, prompts: list[str], settings: SampleSettings, out_dir: str | Path,
                     setup: dict | None = None) -> Path:
    """Write one PNG per image, ``samples.jsonl`` (prompt, seed, settings per image) and ``overview/grid.png``
    (in a subfolder, so that scoring the folder sees only the samples)."""
    from diffalign.training.validation import image_grid

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
                negative_prompt=[settings.negative_prompt] * len(batch) if settings.negative_prompt else None,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                height=settings.height,
                width=settings.width,
                generator=[torch.Generator(device="cpu").manual_seed(seed) for *_, seed in batch],
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
    if grid_images:
        rows = min(len(prompts), 16)
        (out_dir / "overview").mkdir(exist_ok=True)
        image_grid(grid_images, columns=settings.num_images, labels=prompts[:rows]).save(out_dir / "overview" / "grid.png")
    return out_dir / "samples.jsonl"
