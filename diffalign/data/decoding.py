"""Validating records in parallel, in bounded memory: rows are read and checked (labels, scores, prompts) in the
process that reads them, and their images are decoded in DataLoader worker processes.

    >>> from diffalign.config import DataConfig
    >>> from diffalign.data import SkipReport, open_rows
    >>> from diffalign.offline import resolve_data_spec
    >>> from pathlib import Path
    >>> parquet = str(Path(resolve_data_spec("tiny:pairs")).parent / "pairs.parquet")    # Pick-a-Pic schema
    >>> cfg, report = DataConfig(), SkipReport()
    >>> kept = list(checked_records(open_rows(cfg, parquet), cfg, report, num_workers=2))
    >>> len(kept), report.total_skipped, kept[0].record.images[0]   # doctest: +ELLIPSIS
    (64, 4, TableImage(table='...', row=0, column='jpg_0', item=None))

The reading process sends each checked record to the workers as a DataLoader "index" (a ``JobSampler``); a
worker decodes its images once (``validation.check_images``), optionally turns them into what the caller needs
(``prepare``: pixels for the feature cache), and sends back the record or the reason it is skipped. The loader
keeps source order and holds at most ``num_workers x prefetch_factor`` records in flight, so memory is flat in
the data. Skips are counted in the reading process, in order, so ``data.strict=true`` stops at the first.

With several processes, ``process_index`` / ``num_processes`` split the rows: process p takes rows
p, p + P, p + 2P, ... of the source (its *share*), so every process reads and decodes a different part.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch

from diffalign.config import DataConfig
from diffalign.data.formats import Row
from diffalign.data.records import PreferenceRecord, SkipReport, adopt_tables, open_tables
from diffalign.data.validation import CheckedImages, check_images, check_row

SMALL_SOURCE = 512  # fewer rows than this: decode in the reading process, starting workers would cost more


class Checked(NamedTuple):
    """A kept record: its position ``seq`` in the source's rows, the record, and what ``prepare`` made of it.

    With ``yield_skips=True`` skipped rows come out too, as ``record=None`` and ``skip=(reason, index, detail)``
    (``seq``: the row, or for a skip the reader found between rows, the row after it), and a last item with
    ``end=True`` whose ``seq`` is the number of rows read."""

    seq: int
    record: PreferenceRecord | None
    payload: Any = None
    skip: tuple[str, int, str] | None = None
    end: bool = False


def worker_count(requested: int | None, total_rows: int | None, num_processes: int = 1) -> int:
    """``data.num_workers``, or when it is None: none for small sources, else the CPUs per process (at most 8)."""
    if requested is not None:
        return requested
    if total_rows is not None and total_rows < SMALL_SOURCE:
        return 0
    return max(1, min(8, (os.cpu_count() or 1) // max(num_processes, 1)))


class RowStream(NamedTuple):
    """A source's rows (``open_rows``), their count when known, and the skips its reader found on the way."""

    rows: Iterable[Row]
    total: int | None
    skips: DeferredSkips


class DeferredSkips:
    """What a reader and ``check_row`` get as their report: skips are remembered, in order, to be counted (or
    raised, under ``data.strict=true``) where the kept records come out, so that they keep source order."""

    def __init__(self):
        self.pending: list[tuple[str, int, str]] = []

    def skip(self, reason: str, index: int, detail: str, strict: bool = False) -> None:
        self.pending.append((reason, index, detail))

    def drain(self) -> list[tuple[str, int, str]]:
        pending, self.pending = self.pending, []
        return pending


class JobSampler:
    """The DataLoader's "sampler": yields jobs from a generator run in the reading process."""

    def __init__(self, jobs: Iterable):
        self.jobs = jobs

    def __iter__(self):
        return iter(self.jobs)


class ImageChecks(torch.utils.data.Dataset):
    """Runs in the workers: decode a job's images (``check_images``) and ``prepare`` the kept ones. A job is
    ``(seq, record, None)``, or ``(seq, None, skip)`` for a skip found while reading, passed through in order."""

    def __init__(self, max_pixels: int | None, as_bytes: bool,
                 prepare: Callable[[CheckedImages], Any] | None = None):
        self.max_pixels, self.as_bytes, self.prepare = max_pixels, as_bytes, prepare
        self.tables = open_tables()  # travels to spawned workers; forked ones have them already

    def __getitem__(self, job: tuple[int | None, PreferenceRecord | None, tuple | None]):
        adopt_tables(self.tables)
        seq, record, skip = job
        if skip is not None:
            return seq, None, skip, None
        checked = check_images(record, self.max_pixels, self.as_bytes)
        payload = self.prepare(checked) if self.prepare is not None and checked.record is not None else None
        return seq, checked.record, checked.skip, payload


def keep(item):
    return item


def checked_records(stream: RowStream, cfg: DataConfig, report: SkipReport | None, *, num_workers: int = 0,
                    process_index: int = 0, num_processes: int = 1, start: int = 0, as_bytes: bool = False,
                    prepare: Callable[[CheckedImages], Any] | None = None, prefetch: int = 4,
                    yield_skips: bool = False) -> Iterator[Checked]:
    """The records of this process's share of a source's rows that pass every check, in source order.

    Args:
        stream: ``open_rows(cfg, source)``; every process reads all rows and checks its share (rows p, p + P, ...).
        cfg: the ``data`` section (``strict``, ``drop_ties``, ``max_image_pixels``).
        report: counts the skips of this share, in source order (fatal under ``data.strict=true``). Skips the
            reader itself finds (a bad jsonl line) belong to no row: process 0 counts them. None with
            ``yield_skips``: the caller counts them.
        num_workers: DataLoader workers that decode the images (0: in this process).
        start: read past the share's first ``start`` rows without checking them (a resumed cache build).
        as_bytes: kept records hold their table images as bytes (for records that outlive the table).
        prepare: runs in the worker on each kept record and its decoded images; its result is ``payload``.
        prefetch: jobs in flight per worker (each holds one record's decoded or prepared images).
        yield_skips: also yield the skips and a last ``end`` item (see ``Checked``), instead of counting them.

    Yields:
        ``Checked(seq, record, payload)``.
    """
    first = process_index + start * num_processes
    rows_read = 0

    def jobs() -> Iterator[tuple]:
        nonlocal rows_read
        seq = -1
        for seq, row in enumerate(stream.rows):
            yield from reader_skips(seq)
            if seq < first or seq % num_processes != process_index:
                continue
            record = check_row(row, cfg, stream.skips)
            for skip in stream.skips.drain():
                yield seq, None, skip
            if record is not None:
                yield seq, record, None
        rows_read = seq + 1
        yield from reader_skips(rows_read)

    def reader_skips(seq: int) -> Iterator[tuple]:
        # Found by the reader before row ``seq``: counted once, by process 0; every process raises under strict.
        for skip in stream.skips.drain():
            if (process_index == 0 and seq >= first) or cfg.strict:
                yield seq, None, skip

    loader = torch.utils.data.DataLoader(
        ImageChecks(cfg.max_image_pixels, as_bytes, prepare), sampler=JobSampler(jobs()), batch_size=None,
        num_workers=num_workers, collate_fn=keep, prefetch_factor=prefetch if num_workers else None)
    for seq, record, skip, payload in loader:
        if skip is None:
            yield Checked(seq, record, payload)
        elif yield_skips:
            if cfg.strict:
                SkipReport().skip(*skip, strict=True)
            yield Checked(seq, None, skip=skip)
        else:
            report.skip(*skip, cfg.strict)
    if yield_skips:
        yield Checked(rows_read, None, end=True)
