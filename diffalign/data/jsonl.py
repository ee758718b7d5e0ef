"""Local folders with a ``metadata.jsonl``: one JSON object per line, file names relative to the folder.

A line's keys make it one of four kinds (``formats.JSONL_KINDS``):

- pair: ``prompt``, ``chosen_file_name``, ``rejected_file_name``; optional ``chosen_score`` and ``rejected_score``
  (both or neither);
- labelled: ``prompt``, ``file_name``, ``label`` (0/1, 0.0/1.0 or false/true; 1 = desirable);
- ranked: ``prompt``, ``file_names`` (a list), ``scores`` (numbers, one per file, at least 2);
- caption: ``prompt``, ``file_name`` and no ``label`` (the HF imagefolder metadata.jsonl convention): single-image
  records with ``labels=None``, for objectives that need only images and captions (data kind ``images``).

The first JSON object decides the file's kind; one that matches no kind means a wrong file and raises the schema
error. Later lines of another kind, or lacking keys, are skipped as ``missing_field``. Values are checked by
``validation.make_record`` (a prompt that is null or blank is ``empty_prompt``; a number, list or object, or text
with a NUL or a lone surrogate, is ``bad_text``).

Text: the file is read line by line and each line decoded strictly as UTF-8 (``diffalign.text.text_lines``; a
byte-order mark is dropped). A line that is not UTF-8 or holds a NUL byte is skipped as ``bad_text``, naming the
line and byte ("line 3 of /x/metadata.jsonl is not UTF-8 (byte 0xff at column 12)"); a line that is not JSON is
``bad_json``, and one that is JSON but not an object (a list, a string, a number) is ``bad_json`` too. Under
``data.strict=true`` each of these is fatal, like any skip.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffalign.config import DataConfig
from diffalign.data.formats import EXPECTED_SOURCES, JSONL_KINDS, PAIR_SCORES, Row, schema_error
from diffalign.data.records import SkipReport
from diffalign.errors import DataError
from diffalign.text import describe_value, text_lines, text_problem


def jsonl_metadata_path(source: str) -> Path | None:
    path = Path(source).expanduser()
    if path.is_dir() and (path / "metadata.jsonl").is_file():
        return path / "metadata.jsonl"
    if path.is_file() and path.suffix == ".jsonl":
        return path
    return None


def is_jsonl_source(source: str, cfg: DataConfig) -> bool:
    """Whether ``data.format=auto`` reads ``source`` as jsonl: a folder holding metadata.jsonl, or a .jsonl file."""
    return jsonl_metadata_path(source) is not None


def jsonl_rows(source: str, cfg: DataConfig, report: SkipReport,
               kind: str | None = None) -> tuple[Iterator[Row], int]:
    """Rows of metadata.jsonl; ``index`` is the 0-based line number. Read by hand so bad lines are only counted.

    ``kind`` (pair, labelled or ranked) requires that kind of the whole file; None accepts any.
    """
    metadata = jsonl_metadata_path(source)
    if metadata is None:
        raise DataError(f"data.source={source}: data.format={cfg.format} needs a folder containing metadata.jsonl; "
                        f"{EXPECTED_SOURCES}")
    with open(metadata, "rb") as handle:
        total = sum(1 for _ in handle)
    return parse_jsonl(source, metadata, cfg, report, kind), total


def line_kind(entry: dict, preferred: str | None) -> str | None:
    """The kind whose keys ``entry`` has, ``preferred`` first; None when it has no kind's keys."""
    matches = [kind for kind, keys in JSONL_KINDS.items() if all(key in entry for key in keys)]
    if preferred in matches:
        return preferred
    return matches[0] if matches else None


def parse_jsonl(source: str, metadata: Path, cfg: DataConfig, report: SkipReport,
                required: str | None = None) -> Iterator[Row]:
    file_kind = None
    for number, text, problem in text_lines(metadata):
        index = number - 1
        if problem is not None:
            report.skip("bad_text", index, problem, cfg.strict)
            continue
        if not text.strip():
            continue
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as error:
            report.skip("bad_json", index, f"line {number} of {metadata}: {error}", cfg.strict)
            continue
        if not isinstance(entry, dict):
            report.skip("bad_json", index, f"line {number} of {metadata} is {describe_value(entry)}, not a JSON "
                        "object (one object per line)", cfg.strict)
            continue
        kind = line_kind(entry, file_kind or required)
        if file_kind is None:  # the first object decides: a wrong file, not one bad line
            if kind is None:
                raise schema_error(source, list(entry), f"metadata.jsonl keys (line {index + 1})")
            if required is not None and kind != required:
                raise DataError(f"data.source={source}: data.format={required} needs metadata.jsonl lines with "
                                f"{', '.join(JSONL_KINDS[required])}, but line {index + 1} is a {kind} entry "
                                f"with {list(entry)}; set data.format=jsonl (or auto) to read it as {kind}")
            file_kind = kind
        if kind != file_kind:
            missing = [key for key in JSONL_KINDS[file_kind] if key not in entry]
            partial = kind is None or set(JSONL_KINDS[kind]) < set(JSONL_KINDS[file_kind])  # caption < labelled
            detail = (f"line {index + 1} lacks {missing}" if partial else
                      f"line {index + 1} is a {kind} entry, but the first entry made this a file of "
                      f"{file_kind} entries (one metadata.jsonl holds one kind)")
            report.skip("missing_field", index, detail, cfg.strict)
            continue
        row = entry_row(index, kind, entry, metadata.parent, cfg, report)
        if row is not None:
            yield row._replace(origin=f"line {number} of {metadata}")


def entry_row(index: int, kind: str, entry: dict, folder: Path, cfg: DataConfig, report: SkipReport) -> Row | None:
    def file(name: Any) -> Path | None:  # None (an empty image cell) for a name that is not clean text
        return folder / name if isinstance(name, str) and name and text_problem(name) is None else None

    if kind == "pair":
        present = [key for key in PAIR_SCORES if key in entry]
        if len(present) == 1:
            report.skip("missing_field", index, f"line {index + 1} has {present[0]} but not the other of "
                        f"{' and '.join(PAIR_SCORES)} (give both or neither)", cfg.strict)
            return None
        scores = [entry[key] for key in PAIR_SCORES] if present else None
        cells = [file(entry["chosen_file_name"]), file(entry["rejected_file_name"])]
        return Row(index, "pair", entry["prompt"], cells, 1, scores)
    if kind == "labelled":
        return Row(index, "labelled", entry["prompt"], [file(entry["file_name"])], entry["label"])
    if kind == "caption":
        return Row(index, "caption", entry["prompt"], [file(entry["file_name"])], None)
    names = entry["file_names"]
    cells = [file(name) for name in names] if isinstance(names, list) else []
    return Row(index, "ranked", entry["prompt"], cells, scores=entry["scores"])
