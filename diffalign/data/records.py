"""The one record type every reader yields, and the bookkeeping for records that had to be skipped."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from diffalign.errors import DataError
from diffalign.images import load_image

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


@dataclass
class SkipReport:
    """Counts of records skipped per reason, with a few examples each; logged at the end of reading."""

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


def open_image(source: ImageSource, max_pixels: int | None = None) -> Image.Image:
    """Decode a record's image fully, upright and in RGB (``diffalign.images.load_image``, the one decoder).

    No pixel limit by default: the readers already checked every kept image against ``data.max_image_pixels``,
    so the cache and the uncached dataset, which decode it again, never fail on a limit the user raised.
    Raises what ``load_image`` raises (``ImageTooLarge`` over ``max_pixels``, Pillow's errors for bad data).
    """
    return load_image(source, max_pixels=max_pixels)
