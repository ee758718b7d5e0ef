"""Checking one source row into a ``PreferenceRecord``: the rules every reader shares.

``make_record(row, cfg, report)`` gives the record, or None when the row was skipped (and counted in ``report``).
It is two steps, which the data pipeline runs in different processes: ``check_row`` (labels, scores, then the
prompt: text, UTF-8, not blank; cheap, in the process that reads the rows) and ``check_images`` (every image
present, under ``data.max_image_pixels``, fully decodable, upright; in DataLoader workers). Pairs come out winner first. Each
problem is a counted skip in the ``SkipReport`` (fatal under ``data.strict=true``) naming the file and line or row.
"""

from __future__ import annotations

import dataclasses
import io
import math
import numbers
import re
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

from diffalign.config import DataConfig
from diffalign.data.formats import Row
from diffalign.data.records import ImageSource, PreferenceRecord, SkipReport, TableImage, encoded_image
from diffalign.images import ImageTooLarge, load_image, upright
from diffalign.text import decode_utf8, text_problem


def make_record(row: Row, cfg: DataConfig, report: SkipReport) -> PreferenceRecord | None:
    """Validate one row fully (``check_row``, then every image decoded by ``check_images``); pairs come out
    winner first. None when it was skipped."""
    record = check_row(row, cfg, report)
    if record is None:
        return None
    checked = check_images(record, cfg.max_image_pixels)
    if checked.skip is not None:
        report.skip(*checked.skip, cfg.strict)
        return None
    return checked.record


def check_row(row: Row, cfg: DataConfig, report: SkipReport) -> PreferenceRecord | None:
    """Everything about a row but its pixels: labels, scores and the prompt. Pairs come out winner first; the
    images are still the row's sources, unchecked (``check_images`` decodes them). None when it was skipped."""
    index, cells, labels, scores, tie = row.index, list(row.cells), None, None, False
    where = f"{row.origin}: " if row.origin else ""
    # Labels and scores are checked before decoding: Pick-a-Pic ties are common and would be decoded for nothing.
    if row.kind == "pair":
        label = row.label
        if not is_number(label) or label not in (0, 0.5, 1):
            report.skip("unknown_label", index, f"{where}label_0={label!r}, expected 1, 0 or 0.5", cfg.strict)
            return None
        if row.different is False:  # Pick-a-Pic are_different=false: the two images are the same picture
            report.skip("identical_images", index, f"{where}are_different=false: both images are the same, so the "
                        "row carries no preference", cfg.strict)
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
    return PreferenceRecord(index=index, prompt=prompt, images=[image_source(cell) for cell in cells],
                            labels=labels, scores=scores, tie=tie)


def describe_source(source: ImageSource | None) -> str:
    """Where an image is, for skip messages: a file path, or the column (and list item) of a table row."""
    if isinstance(source, TableImage):
        item = f"[{source.item}]" if source.item is not None else ""
        return f"{source.column}{item} of row {source.row}"
    return str(source) if isinstance(source, Path) else "image cell"


class CheckedImages(NamedTuple):
    """What ``check_images`` found: the record (images as given, or as bytes when asked) and its decoded images,
    or the skip ``(reason, index, detail)`` that rejects it."""

    record: PreferenceRecord | None
    images: list[Image.Image]
    skip: tuple[str, int, str] | None = None

    def decoded(self, sources: list[ImageSource]) -> list[Image.Image]:
        """The decoded images of ``sources``, some of the record's own (an adapted record's images)."""
        return [self.images[self.record.images.index(source)] for source in sources]


def check_images(record: PreferenceRecord, max_pixels: int | None, as_bytes: bool = False) -> CheckedImages:
    """Decode every image of a ``check_row`` record, once, fully and upright; the first that is missing
    (``missing_image``), over ``max_pixels`` (``image_too_large``) or undecodable (``corrupt_image``) rejects the
    record. ``as_bytes`` replaces table cells by their bytes (for records that must outlive the table).

    Runs in DataLoader worker processes: it reports nothing itself, the caller counts the skip."""
    images, sources = [], []
    for source in record.images:
        where = describe_source(source)
        try:
            encoded = None if source is None else encoded_image(source)
        except Exception as error:  # a table that cannot be read at this row: say so, as a bad record
            return CheckedImages(None, [], ("corrupt_image", record.index, f"{where}: {type(error).__name__}: {error}"))
        if not encoded or (isinstance(encoded, Path) and not encoded.is_file()):
            detail = f"no image at {encoded}" if isinstance(encoded, Path) else f"empty image cell ({where})"
            return CheckedImages(None, [], ("missing_image", record.index, detail))
        try:
            images.append(load_image(encoded, max_pixels=max_pixels))
        except ImageTooLarge as error:
            return CheckedImages(None, [], ("image_too_large", record.index, f"{where}: {error}"))
        except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad data
            message = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the image bytes", str(error))
            return CheckedImages(None, [], ("corrupt_image", record.index,
                                            f"{where}: {type(error).__name__}: {message}"))
        sources.append(encoded if as_bytes and isinstance(source, TableImage) else source)
    return CheckedImages(dataclasses.replace(record, images=sources), images)


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


def image_source(cell: Any) -> ImageSource | None:
    """Raw bytes, a datasets Image dict ``{"bytes", "path"}``, a PIL image (turned upright first: re-encoding keeps
    pixels, not orientation metadata), a path or a ``TableImage`` -> bytes, Path or ``TableImage``."""
    if isinstance(cell, TableImage):
        return cell
    if isinstance(cell, Image.Image):
        cell = upright(cell)
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
