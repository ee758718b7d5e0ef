"""Tables: a parquet file, a folder of parquet files, a glob, or a hub dataset id, read with ``datasets``.

The schema (``pickapic``, ``chosen_rejected``, ``labelled``, ``ranked``; see ``diffalign.data.formats``) is the one
``data.format`` names, or with ``auto`` the first whose columns the table has. Only the schema's columns are read,
and image columns are not read at all: rows point at their image cells (``TableImage``), which
``diffalign.data.validation`` decodes, once, in DataLoader workers, counting the bad ones (a streamed table keeps
the encoded bytes of the rows in hand, ``decode=False``). Any local file that is not parquet (a .csv, a .txt, a
damaged parquet) is a ``DataError`` listing the formats we read.
"""

from __future__ import annotations

import dataclasses
import glob
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffalign.config import DataConfig
from diffalign.data.formats import EXPECTED_SOURCES, IMAGE_COLUMNS, PAIR_SCORES, SCHEMAS, Row, schema_error
from diffalign.data.records import TableImage, register_table
from diffalign.errors import DataError

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
TABLE_KEYS: dict[str, str] = {}  # data.source -> the fingerprint of the table loaded for it (build keys)


def table_rows(source: str, cfg: DataConfig) -> tuple[Iterator[Row], int | None]:
    """Rows of a parquet or hub table, with the schema picked by ``cfg.format`` or by the columns found.

    A loaded table (``datasets`` keeps it as memory-mapped Arrow) is read without its image columns: each image
    cell becomes a ``TableImage`` pointing at its row, so reading the rows costs their text and labels only. A
    streamed table (``data.streaming=true``) has no random access: its rows carry their image bytes as they arrive.
    """
    dataset = load_table(source, cfg)
    names = list(dataset.column_names or next(iter(dataset)).keys())  # a stream may not know its columns up front
    schema = pick_schema(source, names, cfg.format)
    scored = schema == "chosen_rejected" and any(column in names for column in PAIR_SCORES)
    if scored and not all(column in names for column in PAIR_SCORES):
        raise DataError(f"data.source={source}: the columns {names} have only one of {', '.join(PAIR_SCORES)}; "
                        f"give both (a score per image, higher is better) or neither")
    columns = list(SCHEMAS[schema]) + (list(PAIR_SCORES) if scored else [])
    if schema == "pickapic" and "are_different" in names:
        columns.append("are_different")
    if cfg.streaming:
        dataset = dataset.select_columns(columns)  # skip the rest
        for column in IMAGE_COLUMNS[schema]:  # keep the encoded bytes: we decode ourselves and count the bad ones
            feature = dataset.features.get(column)
            if undecoded(feature) is not feature:
                dataset = dataset.cast_column(column, undecoded(feature))
        return StreamedRows(dataset, schema, source), None
    # Registered now, before any DataLoader worker starts: the workers read the cells through it.
    TABLE_KEYS[source] = register_table(dataset)
    return pointer_rows(TABLE_KEYS[source], dataset, schema, columns, source), len(dataset)


class StreamedRows:
    """The rows of a streamed table (a ``datasets.IterableDataset``), with their image bytes; ``split_by_node``
    gives one process's part (``datasets.distributed.split_dataset_by_node``: whole files per process when their
    number divides evenly, else every P-th row)."""

    def __init__(self, dataset, schema: str, source: str, part: str = ""):
        self.dataset, self.schema, self.source, self.part = dataset, schema, source, part

    def __iter__(self) -> Iterator[Row]:
        where = f"{self.part}{self.source}"
        return (schema_row(self.schema, index, row, where) for index, row in enumerate(self.dataset))

    def split_by_node(self, rank: int, world_size: int) -> StreamedRows:
        from datasets.distributed import split_dataset_by_node

        if world_size == 1:
            return self
        return StreamedRows(split_dataset_by_node(self.dataset, rank=rank, world_size=world_size), self.schema,
                            self.source, f"process {rank}'s part of ")


def pointer_rows(key: str, dataset, schema: str, columns: list[str], source: str,
                 batch_rows: int = 4096) -> Iterator[Row]:
    """Rows of a loaded table whose image cells are ``TableImage`` pointers: the other columns are read from the
    Arrow data in batches, the image columns not at all (for ranked tables, only the list lengths)."""
    import pyarrow.compute as pc

    images = IMAGE_COLUMNS[schema]
    table = dataset.data.table.select([column for column in columns if column not in images])
    lengths = pc.list_value_length(dataset.data.column("images")) if schema == "ranked" else None
    index = 0
    for batch in table.to_batches(max_chunksize=batch_rows):
        for values in batch.to_pylist():
            if lengths is None:
                values.update({column: TableImage(key, index, column) for column in images})
            else:  # a list of images: one pointer per item (none for a null list)
                count = lengths[index].as_py() or 0
                values["images"] = [TableImage(key, index, "images", item) for item in range(count)]
            yield schema_row(schema, index, values, source)
            index += 1


def schema_row(schema: str, index: int, row: dict, source: str) -> Row:
    """One table row as a ``Row`` of its schema (image cells as they are: bytes, dicts or ``TableImage``)."""
    origin = f"row {index} of {source}"
    if schema == "pickapic":
        return Row(index, "pair", row["caption"], [row["jpg_0"], row["jpg_1"]], row["label_0"], origin=origin,
                   different=row.get("are_different"))
    if schema == "chosen_rejected":
        scores = [row[column] for column in PAIR_SCORES] if "chosen_score" in row else None
        return Row(index, "pair", row["prompt"], [row["chosen"], row["rejected"]], 1, scores, origin)
    if schema == "labelled":
        return Row(index, "labelled", row["prompt"], [row["image"]], row["label"], origin=origin)
    images = row["images"]
    return Row(index, "ranked", row["prompt"], list(images) if isinstance(images, list | tuple) else [],
               scores=row["scores"], origin=origin)


def undecoded(feature: Any) -> Any:
    """``feature`` with every datasets ``Image`` in it set to ``decode=False`` (the same object if it has none).

    Covers plain ``Image`` columns and lists of images, whichever list feature the installed datasets uses
    (``List`` / ``LargeList`` since 4.0, ``Sequence`` before, or a plain ``[Image()]``).
    """
    from datasets import Image as ImageFeature  # datasets takes seconds to import: only when a table is read

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

    data_files = parquet_files(source)
    if data_files is not None:
        try:
            return load_split("parquet", "train", cfg.streaming, data_files=data_files)
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
        return load_split(source, cfg.split, cfg.streaming)
    except Exception as error:  # offline, private, misspelled: the message should still say what was tried
        raise DataError(f"data.source={source}: no such local path, and loading it as a hub dataset "
                        f"(split={cfg.split!r}) failed: {type(error).__name__}: {error}") from error


def load_split(path: str, split: str, streaming: bool, **options):
    """``datasets.load_dataset(path, split=split, streaming=streaming, **options)``, reading parquet without
    pre-buffering.

    pyarrow's parquet scan pre-buffers by default and keeps every column chunk it read until the file is done, so
    converting one 2 GB parquet file to Arrow held 2.2 GB of memory (measured with 16k Pick-a-Pic rows; 0.43 GB
    with pre-buffering off, and faster). The option changes how the file is read, not what is read, so it is set
    on the built config and the ``datasets`` cache stays keyed as before.
    """
    import datasets
    import pyarrow.dataset

    builder = datasets.load_dataset_builder(path, **options)
    if hasattr(builder.config, "fragment_scan_options") and builder.config.fragment_scan_options is None:
        builder.config.fragment_scan_options = pyarrow.dataset.ParquetFragmentScanOptions(pre_buffer=False)
    if streaming:
        return builder.as_streaming_dataset(split=split)
    builder.download_and_prepare()
    return builder.as_dataset(split=split)


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
