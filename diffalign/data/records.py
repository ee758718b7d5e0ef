"""The one record type every reader yields, and the bookkeeping for records that had to be skipped."""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

# An image is either encoded bytes (parquet / hub data) or a path to a file (local folders).
ImageSource = bytes | Path


@dataclass
class PreferenceRecord:
    """One prompt with k images.

    For pairs (k = 2) the preferred image comes first: ``images[0]`` is the winner, ``images[1]`` the loser.
    ``labels`` (per image, 1 = desirable, 0 = undesirable) and ``scores`` (per image, higher is better) are
    optional and used by objectives that need them.
    """

    index: int  # position in the source, so errors and reports can point at the row
    prompt: str
    images: list[ImageSource]
    labels: list[float] | None = None
    scores: list[float] | None = None
    tie: bool = False  # kept tie (data.drop_ties=false): the order of images carries no preference


class DataError(ValueError):
    """Bad input that cannot be skipped: a schema mismatch, or any bad record under data.strict=true."""


@dataclass
class SkipReport:
    """Counts of records skipped per reason, with a few examples each; printed at the end of reading."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, index: int, detail: str, strict: bool) -> None:
        message = f"record {index}: {reason}: {detail}"
        if strict:
            raise DataError(f"{message} (data.strict=true makes bad records fatal; set data.strict=false to skip them)")
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(message)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        lines = [f"data: kept {self.kept} records, skipped {self.total_skipped}"]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  {reason}: {count}  (e.g. {self.examples[reason][0]})")
        return "\n".join(lines)


def open_image(source: ImageSource) -> Image.Image:
    """Decode an image fully (so truncated files fail here, not later) and return it as RGB."""
    if isinstance(source, bytes | bytearray):
        image = Image.open(io.BytesIO(source))
    else:
        image = Image.open(source)
    image.load()
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB conversion that composites transparency on white and rescales 16-bit modes instead of clipping."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        return Image.fromarray((array / peak * 255).round().astype("uint8")).convert("RGB")
    return image.convert("RGB")
