"""`diffalign score`: rate a folder of images with one or more rewards; bad rows are reported, never fatal.

Inputs: ``--images DIR|GLOB`` with prompts from ``--prompts FILE`` (one per line, matched to the sorted image
files, or jsonl with ``file_name`` / ``prompt``), or the ``samples.jsonl`` that ``diffalign sample`` writes
into its folder. An unreadable image, one over the pixel limit (``--max-image-pixels``), a symlink that leaves
the folder (unless ``--follow-symlinks``) or a missing prompt becomes a row with an ``error`` field. Images are
decoded upright (EXIF orientation applied) by ``diffalign.images.load_image``, the one decoder.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from diffalign.errors import ConfigError, DataError
from diffalign.images import PILLOW_MAX_PIXELS, ImageTooLarge, load_image
from diffalign.logs import get_logger
from diffalign.rewards.base import require_scalar
from diffalign.rewards.ensemble import zscore_ensemble
from diffalign.text import LineSkips, describe_value, json_problem, text_lines, text_problem

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
MAX_SIDE = 2048  # every scorer resizes to ~224 px; shrinking huge images first saves memory and time
ENSEMBLE_LEFT_OUT = ("ensemble_z left out: it z-scores rewards within each prompt, and no prompt has two or more "
                     "scored images")

logger = get_logger(__name__)


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
        raise DataError(f"no images found at {images}: give a folder or a glob such as 'out/*.png'")
    return files


def base_folder(images: str) -> Path:
    """The folder ``--images`` stays inside: the folder itself, a glob's leading part without wildcards (``.`` for
    ``*.png``), or a single file's folder."""
    path = Path(images)
    if path.is_dir():
        return path
    fixed = []
    for part in path.parts:
        if re.search(r"[*?\[]", part):
            return Path(*fixed) if fixed else Path(".")
        fixed.append(part)
    return path.parent


def outside_links(files: list[Path], images: str) -> dict[Path, str]:
    """file -> error, for every file whose real path (symlinks resolved) is outside ``base_folder(images)``."""
    base = base_folder(images)
    root = base.resolve()
    errors = {}
    for file in files:
        target = file.resolve()
        if not target.is_relative_to(root):
            errors[file] = f"symlink to {target} outside {base}; pass --follow-symlinks to score it"
    return errors


def read_prompt_map(prompts: str | None, files: list[Path], images: str) -> dict[Path, str]:
    """file -> prompt, from --prompts (txt or jsonl) or a samples.jsonl next to the images.

    A ``.txt`` is matched line by line to the sorted image files (blank lines ignored), so the counts must agree
    (``DataError`` otherwise). A ``.jsonl`` (or ``samples.jsonl``) maps each line's ``file_name`` (relative to the
    jsonl's folder) to its ``prompt``. Lines are decoded strictly as UTF-8 (``diffalign.text.text_lines``). A line
    that gives no prompt (not UTF-8, a NUL byte, not a JSON object, no ``file_name``, a prompt that is not text or
    is blank) is left out of the map, so its image gets a row with an ``error`` and is not scored; in a ``.txt`` the
    bad line keeps its place, so the images after it keep their prompts. One printed line gives the counts per
    reason and the first example. ``DataError`` when there is no prompts file.
    """
    source = Path(prompts) if prompts else None
    if source is None:
        folder = Path(images) if Path(images).is_dir() else files[0].parent
        source = folder / "samples.jsonl" if (folder / "samples.jsonl").is_file() else None
        if source is None:
            raise DataError(f"no prompts: give --prompts FILE, or score a folder written by diffalign sample "
                                    f"(it has samples.jsonl); {folder} has none")
    if not source.is_file():
        raise DataError(f"prompts file {source} not found")
    skips, mapping = LineSkips(), {}
    if source.suffix == ".jsonl":
        for number, text, problem in text_lines(source):
            if problem is not None:
                skips.add("bad_text", problem)
                continue
            if not text.strip():
                continue
            reason, detail = None, None
            try:
                entry = json.loads(text)
            except json.JSONDecodeError as error:
                reason, detail = "bad_json", f"not JSON ({json_problem(error)})"
            else:
                name = entry.get("file_name") if isinstance(entry, dict) else None
                prompt = entry.get("prompt") if isinstance(entry, dict) else None
                if not isinstance(entry, dict):
                    reason, detail = "bad_json", f"{describe_value(entry)}, not a JSON object"
                elif not isinstance(name, str) or not name or text_problem(name) is not None:
                    reason, detail = "missing_field", f"file_name={name!r} is not a file name"
                elif (problem := text_problem(prompt)) is not None or not prompt.strip():
                    reason, detail = ("bad_text", problem) if problem and prompt is not None else \
                        ("empty_prompt", f"no prompt for {name}")
            if reason is not None:
                skips.add(reason, f"line {number} of {source}: {detail}")
                continue
            mapping[(source.parent / name).resolve()] = prompt
        result = {file: mapping[file.resolve()] for file in files if file.resolve() in mapping}
    else:
        lines: list[str | None] = []  # None: a bad line, which keeps its place so the alignment does not shift
        for line in text_lines(source):
            if line.problem is not None:
                image = files[len(lines)].name if len(lines) < len(files) else "no image"
                skips.add("bad_text", f"{line.problem}; its image ({image}) gets no prompt")
                lines.append(None)
            elif line.text.strip():
                lines.append(line.text)
        if len(lines) != len(files):
            raise DataError(f"{source} has {len(lines)} prompts for {len(files)} images; a text file is matched to "
                             "the sorted image files line by line, so the counts must agree (or use jsonl with "
                             "file_name)")
        result = {file: line for file, line in zip(files, lines) if line is not None}
    if summary := skips.summary(f"prompts from {source}", len(result)):
        logger.info(summary)
    return result


def load_for_scoring(path: Path, max_pixels: int | None = PILLOW_MAX_PIXELS) -> Image.Image:
    """An image upright, in RGB, at most ``MAX_SIDE`` px on its longest side (see ``diffalign.images.load_image``,
    which also says what it raises: ``ImageTooLarge`` over ``max_pixels`` pixels, Pillow's errors for bad data)."""
    return load_image(path, max_pixels=max_pixels, max_side=MAX_SIDE)


def score_rows(rows: list[ScoreRow], rewards: dict, batch_size: int,
               max_pixels: int | None = PILLOW_MAX_PIXELS) -> list[ScoreRow]:
    """Score every row that has an image and a prompt, in batches; failures go to the row's ``error``. Images
    over ``max_pixels`` pixels (None = no limit) are not decoded: their error says how to raise the limit."""
    require_scalar(rewards, "scoring images one by one (score_rows)")
    pending = [row for row in rows if row.error is None]
    with tqdm(total=len(pending), desc="scoring", disable=None) as bar:
        for start in range(0, len(pending), batch_size):
            batch, images = [], []
            for row in pending[start : start + batch_size]:
                try:
                    images.append(load_for_scoring(Path(row.file), max_pixels))
                    batch.append(row)
                except ImageTooLarge as error:
                    row.error = f"image too large: {error}"
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


def collect_rows(images: str, prompts: str | None, follow_symlinks: bool = False) -> list[ScoreRow]:
    """One row per image file; a file with no prompt, or (unless ``follow_symlinks``) a symlink resolving outside
    the given folder, gets an ``error`` and is not scored. Raises ``DataError`` (see
    ``image_files`` and ``read_prompt_map``) when there is nothing to score or the prompts do not fit."""
    files = image_files(images)
    prompt_map = read_prompt_map(prompts, files, images)
    outside = {} if follow_symlinks else outside_links(files, images)
    return [ScoreRow(str(file), prompt_map.get(file),
                     error=outside.get(file) or (None if file in prompt_map else "no prompt for this image"))
            for file in files]


def add_ensemble(rows: list[ScoreRow], names: list[str], weights: dict[str, float] | None) -> str | None:
    """Add ``ensemble_z`` (weighted mean of per-prompt z-scores) to the scored rows of prompts with two or more
    scored images (the others are left empty), when there are several rewards and at least one such prompt. Without such a prompt every z-score would be 0,
    so the column is left out and the line saying why (``ENSEMBLE_LEFT_OUT``) is returned; else None."""
    scored = [row for row in rows if row.error is None and row.scores]
    if len(names) < 2 or not scored:
        return None
    if max(Counter(row.prompt for row in scored).values()) < 2:
        return ENSEMBLE_LEFT_OUT
    counts = Counter(row.prompt for row in scored)
    values = {name: torch.tensor([row.scores[name] for row in scored]) for name in names}
    for row, value in zip(scored, zscore_ensemble(values, [row.prompt for row in scored], weights).tolist()):
        if counts[row.prompt] >= 2:  # a prompt's only image has no z-score (0 would read as "average")
            row.scores["ensemble_z"] = value
    return None


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
        raise ConfigError(f"--out must end in .csv or .jsonl, got {out}")
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
