"""Offline tiny models and datasets: random weights, real formats.

Everything here is built from a seed with no network access and saved exactly as the real thing is
(diffusers ``save_pretrained`` folders, parquet and jsonl datasets), so tests, the demo and the benchmarks go
through the same loading code as a hub id. ``tiny:sd15`` as a model spec and ``tiny:pairs`` as a data spec are
built on first use and cached under ``$DIFFALIGN_CACHE`` (default ``~/.cache/diffalign``). The model builders
themselves (one per family) live in ``diffalign.tiny_models`` and are re-exported here.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import uuid
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from diffalign.images import load_image
from diffalign.tiny_models import (  # noqa: F401  (re-exported: the tiny model builders live in tiny_models)
    MODEL_BUILDERS,
    TINY_FAMILIES,
    TINY_RESOLUTION,
    build_clip_tokenizer,
    build_t5_tokenizer,
    build_tiny_sd2v,
    build_tiny_sd3,
    build_tiny_sd15,
    build_tiny_sdxl,
    sd15_scheduler_config,
    tiny_sd15_unet,
    tiny_text_encoder,
    tiny_vae,
)

TINY_DATASETS = ("pairs", "pairs-parquet", "scored-pairs", "ranked", "captions")


def cache_root() -> Path:
    return Path(os.environ.get("DIFFALIGN_CACHE", Path.home() / ".cache" / "diffalign"))


def build_atomically(target: Path, build) -> Path:
    """Run ``build(tmp_dir)`` and rename the result into place, so a killed or racing build never leaves a
    half-written folder at ``target`` (two processes may race; the loser's copy is discarded)."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target




def build_tiny_lora(out_dir: str | Path, base: str = "tiny:sd15", seed: int = 0, rank: int = 4,
                    alpha: float = 4.0, std: float = 0.05) -> Path:
    """A LoRA with random (non-zero) weights for a tiny base, saved as training would save it."""
    from diffalign.config import LoraConfig, ModelConfig
    from diffalign.families import load_components
    from diffalign.training.lora import attach_lora, save_lora

    components = load_components(ModelConfig(pretrained=base))
    torch.manual_seed(seed)
    attach_lora(components.denoiser, LoraConfig(rank=rank, alpha=alpha), components.family.default_lora_targets)
    with torch.no_grad():
        for name, param in components.denoiser.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, std)
    return save_lora(components.family, components.denoiser, out_dir).parent


def build_tiny_model(out_dir: str | Path, family: str = "sd15", seed: int = 0) -> Path:
    if family not in MODEL_BUILDERS:
        raise ValueError(f"no tiny model for family '{family}'; available: {', '.join(MODEL_BUILDERS)}")
    return MODEL_BUILDERS[family](out_dir, seed=seed)


# ---------------------------------------------------------------------------------------------- data
SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220)}


def draw_shape(shape: str, colour: str, rng: random.Random, size: int = TINY_RESOLUTION) -> Image.Image:
    """A coloured shape at a random place on a light grey background."""
    image = Image.new("RGB", (size, size), (200, 200, 200))
    draw = ImageDraw.Draw(image)
    extent = rng.randint(size * 5 // 16, size * 5 // 8)
    x0, y0 = rng.randint(0, size - extent), rng.randint(0, size - extent)
    box = (x0, y0, x0 + extent - 1, y0 + extent - 1)
    fill = COLOURS[colour]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(x0, y0 + extent - 1), (x0 + extent - 1, y0 + extent - 1), (x0 + extent // 2, y0)], fill=fill)
    return image


def redness(image: Image.Image) -> float:
    """A toy score: mean (R - B) / 255 over the image. Red shapes score high, blue ones low, bigger ones more so."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    return float((pixels[..., 0] - pixels[..., 2]).mean() / 255.0)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=95) if fmt == "JPEG" else image.save(buffer, format=fmt)
    return buffer.getvalue()


def build_tiny_pairs(out_dir: str | Path, num_pairs: int = 64, seed: int = 0, num_ties: int = 4) -> Path:
    """Synthetic preference pairs: the same prompt drawn in red (preferred) and blue (dispreferred).

    Writes ``out_dir/pairs.parquet`` (Pick-a-Pic schema, winner side shuffled, plus ``num_ties`` tie rows that
    readers drop), ``out_dir/jsonl/`` (PNG files + metadata.jsonl with chosen/rejected file names),
    ``out_dir/scored/`` (the same pairs with toy ``redness`` scores), ``out_dir/ranked/`` (4 scored images
    per prompt) and ``out_dir/captions/`` (every image of the pairs with a caption naming its colour, no label).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    (out_dir / "jsonl").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    metadata = []
    for index in range(num_pairs + num_ties):
        shape = SHAPES[index % len(SHAPES)]
        prompt = f"a {shape} on a grey background"
        chosen, rejected = draw_shape(shape, "red", rng), draw_shape(shape, "blue", rng)
        if index >= num_pairs:  # ties only go to the parquet form, to exercise tie handling
            rows["caption"].append(prompt)
            rows["jpg_0"].append(encode(chosen, "JPEG"))
            rows["jpg_1"].append(encode(rejected, "JPEG"))
            rows["label_0"].append(0.5)
            rows["label_1"].append(0.5)
            continue
        chosen_name, rejected_name = f"{index:05d}_chosen.png", f"{index:05d}_rejected.png"
        chosen.save(out_dir / "jsonl" / chosen_name)
        rejected.save(out_dir / "jsonl" / rejected_name)
        metadata.append({"prompt": prompt, "chosen_file_name": chosen_name, "rejected_file_name": rejected_name})
        winner_first = rng.random() < 0.5
        first, second = (chosen, rejected) if winner_first else (rejected, chosen)
        rows["caption"].append(prompt)
        rows["jpg_0"].append(encode(first, "JPEG"))
        rows["jpg_1"].append(encode(second, "JPEG"))
        rows["label_0"].append(1.0 if winner_first else 0.0)
        rows["label_1"].append(0.0 if winner_first else 1.0)
    write_jsonl(out_dir / "jsonl" / "metadata.jsonl", metadata)
    pq.write_table(pa.table(rows), out_dir / "pairs.parquet")
    # The same pairs with toy reward scores (SmPO), images shared with jsonl/.
    scored = [
        {**entry, "chosen_score": redness(load_image(out_dir / "jsonl" / entry["chosen_file_name"])),
         "rejected_score": redness(load_image(out_dir / "jsonl" / entry["rejected_file_name"]))}
        for entry in metadata
    ]
    for entry in scored:
        entry["chosen_file_name"] = f"../jsonl/{entry['chosen_file_name']}"
        entry["rejected_file_name"] = f"../jsonl/{entry['rejected_file_name']}"
    (out_dir / "scored").mkdir(exist_ok=True)
    write_jsonl(out_dir / "scored" / "metadata.jsonl", scored)
    # Image-caption data (Self-NPO): the same images, one line each, captioned with their colour.
    captions = [
        {"prompt": entry["prompt"].replace("a ", f"a {colour} ", 1), "file_name": f"../jsonl/{entry[key]}"}
        for entry in metadata for colour, key in (("red", "chosen_file_name"), ("blue", "rejected_file_name"))
    ]
    (out_dir / "captions").mkdir(exist_ok=True)
    write_jsonl(out_dir / "captions" / "metadata.jsonl", captions)
    build_tiny_rankings(out_dir / "ranked", num_groups=num_pairs // 2, images_per_group=4, seed=seed + 1)
    return out_dir


def build_tiny_rankings(out_dir: Path, num_groups: int, images_per_group: int, seed: int) -> Path:
    """k images per prompt, red or blue at random, each with its toy redness score (RankDPO)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    metadata = []
    for group in range(num_groups):
        shape = SHAPES[group % len(SHAPES)]
        names, scores = [], []
        for slot in range(images_per_group):
            colour = "red" if slot % 2 == 0 else "blue"  # every group has both colours
            image = draw_shape(shape, colour, rng)
            name = f"{group:05d}_{slot}.png"
            image.save(out_dir / name)
            names.append(name)
            scores.append(redness(image))
        metadata.append({"prompt": f"a {shape} on a grey background", "file_names": names, "scores": scores})
    write_jsonl(out_dir / "metadata.jsonl", metadata)
    return out_dir


def write_jsonl(path: Path, entries: list[dict]) -> None:
    with open(path, "w") as handle:
        for entry in entries:
            handle.write(json.dumps(entry) + "\n")


# ---------------------------------------------------------------------------------------------- specs
def is_tiny_spec(spec: str) -> bool:
    return isinstance(spec, str) and spec.startswith("tiny:")


def resolve_model_spec(spec: str, seed: int = 0) -> str:
    """``tiny:<family>`` -> path of the cached tiny model (built on first use); anything else unchanged.
    ``tiny:toy`` is the toy world's pre-trained base (``diffalign.toy``); the others have random weights."""
    if not is_tiny_spec(spec):
        return spec
    family = spec.split(":", 1)[1]
    if family == "toy":  # pre-trained on CPU (minutes), not random: see diffalign.toy
        from diffalign.toy import TOY_VERSION, build_toy_base

        target = cache_root() / "tiny" / f"toy-{TOY_VERSION}-seed{seed}"
        if not target.exists():
            print(f"building the toy base model (pre-training a VAE and UNet on CPU, a few minutes) into {target}",
                  flush=True)
        return str(build_atomically(target, lambda tmp: build_toy_base(tmp, seed)))
    if family not in MODEL_BUILDERS:
        available = ", ".join("tiny:" + f for f in [*MODEL_BUILDERS, "toy"])
        raise ValueError(f"unknown tiny model '{spec}'; available: {available}")
    target = cache_root() / "tiny" / f"{family}-seed{seed}"
    return str(build_atomically(target, lambda tmp: build_tiny_model(tmp, family, seed)))


def resolve_data_spec(spec: str, seed: int = 0) -> str:
    """``tiny:pairs`` -> the cached jsonl folder, ``tiny:pairs-parquet`` -> the parquet file,
    ``tiny:scored-pairs`` -> pairs with redness scores, ``tiny:ranked`` -> 4 scored images per prompt,
    ``tiny:captions`` -> single images with captions (no labels)."""
    if not is_tiny_spec(spec):
        return spec
    name = spec.split(":", 1)[1]
    if name not in TINY_DATASETS:
        raise ValueError(f"unknown tiny dataset '{spec}'; available: {', '.join('tiny:' + d for d in TINY_DATASETS)}")
    root = build_atomically(cache_root() / "tiny" / f"pairs-v3-seed{seed}", lambda tmp: build_tiny_pairs(tmp, seed=seed))
    return str(root / {"pairs": "jsonl", "pairs-parquet": "pairs.parquet", "scored-pairs": "scored",
                       "ranked": "ranked", "captions": "captions"}[name])
