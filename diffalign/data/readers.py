"""Readers that turn a data source into validated preference records, and the table of ``data.format`` values.

    >>> from diffalign.config import load_config
    >>> from diffalign.offline import resolve_data_spec
    >>> cfg = load_config("configs/tiny_dpo.yaml")                     # data.source: tiny:pairs
    >>> records, report = read_preferences(cfg.data, resolve_data_spec(cfg.data.source))
    data: kept 64 records, skipped 0
    >>> len(records[0].images), report.kept
    (2, 64)

Records come in three shapes, all ``PreferenceRecord``: pairs ``[chosen, rejected]`` (optionally with
``scores=[s_chosen, s_rejected]``), labelled singles ``[image]`` with ``labels=[1.0 or 0.0]``, and ranked sets
``[x1..xK]`` (K >= 2) with ``scores=[s1..sK]`` in the given order. ``diffalign.data.kinds.adapt_records`` turns
them into what an objective needs. The schemas of each ``data.format`` are listed in ``diffalign.data.formats``;
the readers are ``diffalign.data.tables`` (parquet and hub tables), ``diffalign.data.jsonl`` (local folders) and
``diffalign.data.hpdv2``.

Tables come from a parquet file, a folder of parquet files, a glob, or a hub dataset id; any other local file
(a .csv, a .txt, a .json that is not HPDv2, a damaged parquet) is a ``DataError`` listing these formats. Bad
records (undecodable or missing images, empty prompts, prompts that are not text or not UTF-8, unknown labels, bad
scores) are skipped and counted in a ``SkipReport`` whose messages name the file and line or row, or are fatal
under ``data.strict=true`` (``diffalign.data.validation``). Every kept image is fully decoded once, in DataLoader
workers (``diffalign.data.decoding``), so training never meets a bad one.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

from tqdm.auto import tqdm

from diffalign.config import DataConfig
from diffalign.data.decoding import DeferredSkips, RowStream, checked_records, worker_count
from diffalign.data.formats import FORMATS, DataFormat, Row
from diffalign.data.hpdv2 import hpdv2_rows, is_hpdv2_source
from diffalign.data.jsonl import is_jsonl_source, jsonl_metadata_path, jsonl_rows
from diffalign.data.records import PreferenceRecord, SkipReport
from diffalign.data.tables import table_rows
from diffalign.logs import get_logger

logger = get_logger(__name__)


def read_preferences(cfg: DataConfig, source: str | None = None) -> tuple[list[PreferenceRecord], SkipReport]:
    """Read every usable record of ``source`` (default ``cfg.source``), up to ``cfg.max_samples`` kept ones, into
    memory: table images come back as their encoded bytes. For small data and inspection; training reads through
    ``diffalign.data.build`` instead, which holds no images.

    Args:
        cfg: the ``data`` section: ``format`` (a name in ``FORMATS``), ``split``, ``strict``, ``drop_ties``,
            ``max_samples``, ``max_image_pixels``, ``streaming``, ``num_workers`` (image decoding).
        source: overrides ``cfg.source`` (e.g. a ``tiny:`` spec resolved to a folder).

    Returns:
        The kept records in source order, and the ``SkipReport`` counting the skipped ones (also logged).

    Raises:
        ConfigError: an unknown ``data.format``. DataError: a source that is not in the format, or any bad
        record under ``data.strict=true``.
    """
    source = str(cfg.source if source is None else source)
    report = SkipReport()
    stream = open_rows(cfg, source)
    rows = tqdm(stream.rows, total=stream.total, desc="reading preferences", disable=None)
    records = []
    for checked in checked_records(stream._replace(rows=rows), cfg, report, as_bytes=True,
                                   num_workers=worker_count(cfg.num_workers, stream.total)):
        records.append(checked.record)
        if cfg.max_samples is not None and len(records) >= cfg.max_samples:
            break
    rows.close()
    report.kept = len(records)
    logger.info(report.summary())
    return records, report


def open_rows(cfg: DataConfig, source: str) -> RowStream:
    """The rows of ``source`` in ``data.format`` (a ``FORMATS`` reader), not yet checked, with a ``DeferredSkips``
    for what the reader skips on the way. Raises what the reader raises for a source not in the format."""
    skips = DeferredSkips()
    rows, total = FORMATS.get(cfg.format).read(source, cfg, skips)
    return RowStream(rows, total, skips)


def read_auto(source: str, cfg: DataConfig, report: SkipReport) -> tuple[Iterator[Row], int | None]:
    """``data.format=auto``: the first format that claims the source, else a table whose columns pick the schema."""
    for entry in FORMATS.entries():
        if entry.value.claims is not None and entry.value.claims(source, cfg):
            return entry.value.read(source, cfg, report)
    return table_rows(source, cfg)


def read_table_or_jsonl(source: str, cfg: DataConfig, report: SkipReport,
                        kind: str) -> tuple[Iterator[Row], int | None]:
    """``labelled`` and ``ranked``: a metadata.jsonl folder whose lines must all be ``kind``, else a table."""
    if jsonl_metadata_path(source) is not None:
        return jsonl_rows(source, cfg, report, kind=kind)
    return table_rows(source, cfg)


def read_table(source: str, cfg: DataConfig, report: SkipReport) -> tuple[Iterator[Row], int | None]:
    """``pickapic`` and ``chosen_rejected``: a parquet or hub table (no row is skipped before validation)."""
    return table_rows(source, cfg)


# ---------------------------------------------------------------------------------------------- data.format values
# In this order: ``auto`` tries the claiming formats in it, and error messages list the names in it.
FORMATS.register(
    "auto", DataFormat(read_auto),
    description="pick from the data: a folder with metadata.jsonl (jsonl), an HPDv2 train.json / test.json "
                "(hpdv2), else a table whose columns match pickapic, chosen_rejected, labelled or ranked")
FORMATS.register(
    "pickapic", DataFormat(read_table),
    description="table: caption, jpg_0, jpg_1, label_0 (1 = jpg_0 preferred, 0 = jpg_1, 0.5 = tie)",
    source="Pick-a-Pic, Kirstain et al. 2023 (arXiv 2305.01569); hub yuvalkirstain/pickapic_v1")
FORMATS.register(
    "chosen_rejected", DataFormat(read_table),
    description="table: prompt, chosen, rejected images; optional chosen_score, rejected_score",
    source="the prompt / chosen / rejected preference layout of TRL (huggingface/trl)")
FORMATS.register(
    "labelled", DataFormat(partial(read_table_or_jsonl, kind="labelled")),
    description="single images with a label (1 desirable, 0 undesirable): table image, label, prompt, or a "
                "metadata.jsonl folder of labelled lines")
FORMATS.register(
    "ranked", DataFormat(partial(read_table_or_jsonl, kind="ranked")),
    description="K images per prompt with one score each (higher is better): table images, scores, prompt, or a "
                "metadata.jsonl folder of ranked lines")
FORMATS.register(
    "jsonl", DataFormat(jsonl_rows, claims=is_jsonl_source),
    description="a local folder with metadata.jsonl: pair, labelled, ranked or caption lines, file names relative "
                "to the folder",
    source="the metadata.jsonl of Hugging Face datasets' imagefolder (huggingface/datasets)")
FORMATS.register(
    "hpdv2", DataFormat(hpdv2_rows, claims=is_hpdv2_source),
    description="Human Preference Dataset v2: train.json pairs or test.json rankings, images next to them",
    source="HPSv2, Wu et al. 2023 (arXiv 2306.09341); tgxs002/HPSv2, hub zhwang/HPDv2")
