"""What a data reader is, and the schemas of the formats diffalign reads: ``data.format`` names one of ``FORMATS``.

A reader turns ``data.source`` into ``Row`` values (one per source row, not yet checked); ``diffalign.data.validation``
checks each row into a ``PreferenceRecord``. ``diffalign.data.readers`` fills ``FORMATS``, one entry per
``data.format`` value with its reader, a description and its source (``diffalign list`` prints them). The
schemas:

- ``pickapic``: columns ``caption``, ``jpg_0``, ``jpg_1``, ``label_0`` (``label_1`` optional, unused);
  ``label_0`` 1 = jpg_0 preferred, 0 = jpg_1 preferred, 0.5 = tie. Rows whose optional ``are_different`` is
  false (Pick-a-Pic v2: the two images are the same picture) are skipped as ``identical_images``.
- ``chosen_rejected``: columns ``chosen``, ``rejected``, ``prompt``; optional ``chosen_score``, ``rejected_score``.
- ``labelled``: columns ``image``, ``label`` (0/1 or false/true), ``prompt``.
- ``ranked``: columns ``images`` (a list of images), ``scores`` (a list of numbers, one per image), ``prompt``.
- ``jsonl``: a local folder with ``metadata.jsonl`` (see ``diffalign.data.jsonl``), one of the kinds in
  ``JSONL_KINDS`` per file; ``labelled`` and ``ranked`` also read such a folder, requiring that kind.
- ``hpdv2``: the Human Preference Dataset v2 (HPSv2) JSON, ``train.json`` pairs or ``test.json`` rankings (see
  ``diffalign.data.hpdv2``).
- ``auto``: the first format that recognises the source (a ``metadata.jsonl`` folder, an HPDv2 json), else a table
  whose columns match one of the table schemas.

This module imports no reader, so every reader can import it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from diffalign.config import DataConfig
from diffalign.data.records import SkipReport
from diffalign.errors import DataError
from diffalign.registry import Registry

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


class Row(NamedTuple):
    """One source row before validation, whatever the schema."""

    index: int
    kind: str  # pair | labelled | ranked | caption
    prompt: Any
    cells: list[Any]  # image cells: bytes, {"bytes", "path"} dicts, PIL images, paths or TableImage (None = missing)
    label: Any = 1  # pair: label_0 (1 = cells already winner first, 0 = loser first, 0.5 = tie); labelled: the label
    scores: Any = None  # pair: [chosen, rejected] or None; ranked: one per cell
    origin: str = ""  # where the row came from, for skip messages: "line 3 of /x/metadata.jsonl"
    different: bool | None = None  # Pick-a-Pic are_different (False: the two images are the same picture)


RowReader = Callable[[str, DataConfig, SkipReport], tuple[Iterator[Row], int | None]]


@dataclass(frozen=True)
class DataFormat:
    """How one ``data.format`` value is read.

    Args:
        read: ``(source, data config, skip report) -> (rows, row count or None when unknown)``; raises
            ``DataError`` when the source is not in this format.
        claims: ``(source, data config) -> bool``: whether ``data.format=auto`` reads the source with this format
            (a cheap look at the files, no rows read). None: never picked by ``auto`` on its own.
    """

    read: RowReader
    claims: Callable[[str, DataConfig], bool] | None = None


FORMATS: Registry[DataFormat] = Registry("data format", "data.format")


def schema_error(source: str, found: list[str], what: str) -> DataError:
    """The error for a source whose columns (or keys) match no schema: what was found, and every schema we read."""
    jsonl_kinds = "; ".join(f"{kind}: {', '.join(keys)}" for kind, keys in JSONL_KINDS.items())
    names = FORMATS.names()
    return DataError(
        f"data.source={source}: the {what} {found} match no known schema. Expected one of: "
        f"pickapic: {', '.join(PICKAPIC_COLUMNS)} (label_1 optional); "
        f"chosen_rejected: {', '.join(CHOSEN_REJECTED_COLUMNS)} ({', '.join(PAIR_SCORES)} optional); "
        f"labelled: {', '.join(LABELLED_COLUMNS)} (label 0/1); "
        f"ranked: {', '.join(RANKED_COLUMNS)} (lists, one score per image); "
        f"jsonl: a folder with metadata.jsonl whose lines are all of one kind: {jsonl_kinds} "
        f"(pairs may add {' and '.join(PAIR_SCORES)}); "
        f"hpdv2: {HPDV2_SHAPE}. Rename the columns or keys to one of these and set "
        f"data.format ({', '.join(names[:-1])} or {names[-1]})."
    )
