"""Offline tiny preference data: red or blue shapes on grey, in every on-disk form the readers take.

    >>> import tempfile
    >>> from pathlib import Path
    >>> out = build_tiny_pairs(Path(tempfile.mkdtemp()) / "pairs", num_pairs=8)
    >>> sorted(path.name for path in out.iterdir())
    ['captions', 'jsonl', 'pairs.parquet', 'ranked', 'scored']

The preferred image of each pair is the red drawing of the prompt's shape and the dispreferred one the blue
drawing, so the label is visible in the pixels (the ``toy_redness`` reward agrees with it). ``tiny:pairs`` and
the other ``TINY_DATASETS`` specs (``diffalign.offline.specs``) are views of one cached build of this set.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from diffalign.images import load_image
from diffalign.offline.models import TINY_RESOLUTION
from diffalign.rewards.toy import redness
from diffalign.text import write_jsonl

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


def encode(image: Image.Image, fmt: str) -> bytes:
    """``image`` as the bytes of a ``fmt`` file (JPEG at quality 95), as a parquet image column holds them."""
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
