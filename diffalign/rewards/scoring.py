"""`diffalign score`: rate a folder of images with one or more rewards; bad rows are reported, never fatal.

Inputs: ``--images DIR|GLOB`` with prompts from ``--prompts FILE`` (one per line, matched to the sorted image
files, or jsonl with ``file_name`` / ``prompt``), or the ``samples.jsonl`` that ``diffalign sample`` writes
into its folder. An unreadable image or a missing prompt becomes a row with an ``error`` field.
"""

from __future__ import annotations

import csv
import glob
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from diffalign.data.records import to_rgb

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
MAX_SIDE = 2048  # every scorer resizes to ~224 px; shrinking huge images first saves memory and time


@dataclass
class ScoreRow:
    file: str
    prompt: str | None
    scores: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def image_files(images: str) -> list[Path]:
    path = Path(images)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        files = sorted(Path(p) for p in glob.glob(images, recursive=True) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images found at {images}: give a folder or a glob such as 'out/*.png'")
    return files


def read_prompt_map(prompts: str | None, files: list[Path], images: str) -> dict[Path, str]:
    """file -> prompt, from --prompts (txt or jsonl) or a samples.jsonl next to the images."""
    source = Path(prompts) if prompts else None
    if source is None:
        folder = Path(images) if Path(images).is_dir() else files[0].parent
        source = folder / "samples.jsonl" if (folder / "samples.jsonl").is_file() else None
        if source is None:
            raise FileNotFoundError(f"no prompts: give --prompts FILE, or score a folder written by diffalign sample "
                                    f"(it has samples.jsonl); {folder} has none")
    if not source.is_file():
        raise FileNotFoundError(f"prompts file {source} not found")
    lines = [line for line in source.read_text().splitlines() if line.strip()]
    if source.suffix == ".jsonl":
        mapping = {}
        for line in lines:
            entry = json.loads(line)
            if "file_name" in entry and entry.get("prompt"):
                mapping[(source.parent / entry["file_name"]).resolve()] = entry["prompt"]
        return {file: mapping[file.resolve()] for file in files if file.resolve() in mapping}
    if len(lines) != len(files):
        raise ValueError(f"{source} has {len(lines)} prompts for {len(files)} images; a text file is matched to the "
                         "sorted image files line by line, so the counts must agree (or use jsonl with file_name)")
    return dict(zip(files, lines))


def load_for_scoring(path: Path) -> Image.Image:
    image = Image.open(path)
    image.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at reduced size when very large
    image.load()
    image = to_rgb(image)
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.BICUBIC)
    return image


def score_rows(rows: list[ScoreRow], rewards: dict, batch_size: int) -> list[ScoreRow]:
    """Score every row that has an image and a prompt, in batches; failures go to the row's ``error``."""
    pending = [row for row in rows if row.error is None]
    with tqdm(total=len(pending), desc="scoring", disable=None) as bar:
        for start in range(0, len(pending), batch_size):
            batch, images = [], []
            for row in pending[start : start + batch_size]:
                try:
                    images.append(load_for_scoring(Path(row.file)))
                    batch.append(row)
                except Exception as error:  # PIL raises many types for bad files
                    row.error = f"unreadable image: {type(error).__name__}: {error}"
            if batch:
                prompts = [row.prompt for row in batch]
                for name, reward in rewards.items():
                    values = reward.score(images, prompts)
                    for row, value in zip(batch, values.tolist()):
                        row.scores[name] = float(value)
            bar.update(len(pending[start : start + batch_size]))
    return rows


def collect_rows(images: str, prompts: str | None) -> list[ScoreRow]:
    files = image_files(images)
    prompt_map = read_prompt_map(prompts, files, images)
    return [ScoreRow(str(file), prompt_map.get(file), error=None if file in prompt_map else "no prompt for this image")
            for file in files]


def add_ensemble(rows: list[ScoreRow], names: list[str], weights: dict[str, float] | None) -> None:
    from diffalign.rewards.ensemble import zscore_ensemble

    scored = [row for row in rows if row.error is None and row.scores]
    if len(names) < 2 or not scored:
        return
    values = {name: torch.tensor([row.scores[name] for row in scored]) for name in names}
    for row, value in zip(scored, zscore_ensemble(values, [row.prompt for row in scored], weights).tolist()):
        row.scores["ensemble_z"] = value


def write_rows(rows: list[ScoreRow], names: list[str], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = [{"file": row.file, "prompt": row.prompt, **{name: row.scores.get(name) for name in names},
                "error": row.error} for row in rows]
    if out.suffix == ".jsonl":
        out.write_text("".join(json.dumps(record) + "\n" for record in records))
    elif out.suffix == ".csv":
        with open(out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["file", "prompt", *names, "error"])
            writer.writeheader()
            writer.writerows(records)
    else:
        raise ValueError(f"--out must end in .csv or .jsonl, got {out}")
    return out


def summary(rows: list[ScoreRow], names: list[str]) -> str:
    lines = ["| reward | mean | std | n |", "|---|---|---|---|"]
    for name in names:
        values = [row.scores[name] for row in rows if name in row.scores]
        mean = sum(values) / len(values) if values else math.nan
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) if values else math.nan
        lines.append(f"| {name} | {mean:.4f} | {std:.4f} | {len(values)} |")
    failed = sum(row.error is not None for row in rows)
    if failed:
        lines.append(f"\n{failed} of {len(rows)} rows not scored (see the error column)")
    return "\n".join(lines)
