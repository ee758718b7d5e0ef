"""Readers that turn a data source into validated preference records, winner first.

    records, report = read_preferences(cfg.data, source)

Three schemas are understood (``data.format``, or ``auto`` to pick one from the data):

- ``pickapic``: columns ``caption``, ``jpg_0``, ``jpg_1``, ``label_0`` (``label_1`` optional, unused);
  ``label_0`` 1 = jpg_0 preferred, 0 = jpg_1 preferred, 0.5 = tie.
- ``chosen_rejected``: columns ``chosen``, ``rejected``, ``prompt``.
- ``jsonl``: a local folder with ``metadata.jsonl`` lines ``{"prompt", "chosen_file_name", "rejected_file_name"}``.

The first two come from a parquet file, a folder of parquet files, a glob, or a hub dataset id. Bad records
(undecodable or missing images, empty prompts, unknown labels) are skipped and counted in a ``SkipReport``, or
are fatal under ``data.strict=true``. Every kept image is fully decoded once here, so training never meets one.
"""

from __future__ import annotations

import glob
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from diffalign.config import DataConfig
from diffalign.data.records import DataError, ImageSource, PreferenceRecord, SkipReport, open_image

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
CHOSEN_REJECTED_COLUMNS = ("chosen", "rejected", "prompt")
JSONL_KEYS = ("prompt", "chosen_file_name", "rejected_file_name")
SCHEMAS = {"pickapic": PICKAPIC_COLUMNS, "chosen_rejected": CHOSEN_REJECTED_COLUMNS}
IMAGE_COLUMNS = {"pickapic": ("jpg_0", "jpg_1"), "chosen_rejected": ("chosen", "rejected")}

EXPECTED_SOURCES = (
    "expected a parquet file, a folder of parquet files, a glob such as 'data/*.parquet', "
    "a folder containing metadata.jsonl, or a hub dataset id such as 'owner/name'"
)
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

# A row, whatever the schema: (index, prompt, label_0, image cells); label_0 is 1 where the order is already winner first.
Row = tuple[int, Any, Any, list[Any]]


def read_preferences(cfg: DataConfig, source: str | None = None) -> tuple[list[PreferenceRecord], SkipReport]:
    """Read every usable record of ``source`` (default ``cfg.source``), up to ``cfg.max_samples`` kept ones."""
    source = str(cfg.source if source is None else source)
    report = SkipReport()
    if cfg.format == "jsonl" or (cfg.format == "auto" and jsonl_metadata_path(source) is not None):
        rows, total = jsonl_rows(source, cfg, report)
    else:
        rows, total = table_rows(source, cfg)
    records = []
    for index, prompt, label, images in tqdm(rows, total=total, desc="reading preferences", disable=None):
        record = make_record(index, prompt, label, images, cfg, report)
        if record is not None:
            records.append(record)
            if cfg.max_samples is not None and len(records) >= cfg.max_samples:
                break
    report.kept = len(records)
    print(report.summary())
    return records, report


def make_record(index: int, prompt: Any, label: Any, cells: list[Any], cfg: DataConfig,
                report: SkipReport) -> PreferenceRecord | None:
    """Validate one row and order its images winner first; None when it was skipped."""
    tie = False
    # The label is checked before decoding: Pick-a-Pic ties are common and would be decoded for nothing.
    if not is_number(label) or label not in (0, 0.5, 1):
        report.skip("unknown_label", index, f"label_0={label!r}, expected 1, 0 or 0.5", cfg.strict)
        return None
    if label == 0.5:
        if cfg.drop_ties:
            report.skip("tie", index, "label_0=0.5 (set data.drop_ties=false to keep ties)", cfg.strict)
            return None
        tie = True
    elif label == 0:
        cells = [cells[1], cells[0]]
    if not isinstance(prompt, str) or not prompt.strip():
        report.skip("empty_prompt", index, f"prompt={prompt!r}", cfg.strict)
        return None
    images = []
    for cell in cells:
        image = checked_image(cell, index, cfg, report)
        if image is None:
            return None
        images.append(image)
    return PreferenceRecord(index=index, prompt=prompt, images=images, tie=tie)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def checked_image(cell: Any, index: int, cfg: DataConfig, report: SkipReport) -> ImageSource | None:
    """Turn a cell into bytes or a Path and decode it fully; None (and a counted skip) when that fails."""
    source = image_source(cell)
    if source is None or (isinstance(source, Path) and not source.is_file()):
        report.skip("missing_image", index, f"no image at {source}" if source else "empty image cell", cfg.strict)
        return None
    try:
        open_image(source)
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


# ---------------------------------------------------------------------------------------------- jsonl folders
def jsonl_metadata_path(source: str) -> Path | None:
    path = Path(source).expanduser()
    if path.is_dir() and (path / "metadata.jsonl").is_file():
        return path / "metadata.jsonl"
    if path.is_file() and path.suffix == ".jsonl":
        return path
    return None


def jsonl_rows(source: str, cfg: DataConfig, report: SkipReport) -> tuple[Iterator[Row], int]:
    """Rows of metadata.jsonl; ``index`` is the 0-based line number. Read by hand so bad lines are only counted."""
    metadata = jsonl_metadata_path(source)
    if metadata is None:
        raise DataError(f"data.source={source}: data.format=jsonl needs a folder containing metadata.jsonl; "
                        f"{EXPECTED_SOURCES}")
    with open(metadata, "rb") as handle:
        total = sum(1 for _ in handle)
    return parse_jsonl(source, metadata, cfg, report), total


def parse_jsonl(source: str, metadata: Path, cfg: DataConfig, report: SkipReport) -> Iterator[Row]:
    checked_schema = False
    with open(metadata, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                report.skip("bad_json", index, f"line {index + 1} of {metadata}: {error}", cfg.strict)
                continue
            found = list(entry) if isinstance(entry, dict) else []
            missing = [key for key in JSONL_KEYS if key not in found]
            if missing and not checked_schema:  # the first object decides: a wrong file, not one bad line
                raise schema_error(source, found, f"metadata.jsonl keys (line {index + 1})")
            checked_schema = True
            if missing:
                report.skip("missing_field", index, f"line {index + 1} lacks {missing}", cfg.strict)
                continue
            names = [entry["chosen_file_name"], entry["rejected_file_name"]]
            images = [metadata.parent / name if isinstance(name, str) and name else None for name in names]
            yield index, entry["prompt"], 1, images


# ---------------------------------------------------------------------------------------------- tables
def table_rows(source: str, cfg: DataConfig) -> tuple[Iterator[Row], int]:
    """Rows of a parquet or hub table, with the schema picked by ``cfg.format`` or by the columns found."""
    from datasets import Image as ImageFeature

    dataset = load_table(source, cfg)
    schema = pick_schema(source, list(dataset.column_names), cfg.format)
    columns = list(SCHEMAS[schema])
    dataset = dataset.select_columns(columns)  # Pick-a-Pic has many more columns; don't read them
    for column in IMAGE_COLUMNS[schema]:
        if isinstance(dataset.features.get(column), ImageFeature):  # keep the encoded bytes: we decode ourselves
            dataset = dataset.cast_column(column, ImageFeature(decode=False))

    def rows() -> Iterator[Row]:
        for index, row in enumerate(dataset):
            if schema == "pickapic":
                yield index, row["caption"], row["label_0"], [row["jpg_0"], row["jpg_1"]]
            else:
                yield index, row["prompt"], 1, [row["chosen"], row["rejected"]]

    return rows(), len(dataset)


def load_table(source: str, cfg: DataConfig):
    """A datasets.Dataset from a local parquet file, folder or glob, or from the hub."""
    import datasets

    data_files = parquet_files(source)
    if data_files is not None:
        return datasets.load_dataset("parquet", data_files=data_files, split="train")
    if not HUB_ID.match(source) or source.endswith((".parquet", ".jsonl", ".json")):
        raise DataError(f"data.source={source} does not exist; {EXPECTED_SOURCES}")
    try:
        return datasets.load_dataset(source, split=cfg.split)
    except Exception as error:  # offline, private, misspelled: the message should still say what was tried
        raise DataError(f"data.source={source}: no such local path, and loading it as a hub dataset "
                        f"(split={cfg.split!r}) failed: {type(error).__name__}: {error}") from error


def parquet_files(source: str) -> list[str] | None:
    """The local parquet files named by ``source``; None when it is not a local path (maybe a hub id)."""
    path = Path(source).expanduser()
    if any(char in source for char in "*?["):
        files = sorted(glob.glob(str(path), recursive=True))
        if not files:
            raise DataError(f"data.source={source}: the glob matches no files; {EXPECTED_SOURCES}")
        return files
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = sorted(str(file) for file in path.rglob("*.parquet"))
        if not files:
            raise DataError(f"data.source={source}: the folder has no parquet files (nor a metadata.jsonl); "
                            f"{EXPECTED_SOURCES}")
        return files
    return None


def pick_schema(source: str, columns: list[str], fmt: str) -> str:
    if fmt in SCHEMAS and all(column in columns for column in SCHEMAS[fmt]):
        return fmt
    if fmt == "auto":
        for name, required in SCHEMAS.items():
            if all(column in columns for column in required):
                return name
    raise schema_error(source, columns, "columns")


def schema_error(source: str, found: list[str], what: str) -> DataError:
    return DataError(
        f"data.source={source}: the {what} {found} match no known schema. Expected one of: "
        f"pickapic: {', '.join(PICKAPIC_COLUMNS)} (label_1 optional); "
        f"chosen_rejected: {', '.join(CHOSEN_REJECTED_COLUMNS)}; "
        f"jsonl: a folder with metadata.jsonl whose lines have {', '.join(JSONL_KEYS)}. "
        f"Rename the columns to one of these and set data.format (auto, pickapic, chosen_rejected or jsonl)."
    )
