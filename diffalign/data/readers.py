"""Readers that turn a data source into validated preference records.

    records, report = read_preferences(cfg.data, source)

Records come in three shapes, all ``PreferenceRecord``: pairs ``[chosen, rejected]`` (optionally with
``scores=[s_chosen, s_rejected]``), labelled singles ``[image]`` with ``labels=[1.0 or 0.0]``, and ranked sets
``[x1..xK]`` (K >= 2) with ``scores=[s1..sK]`` in the given order. ``diffalign.data.kinds.adapt_records`` turns
them into what an objective needs. Schemas (``data.format``, or ``auto`` to pick one from the data):

- ``pickapic``: columns ``caption``, ``jpg_0``, ``jpg_1``, ``label_0`` (``label_1`` optional, unused);
  ``label_0`` 1 = jpg_0 preferred, 0 = jpg_1 preferred, 0.5 = tie.
- ``chosen_rejected``: columns ``chosen``, ``rejected``, ``prompt``; optional ``chosen_score``, ``rejected_score``.
- ``labelled``: columns ``image``, ``label`` (0/1 or false/true), ``prompt``.
- ``ranked``: columns ``images`` (a list of images), ``scores`` (a list of numbers, one per image), ``prompt``.
- ``jsonl``: a local folder with ``metadata.jsonl`` (see ``diffalign.data.jsonl``), one of the kinds in
  ``JSONL_KINDS`` per file; ``labelled`` and ``ranked`` also read such a folder, requiring that kind.
- ``hpdv2``: the Human Preference Dataset v2 (HPSv2) JSON, ``train.json`` pairs or ``test.json`` rankings (see
  ``diffalign.data.hpdv2``).

Tables come from a parquet file, a folder of parquet files, a glob, or a hub dataset id; any other local file
(a .csv, a .txt, a .json that is not HPDv2, a damaged parquet) is a ``DataError`` listing these formats. Bad
records (undecodable or missing images, empty prompts, prompts that are not text or not UTF-8, unknown labels, bad
scores) are skipped and counted in a ``SkipReport`` whose messages name the file and line or row, or are fatal
under ``data.strict=true``. Every kept image is fully decoded once here, so training never meets one.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import math
import numbers
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image
from tqdm.auto import tqdm

from diffalign.config import DataConfig
from diffalign.data.records import DataError, ImageSource, PreferenceRecord, SkipReport, open_image
from diffalign.text import decode_utf8, text_problem

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
CHOSEN_REJECTED_COLUMNS = ("chosen", "rejected", "prompt")
LABELLED_COLUMNS = ("image", "label", "prompt")
RANKED_COLUMNS = ("images", "scores", "prompt")
PAIR_SCORES = ("chosen_score", "rejected_score")  # optional on chosen_rejected tables and jsonl pairs: both or neither
SCHEMAS = {"pickapic": PICKAPIC_COLUMNS, "chosen_rejected": CHOSEN_REJECTED_COLUMNS,
           "labelled": LABELLED_COLUMNS, "ranked": RANKED_COLUMNS}
IMAGE_COLUMNS = {"pickapic": ("jpg_0", "jpg_1"), "chosen_rejected": ("chosen", "rejected"), "labelled": ("image",),
                 "ranked": ("images",)}
JSONL_KINDS = {  # the keys that make a metadata.jsonl line one kind of record
    "pair": ("prompt", "chosen_file_name", "rejected_file_name"),
    "labelled": ("prompt", "file_name", "label"),
    "ranked": ("prompt", "file_names", "scores"),
    "caption": ("prompt", "file_name"),  # an image and its caption, no label (HF imagefolder metadata.jsonl)
}
HPDV2_SHAPE = ("a .json list of items with prompt, image_path (or file_path) and human_preference (train.json) "
               "or rank (test.json), or a folder holding train.json / test.json")

EXPECTED_SOURCES = (
    "expected a parquet file, a folder of parquet files, a glob such as 'data/*.parquet', "
    "an HPDv2 train.json / test.json (or a folder holding one), "
    "a folder containing metadata.jsonl, or a hub dataset id such as 'owner/name'"
)
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class Row(NamedTuple):
    """One source row before validation, whatever the schema."""

    index: int
    kind: str  # pair | labelled | ranked | caption
    prompt: Any
    cells: list[Any]  # image cells: bytes, {"bytes", "path"} dicts, PIL images or paths (None = missing)
    label: Any = 1  # pair: label_0 (1 = cells already winner first, 0 = loser first, 0.5 = tie); labelled: the label
    scores: Any = None  # pair: [chosen, rejected] or None; ranked: one per cell
    origin: str = ""  # where the row came from, for skip messages: "line 3 of /x/metadata.jsonl"


def read_preferences(cfg: DataConfig, source: str | None = None) -> tuple[list[PreferenceRecord], SkipReport]:
    """Read every usable record of ``source`` (default ``cfg.source``), up to ``cfg.max_samples`` kept ones."""
    from diffalign.data.hpdv2 import hpdv2_file, hpdv2_rows
    from diffalign.data.jsonl import jsonl_metadata_path, jsonl_rows

    source = str(cfg.source if source is None else source)
    report = SkipReport()
    is_jsonl = jsonl_metadata_path(source) is not None
    if cfg.format == "jsonl" or (cfg.format in ("auto", *JSONL_KINDS) and is_jsonl):
        rows, total = jsonl_rows(source, cfg, report, kind=cfg.format if cfg.format in JSONL_KINDS else None)
    elif cfg.format == "hpdv2" or (cfg.format == "auto" and hpdv2_file(source, cfg.split) is not None):
        rows, total = hpdv2_rows(source, cfg, report)
    else:
        rows, total = table_rows(source, cfg)
    records = []
    for row in tqdm(rows, total=total, desc="reading preferences", disable=None):
        record = make_record(row, cfg, report)
        if record is not None:
            records.append(record)
            if cfg.max_samples is not None and len(records) >= cfg.max_samples:
                break
    report.kept = len(records)
    print(report.summary())
    return records, report


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
    from diffalign.images import ImageTooLarge, upright

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


# ---------------------------------------------------------------------------------------------- tables
def table_rows(source: str, cfg: DataConfig) -> tuple[Iterator[Row], int | None]:
    """Rows of a parquet or hub table, with the schema picked by ``cfg.format`` or by the columns found."""
    dataset = load_table(source, cfg)
    names = list(dataset.column_names or next(iter(dataset)).keys())  # a stream may not know its columns up front
    schema = pick_schema(source, names, cfg.format)
    scored = schema == "chosen_rejected" and any(column in names for column in PAIR_SCORES)
    if scored and not all(column in names for column in PAIR_SCORES):
        raise DataError(f"data.source={source}: the columns {names} have only one of {', '.join(PAIR_SCORES)}; "
                        f"give both (a score per image, higher is better) or neither")
    dataset = dataset.select_columns(list(SCHEMAS[schema]) + (list(PAIR_SCORES) if scored else []))  # skip the rest
    for column in IMAGE_COLUMNS[schema]:  # keep the encoded bytes: we decode ourselves and count the bad ones
        feature = dataset.features.get(column)
        if undecoded(feature) is not feature:
            dataset = dataset.cast_column(column, undecoded(feature))

    def rows() -> Iterator[Row]:
        for index, row in enumerate(dataset):
            origin = f"row {index} of {source}"
            if schema == "pickapic":
                yield Row(index, "pair", row["caption"], [row["jpg_0"], row["jpg_1"]], row["label_0"], origin=origin)
            elif schema == "chosen_rejected":
                scores = [row[column] for column in PAIR_SCORES] if scored else None
                yield Row(index, "pair", row["prompt"], [row["chosen"], row["rejected"]], 1, scores, origin)
            elif schema == "labelled":
                yield Row(index, "labelled", row["prompt"], [row["image"]], row["label"], origin=origin)
            else:
                images = row["images"]
                yield Row(index, "ranked", row["prompt"], list(images) if isinstance(images, list | tuple) else [],
                          scores=row["scores"], origin=origin)

    return rows(), None if cfg.streaming else len(dataset)


def undecoded(feature: Any) -> Any:
    """``feature`` with every datasets ``Image`` in it set to ``decode=False`` (the same object if it has none).

    Covers plain ``Image`` columns and lists of images, whichever list feature the installed datasets uses
    (``List`` / ``LargeList`` since 4.0, ``Sequence`` before, or a plain ``[Image()]``).
    """
    from datasets import Image as ImageFeature

    if isinstance(feature, ImageFeature):
        return ImageFeature(decode=False) if feature.decode else feature
    if isinstance(feature, list) and len(feature) == 1:
        inner = undecoded(feature[0])
        return feature if inner is feature[0] else [inner]
    inner = getattr(feature, "feature", None)
    if inner is not None and dataclasses.is_dataclass(feature):
        new = undecoded(inner)
        return feature if new is inner else dataclasses.replace(feature, feature=new)
    return feature


def load_table(source: str, cfg: DataConfig):
    """A datasets.Dataset from a local parquet file, folder or glob, or from the hub."""
    import datasets

    data_files = parquet_files(source)
    if data_files is not None:
        try:
            return datasets.load_dataset("parquet", data_files=data_files, split="train", streaming=cfg.streaming)
        except Exception as error:  # a damaged footer, mixed schemas: name the source, not just pyarrow's words
            first = (str(error).strip().splitlines() or [""])[0][:300]
            raise DataError(f"data.source={source}: reading it as parquet failed: {type(error).__name__}: {first}; "
                            f"{EXPECTED_SOURCES}") from error
    if not HUB_ID.match(source) or source.endswith((".parquet", ".jsonl", ".json")):
        raise DataError(f"data.source={source} does not exist; {EXPECTED_SOURCES}")
    if source.lower() in ("zhwang/hpdv2", "ymhao/hpdv2"):  # json + image archives, not a table the hub can serve
        raise DataError(f"data.source={source}: HPDv2 is read from a local copy: download the dataset repository, "
                        "unpack its image archives so that train.json sits next to train/ (and test.json next to "
                        "test/), and set data.source to that folder (data.format=hpdv2)")
    try:
        return datasets.load_dataset(source, split=cfg.split, streaming=cfg.streaming)
    except Exception as error:  # offline, private, misspelled: the message should still say what was tried
        raise DataError(f"data.source={source}: no such local path, and loading it as a hub dataset "
                        f"(split={cfg.split!r}) failed: {type(error).__name__}: {error}") from error


def parquet_files(source: str) -> list[str] | None:
    """The local parquet files named by ``source``; None when it is not a local path (maybe a hub id)."""
    path = Path(source).expanduser()
    if any(char in source for char in "*?["):
        files = sorted(file for file in glob.glob(str(path), recursive=True) if Path(file).is_file())
        if not files:
            raise DataError(f"data.source={source}: the glob matches no files; {EXPECTED_SOURCES}")
        for file in files:
            check_parquet(file, source)
        return files
    if path.is_file():
        check_parquet(str(path), source)
        return [str(path)]
    if path.is_dir():
        files = sorted(str(file) for file in path.rglob("*.parquet"))
        if not files:
            raise DataError(f"data.source={source}: the folder has no parquet files (nor a metadata.jsonl or an "
                            f"HPDv2 train.json / test.json); {EXPECTED_SOURCES}")
        return files
    return None


def check_parquet(file: str, source: str) -> None:
    """DataError naming the formats we read unless ``file`` starts and ends with the parquet magic ``PAR1``."""
    with open(file, "rb") as handle:
        head = handle.read(4)
        handle.seek(max(Path(file).stat().st_size - 4, 0))
        tail = handle.read(4)
    if head != b"PAR1" or tail != b"PAR1" or Path(file).stat().st_size < 12:
        name = file if file == source else f"{file} (matched by data.source={source})"
        if head == b"PAR1":
            problem = "looks like a parquet file cut short or damaged (no PAR1 footer); download it again"
        else:
            kind = f"a {Path(file).suffix} file" if Path(file).suffix else "a file"
            problem = f"is {kind} that is not parquet (it does not start with PAR1), and not a format diffalign reads"
        raise DataError(f"data.source={name} {problem}; {EXPECTED_SOURCES}")


def pick_schema(source: str, columns: list[str], fmt: str) -> str:
    if fmt in SCHEMAS and all(column in columns for column in SCHEMAS[fmt]):
        return fmt
    if fmt == "auto":
        for name, required in SCHEMAS.items():
            if all(column in columns for column in required):
                return name
    raise schema_error(source, columns, "columns")


def schema_error(source: str, found: list[str], what: str) -> DataError:
    jsonl_kinds = "; ".join(f"{kind}: {', '.join(keys)}" for kind, keys in JSONL_KINDS.items())
    return DataError(
        f"data.source={source}: the {what} {found} match no known schema. Expected one of: "
        f"pickapic: {', '.join(PICKAPIC_COLUMNS)} (label_1 optional); "
        f"chosen_rejected: {', '.join(CHOSEN_REJECTED_COLUMNS)} ({', '.join(PAIR_SCORES)} optional); "
        f"labelled: {', '.join(LABELLED_COLUMNS)} (label 0/1); "
        f"ranked: {', '.join(RANKED_COLUMNS)} (lists, one score per image); "
        f"jsonl: a folder with metadata.jsonl whose lines are all of one kind: {jsonl_kinds} "
        f"(pairs may add {' and '.join(PAIR_SCORES)}); "
        f"hpdv2: {HPDV2_SHAPE}. Rename the columns or keys to one of these and set "
        f"data.format (auto, pickapic, chosen_rejected, labelled, ranked, jsonl or hpdv2)."
    )
