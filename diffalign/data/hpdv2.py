"""HPDv2, the Human Preference Dataset v2 of HPSv2, read as preference rows: ``data.format: hpdv2`` (or ``auto``).

Source: Wu et al. 2023, "Human Preference Score v2" (arXiv 2306.09341); repository tgxs002/HPSv2 (README section
"Human Preference Dataset v2", and ``hpsv2/src/training/data.py``); hub dataset ``zhwang/HPDv2`` (also
``ymhao/HPDv2``, whose dataset card repeats the format). About 798k preference choices over 430k images: 645k
pairs in the train split, 153k in the test split. The published layout::

    HPD/train.json   HPD/train/{image_id}.jpg   HPD/test.json   HPD/test/{image_id}.jpg

Both files are one JSON list of items. The keys we rely on:

- ``train.json``: ``prompt`` (str); ``file_path`` (list of image names, relative to ``train/``; the README and
  the HPSv2 training code, ``HPDDataset``, use this key; ``image_path`` is accepted too); ``human_preference``
  (list of ints, one per image, 1 = the preferred image). The training code pairs images (its collate takes
  images 0 and 1), so items are pairs in practice.
- ``test.json``: ``prompt``; ``image_path`` (list, relative to ``test/``); ``rank`` (list of ints, one per
  image, "averaged ranking result"; lower is better, as the HPSv2 evaluation compares it to the model's ranking
  where 0 is the highest score); ``raw_annotations`` / ``user_hash`` are ignored.

``data.source`` is a folder holding ``<data.split>.json`` (``train.json`` by default; ``data.split=test`` reads
``test.json``) with images under ``<split>/``, or a ``.json`` file itself, whose images are looked up under
``<folder>/<file stem>/`` and, failing that, ``<folder>/`` (decided once, on the first item).

What comes out:

- a ``train.json`` item becomes pairs: **every preferred image against every other image**, each pair scored
  ``[1, 0]`` (its ``human_preference`` values), so an item of K images with one preferred gives K-1 pairs. Pairs
  rather than one ranking with the losers tied, because the annotations are pairwise choices: pairwise objectives
  then keep every choice (a ranking would be cut to one best-vs-worst pair), and ``rank_dpo`` reads them as
  rankings of two, all of the same K (rankings of mixed K are refused).
- a ``test.json`` item becomes one ranking of K images with scores ``-rank`` (higher is better). ``rank_dpo``
  trains on it as is; pairwise objectives get its best-vs-worst pair (``diffalign.data.kinds``).

The scores are human orderings, not reward-model scores: fine for ``rank_dpo``, which uses only their order, but
not what ``smpo`` expects (PickScore-scale scores).

Bad items are counted skips naming the item and its line ("item 12 (line 1) of /x/train.json: ..."), fatal under
``data.strict=true``: ``bad_json`` (an item that is not an object), ``missing_field``, ``missing_image`` (an
image list that is not 2+ file names, or a file that is not there), ``unknown_label`` (``human_preference`` not
0/1, one per image), ``no_preference`` (no image preferred), ``tie`` (every image preferred, or every rank
equal), ``bad_scores`` (``rank`` not numbers, one per image), ``bad_text`` / ``empty_prompt`` (see
``validation.make_record``). A file whose first item has none of these keys is not HPDv2: the error lists the
formats we read.

Memory: the file (hundreds of MB for train.json) is streamed item by item (``diffalign.text.json_array_items``),
so only one item's parsed JSON is held at a time, besides the kept records themselves.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffalign.config import DataConfig
from diffalign.data.formats import EXPECTED_SOURCES, HPDV2_SHAPE, Row, schema_error
from diffalign.data.records import SkipReport
from diffalign.data.validation import checked_prompt, is_number
from diffalign.errors import DataError
from diffalign.text import TextError, describe_value, json_array_items, text_problem

IMAGE_KEYS = ("file_path", "image_path")  # train.json (README, HPSv2 training code) / test.json
SPLIT_FILES = ("train", "test")


def hpdv2_file(source: str, split: str) -> Path | None:
    """The HPDv2 json that ``source`` names: a ``.json`` file, or ``<split>.json`` in a folder; None otherwise."""
    path = Path(source).expanduser()
    if path.is_file():
        return path if path.suffix.lower() == ".json" else None
    if not path.is_dir():
        return None
    if (path / f"{split}.json").is_file():
        return path / f"{split}.json"
    others = [name for name in SPLIT_FILES if (path / f"{name}.json").is_file()]
    if others:
        raise DataError(f"data.source={source} holds {others[0]}.json but no {split}.json (data.split={split}); set "
                        f"data.split={others[0]}, or point data.source at the .json file")
    return None


def is_hpdv2_source(source: str, cfg: DataConfig) -> bool:
    """Whether ``data.format=auto`` reads ``source`` as HPDv2 (see ``hpdv2_file``)."""
    return hpdv2_file(source, cfg.split) is not None


def hpdv2_rows(source: str, cfg: DataConfig, report: SkipReport) -> tuple[Iterator[Row], None]:
    """Rows of an HPDv2 json (pairs from train.json, rankings from test.json), streamed; see the module doc."""
    path = hpdv2_file(source, cfg.split)
    if path is None:
        raise DataError(f"data.source={source}: data.format=hpdv2 needs {HPDV2_SHAPE}; {EXPECTED_SOURCES}")
    return item_rows(source, path, cfg, report), None


def item_rows(source: str, path: Path, cfg: DataConfig, report: SkipReport) -> Iterator[Row]:
    checked_shape, base = False, None
    try:
        for index, where, item in json_array_items(path):
            if not isinstance(item, dict):
                report.skip("bad_json", index, f"{where} is {describe_value(item)}, not a JSON object", cfg.strict)
                continue
            if not checked_shape:  # the first object decides: a wrong file, not one bad item
                if not ("prompt" in item and any(key in item for key in IMAGE_KEYS)
                        and ("human_preference" in item or "rank" in item)):
                    raise schema_error(source, list(item), f"keys of {where}")
                checked_shape = True
            names = image_names(index, where, item, cfg, report)
            if names is None:
                continue
            if base is None:
                base = image_folder(path, names[0])
            yield from item_pairs_or_ranking(index, where, item, [base / name for name in names], cfg, report)
    except TextError as error:  # before any item: not an HPDv2 file at all, so say what we read
        hint = "" if checked_shape else f"; data.format=hpdv2 expects {HPDV2_SHAPE}; {EXPECTED_SOURCES}"
        raise DataError(f"data.source={source}: {error}{hint}") from None


def image_names(index: int, where: str, item: dict, cfg: DataConfig, report: SkipReport) -> list[str] | None:
    key = next((key for key in IMAGE_KEYS if key in item), None)
    if key is None or not ("human_preference" in item or "rank" in item) or "prompt" not in item:
        missing = [name for name in ("prompt", "/".join(IMAGE_KEYS), "human_preference/rank")
                   if not any(part in item for part in name.split("/"))]
        report.skip("missing_field", index, f"{where} lacks {missing}", cfg.strict)
        return None
    names = item[key]
    if not isinstance(names, list) or len(names) < 2:
        report.skip("missing_image", index, f"{where}: {key} is {describe_value(names)}, expected a list of 2 or "
                    "more image file names", cfg.strict)
        return None
    for position, name in enumerate(names):
        if not isinstance(name, str) or not name.strip() or text_problem(name) is not None:
            report.skip("missing_image", index, f"{where}: {key}[{position}]={name!r} is not a file name",
                        cfg.strict)
            return None
    return names


def image_folder(path: Path, first: str) -> Path:
    """Where image names resolve: ``<folder>/<stem>/`` (the published layout) or ``<folder>/``."""
    nested = path.parent / path.stem
    if (nested / first).is_file() or not (path.parent / first).is_file() and nested.is_dir():
        return nested
    return path.parent


def item_pairs_or_ranking(index: int, where: str, item: dict, cells: list[Path], cfg: DataConfig,
                          report: SkipReport) -> Iterator[Row]:
    prompt = checked_prompt(Row(index, "pair", item["prompt"], cells, origin=where), cfg, report)
    if prompt is None:  # checked once here, so a K-image item with a bad prompt is one skip, not K-1
        return
    count = len(cells)
    if "human_preference" in item:
        preference = item["human_preference"]
        if not (isinstance(preference, list) and len(preference) == count
                and all(is_number(value) and value in (0, 1) for value in preference)):
            report.skip("unknown_label", index, f"{where}: human_preference={shorten(preference)}, expected 0 or 1 "
                        f"for each of the {count} images (1 = preferred)", cfg.strict)
            return
        chosen = [i for i, value in enumerate(preference) if value == 1]
        others = [i for i, value in enumerate(preference) if value == 0]
        if not chosen or not others:
            reason, what = ("no_preference", "no image") if not chosen else ("tie", "every image")
            report.skip(reason, index, f"{where}: human_preference={shorten(preference)}: {what} is preferred, so "
                        "the item carries no choice", cfg.strict)
            return
        for winner in chosen:
            for loser in others:
                yield Row(index, "pair", prompt, [cells[winner], cells[loser]], 1, [1.0, 0.0], where)
        return
    ranks = item["rank"]
    if not (isinstance(ranks, list) and len(ranks) == count
            and all(is_number(value) and math.isfinite(value) for value in ranks)):
        report.skip("bad_scores", index, f"{where}: rank={shorten(ranks)}, expected one number per image for the "
                    f"{count} images (lower is better)", cfg.strict)
        return
    if len(set(ranks)) == 1:
        report.skip("tie", index, f"{where}: rank={shorten(ranks)}: every image ranks the same, so the item "
                    "carries no preference", cfg.strict)
        return
    yield Row(index, "ranked", prompt, cells, scores=[-float(rank) for rank in ranks], origin=where)


def shorten(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 120 else shown[:117] + "..."
