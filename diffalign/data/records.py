"""The one record type every reader yields, where its images are, and the bookkeeping for skipped records.

A record points at its images rather than holding them: an ``ImageSource`` is a path to a file (local folders),
a ``TableImage`` (a cell of a memory-mapped table, read when needed), or, for streamed tables only, the encoded
bytes of the row in hand. So what is resident grows with the batch, not with the data.
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from diffalign.errors import DataError
from diffalign.images import load_image


@dataclass(frozen=True)
class TableImage:
    """An image cell of a table opened in this process (``register_table``): row ``row`` of ``column``, and for a
    list column (ranked ``images``) its item ``item``. Reading it touches only that cell of the memory-mapped
    Arrow data."""

    table: str  # the key register_table returned
    row: int
    column: str
    item: int | None = None


# An image is a path to a file (local folders), a table cell, or encoded bytes (streamed tables, in-memory data).
ImageSource = bytes | Path | TableImage

REMAP_EVERY = 256  # cells read between re-mappings of the files they came from


class MappedTable:
    """A registered table: its ``datasets.Dataset`` (what travels to a spawned worker) and the Arrow data of each of
    its cache files, mapped again from the file once ``REMAP_EVERY`` cells have been read since the last time.

    Why: each page of a memory map that has been read counts in the process's RSS until the map is closed, so a
    DataLoader worker decoding its share of a 300 GB Pick-a-Pic table would seem to hold that share (measured: a
    worker's RSS grew by the 0.4 GB of cells it read from a 0.5 GB table). The pages stay in the page cache either
    way; closing the map stops them being counted against the process. Mapping one cache file (~500 MB) again costs
    a few ms. A table ``datasets`` has changed after loading (casts, renames) is read as ``datasets`` gives it.
    """

    def __init__(self, dataset: Any):
        from datasets.table import ConcatenationTable, MemoryMappedTable

        self.dataset, self.reads, self.touched = dataset, 0, set()
        data = dataset.data
        blocks = [[data]] if isinstance(data, MemoryMappedTable) else \
            data.blocks if isinstance(data, ConcatenationTable) else []
        self.parts = [row[0] for row in blocks if len(row) == 1 and isinstance(row[0], MemoryMappedTable)]
        if len(self.parts) != len(blocks) or not self.parts or \
                not all(part.schema.equals(data.schema, check_metadata=False) for part in self.parts):
            self.parts = []  # not plain memory-mapped files: no re-mapping
        self.files = [part.path for part in self.parts]
        self.starts = list(itertools.accumulate((part.num_rows for part in self.parts), initial=0))

    def cell(self, column: str, row: int):
        """The pyarrow scalar at ``row`` of ``column``."""
        if not self.parts:
            return self.dataset.data.column(column)[row]
        part = bisect.bisect_right(self.starts, row) - 1
        value = self.parts[part].column(column)[row - self.starts[part]]
        self.touched.add(part)
        self.reads += 1
        if self.reads % REMAP_EVERY == 0:
            import pyarrow as pa

            for number in self.touched:  # the old maps close once nothing points into them
                self.parts[number] = pa.ipc.open_stream(pa.memory_map(self.files[number])).read_all()
            self.touched.clear()
        return value

    def __getstate__(self):  # a spawned worker maps the files itself
        return {"dataset": self.dataset}

    def __setstate__(self, state):
        self.__init__(state["dataset"])


_TABLES: dict[str, MappedTable] = {}  # key -> a registered table, in this process and its workers


def register_table(dataset: Any) -> str:
    """Make ``dataset`` (a ``datasets.Dataset`` with no row selection) addressable by ``TableImage``; returns its
    key, the fingerprint ``datasets`` gives it (the same for the same files in every process and run)."""
    key = str(dataset._fingerprint)
    if key not in _TABLES:
        _TABLES[key] = MappedTable(dataset)
    return key


def open_tables() -> dict[str, Any]:
    """The tables registered in this process, for a worker started without them (``adopt_tables``)."""
    return dict(_TABLES)


def adopt_tables(tables: dict[str, Any]) -> None:
    """Register ``tables`` (from ``open_tables``) in this process: a spawned worker does not inherit them."""
    for key, table in tables.items():
        _TABLES.setdefault(key, table)


def table_cell(source: TableImage) -> Any:
    """The raw cell a ``TableImage`` points at: bytes, a ``{"bytes", "path"}`` dict, or None."""
    table = _TABLES.get(source.table)
    if table is None:
        raise DataError(f"the table of {source} is not open in this process (open the data source first)")
    cell = table.cell(source.column, source.row).as_py()
    if source.item is not None:
        cell = cell[source.item] if isinstance(cell, list) and source.item < len(cell) else None
    return cell


def encoded_image(source: ImageSource) -> bytes | Path | None:
    """Bytes or a path to decode: a ``TableImage`` read from its table (None for an empty cell)."""
    if not isinstance(source, TableImage):
        return source
    cell = table_cell(source)
    if isinstance(cell, dict):
        cell = cell.get("bytes") if cell.get("bytes") is not None else cell.get("path")
        return Path(cell) if isinstance(cell, str) and cell else cell
    return bytes(cell) if isinstance(cell, bytes | bytearray | memoryview) else None


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
    """Counts of records skipped per reason, with a few examples each; logged at the end of reading.

    Reports of several processes (or cache shards) add up with ``merge``; ``as_dict`` / ``from_dict`` are their
    JSON form (``run_info.json``, cache shards)."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, index: int, detail: str, strict: bool) -> None:
        message = f"record {index}: {reason}: {detail}"
        if strict:
            raise DataError(f"{message} (data.strict=true makes bad records fatal; set data.strict=false to skip them)")
        self.add(reason, message)

    def add(self, reason: str, message: str, count: int = 1) -> None:
        self.skipped[reason] += count
        examples = self.examples.setdefault(reason, [])
        if len(examples) < 3:
            examples.append(message)

    def merge(self, other: SkipReport) -> SkipReport:
        self.kept += other.kept
        for reason, count in other.skipped.items():
            self.skipped[reason] += count
            examples = self.examples.setdefault(reason, [])
            examples.extend(other.examples.get(reason, [])[: 3 - len(examples)])
        return self

    def as_dict(self) -> dict:
        return {"kept": self.kept, "skipped": dict(self.skipped), "examples": self.examples}

    @classmethod
    def from_dict(cls, data: dict) -> SkipReport:
        return cls(data.get("kept", 0), Counter(data.get("skipped", {})), dict(data.get("examples", {})))

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
    Raises what ``load_image`` raises (``ImageTooLarge`` over ``max_pixels``, Pillow's errors for bad data), and
    ``DataError`` for an empty table cell.
    """
    encoded = encoded_image(source)
    if encoded is None:
        raise DataError(f"{source} is an empty image cell")
    return load_image(encoded, max_pixels=max_pixels)
