"""Checking one source row into a ``PreferenceRecord``: the rules every reader shares.

``make_record(row, cfg, report)`` gives the record, or None when the row was skipped (and counted in ``report``).
Labels and scores are checked before any image is decoded; then the prompt (text, UTF-8, not blank) and every
image (present, under ``data.max_image_pixels``, fully decodable, upright). Pairs come out winner first. Each
problem is a counted skip in the ``SkipReport`` (fatal under ``data.strict=true``) naming the file and line or row.
"""

from __future__ import annotations

import io
import math
import numbers
from pathlib import Path
from typing import Any

from PIL import Image

from diffalign.config import DataConfig
from diffalign.data.formats import Row
from diffalign.data.records import ImageSource, PreferenceRecord, SkipReport, open_image
from diffalign.images import ImageTooLarge, upright
from diffalign.text import decode_utf8, text_problem


def make_record(row: Row, cfg: DataConfig, report: SkipReport) -> PreferenceRecord | None:
    """Validate one row; pairs come out winner first. None when it was skipped."""
    index, cells, labels, scores, tie = row.index, list(row.cells), None, None, False
    where = f"{row.origin}: " if row.origin else ""
    # Labels and scores are checked before decoding: Pick-a-Pic ties are common and would be decoded for nothing.
    if row.kind == "pair":
        label = row.label
        if not is_number(label) or label not in (0, 0.5, 1):
            report.skip("unknown_label", index, f"{where}label_0={label!r}, expected 1, 0 or 0.5", cfg.strict)
            return None
        if label == 0.5:
            if cfg.drop_ties:
                report.skip("tie", index, f"{where}label_0=0.5 (set data.drop_ties=false to keep ties)", cfg.strict)
                return None
            tie = True
        if row.scores is not None and (scores := checked_scores(row.scores, 2, index, cfg, report, where)) is None:
            return None
        if label == 0:
            cells.reverse()
            scores = scores[::-1] if scores else scores
    elif row.kind == "labelled":
        label = row.label
        if not (isinstance(label, bool) or (is_number(label) and label in (0, 1))):
            report.skip("unknown_label", index, f"{where}label={label!r}, expected 1, 0, true or false", cfg.strict)
            return None
        labels = [float(label)]
    elif row.kind == "caption":
        pass  # a single image with no label or score (data kind "images", e.g. Self-NPO)
    else:
        if (scores := checked_scores(row.scores, len(cells), index, cfg, report, where)) is None:
            return None
        if len(cells) == 2:  # a ranking of two is a scored pair: put it winner first, as every pair is
            tie = scores[0] == scores[1]
            if scores[1] > scores[0]:
                cells, scores = cells[::-1], scores[::-1]
    prompt = checked_prompt(row, cfg, report)
    if prompt is None:
        return None
    images = []
    for cell in cells:
        image = checked_image(cell, index, cfg, report)
        if image is None:
            return None
        images.append(image)
    return PreferenceRecord(index=index, prompt=prompt, images=images, labels=labels, scores=scores, tie=tie)


def checked_prompt(row: Row, cfg: DataConfig, report: SkipReport) -> str | None:
    """The row's prompt as text; None (and a counted skip) when it is not text, not UTF-8, or empty.

    A binary prompt (a parquet ``binary`` column) is decoded strictly as UTF-8. Reasons: ``bad_text`` (a number,
    list or object, undecodable bytes, a NUL character, a lone surrogate) and ``empty_prompt`` (missing: null, or
    blank)."""
    where = f"{row.origin}: " if row.origin else ""
    prompt, problem = row.prompt, None
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        report.skip("empty_prompt", row.index, f"{where}prompt={prompt!r}", cfg.strict)
        return None
    if isinstance(prompt, bytes | bytearray | memoryview):
        prompt, problem = decode_utf8(bytes(prompt))
        problem = problem and f"prompt {problem}"
    problem = problem or text_problem(prompt)
    if problem is not None:
        report.skip("bad_text", row.index, f"{where}{problem}", cfg.strict)
        return None
    if not prompt.strip():  # blank once decoded
        report.skip("empty_prompt", row.index, f"{where}prompt={prompt!r}", cfg.strict)
        return None
    return prompt


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def checked_scores(values: Any, count: int, index: int, cfg: DataConfig, report: SkipReport,
                   where: str = "") -> list[float] | None:
    """``count`` (>= 2) finite numbers, one per image, as floats; None (and a counted skip) otherwise."""
    if isinstance(values, list | tuple) and len(values) == count >= 2:
        if all(is_number(value) and math.isfinite(value) for value in values):
            return [float(value) for value in values]
        problem = "expected finite numbers"
    else:
        size = len(values) if isinstance(values, list | tuple) else "no list of"
        problem = f"{size} scores for {count} images; expected one per image and at least 2 images"
    shown = repr(values)
    shown = shown if len(shown) <= 120 else shown[:117] + "..."
    report.skip("bad_scores", index, f"{where}scores={shown}: {problem}", cfg.strict)
    return None


def checked_image(cell: Any, index: int, cfg: DataConfig, report: SkipReport) -> ImageSource | None:
    """Turn a cell into bytes or a Path and decode it fully (upright, see ``diffalign.images``); None (and a
    counted skip: missing_image, image_too_large over ``data.max_image_pixels``, corrupt_image) when that fails."""
    if isinstance(cell, Image.Image):  # re-encoding below keeps pixels, not orientation metadata: turn it first
        cell = upright(cell)
    source = image_source(cell)
    if source is None or (isinstance(source, Path) and not source.is_file()):
        report.skip("missing_image", index, f"no image at {source}" if source else "empty image cell", cfg.strict)
        return None
    try:
        open_image(source, max_pixels=cfg.max_image_pixels)
    except ImageTooLarge as error:
        report.skip("image_too_large", index, str(error), cfg.strict)
        return None
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad data
        report.skip("corrupt_image", index, f"{type(error).__name__}: {error}", cfg.strict)
        return None
    return source


def image_source(cell: Any) -> ImageSource | None:
    """Raw bytes, a datasets Image dict ``{"bytes", "path"}``, a PIL image or a path -> bytes or Path."""
    if isinstance(cell, bytes | bytearray | memoryview):
        return bytes(cell)
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            return bytes(cell["bytes"])
        return Path(cell["path"]) if cell.get("path") else None
    if isinstance(cell, Image.Image):
        buffer = io.BytesIO()
        cell.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(cell, str | Path):
        return Path(cell)
    return None
