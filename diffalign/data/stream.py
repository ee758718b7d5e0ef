"""Training straight from a stream (``data.streaming=true``): no index, no cache, nothing downloaded up front.

Each process reads its own share of the source: a streamed hub or parquet table is split by
``datasets.distributed.split_dataset_by_node`` (whole files per process when their number divides evenly, else
every P-th row), other sources by row (rows p, p + P, ... as in ``diffalign.data.decoding``). The rows are
checked, decoded and preprocessed in DataLoader workers, adapted to the objective's data kind, and batched in
the order they come; when the stream ends the next epoch starts it again. Each record is flipped or not as a
whole, drawn from (seed, epoch, row).

The position of a process in its stream (epoch, rows of its share used) is saved in every checkpoint, so a
resumed run continues where it stopped: the rows before it are read past, not checked or decoded again. Skips
are counted during the first epoch and summed over processes at the end. Data-kind checks that need every
record (one K for all rankings) are made record by record.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from diffalign.config import DataConfig
from diffalign.data.dataset import collate, flip_choice, pixel_item
from diffalign.data.decoding import RowStream, checked_records, worker_count
from diffalign.data.kinds import KindAdapter
from diffalign.data.readers import open_rows
from diffalign.data.records import SkipReport
from diffalign.data.shards import gather_json
from diffalign.data.validation import CheckedImages
from diffalign.errors import ConfigError, DataError


class StreamPosition(NamedTuple):
    """Where a process is in its stream: epoch, rows of its share fully used, items of the next row used."""

    epoch: int = 0
    rows: int = 0
    items: int = 0  # a row may give several items (a pair split into two labelled images)


class StreamItems:
    """Worker side: a kept record's adapted records as training items (pixels decoded once, flipped per record)."""

    def __init__(self, data_kind: str, source: str, family, resolution: int, images_per_record: int | None,
                 seed: int, random_flip: bool, epoch: int):
        self.adapter = KindAdapter(data_kind, source)
        self.family, self.resolution, self.count = family, resolution, images_per_record
        self.seed, self.random_flip, self.epoch = seed, random_flip, epoch

    def __call__(self, checked: CheckedImages) -> list[dict]:
        record = checked.record
        flipped = self.random_flip and flip_choice(self.seed, self.epoch, record.index)
        return [pixel_item(new, self.family, self.resolution, self.count, flipped,
                           checked.decoded(new.images))
                for new in self.adapter.adapt(record)]


class StreamData:
    """The batches of one process, from a stream, without end (see the module docstring)."""

    def __init__(self, cfg: DataConfig, source: str, data_kind: str, family, resolution: int,
                 images_per_record: int | None, seed: int, batch_size: int, process_index: int, num_processes: int):
        self.cfg, self.source, self.data_kind = cfg, source, data_kind
        self.family, self.resolution, self.images_per_record = family, resolution, images_per_record
        self.seed, self.batch_size = seed, batch_size
        self.process_index, self.num_processes = process_index, num_processes
        self.report = SkipReport()  # this run's first-epoch skips, in this process
        self.previous = SkipReport()  # what the run before a resume counted (all processes, summed)
        self.position = StreamPosition()  # after the last batch handed out
        self.first_k: int | None = None

    def open(self) -> tuple[RowStream, int, int]:
        """This process's rows, and the (process_index, num_processes) that still split them."""
        stream = open_rows(self.cfg, self.source)
        rows = stream.rows
        if getattr(rows, "split_by_node", None) is not None:  # a streamed table: datasets splits it by files
            return stream._replace(rows=rows.split_by_node(self.process_index, self.num_processes)), 0, 1
        return stream, self.process_index, self.num_processes

    def batches(self, position: StreamPosition | None = None) -> Iterator[dict]:
        epoch, start, skip_items = position or StreamPosition()
        while True:
            stream, index, count = self.open()
            items = StreamItems(self.data_kind, self.source, self.family, self.resolution, self.images_per_record,
                                self.seed, self.cfg.random_flip, epoch)
            report = self.report if epoch == 0 else SkipReport()
            pending: list[tuple[int, int, dict]] = []  # (share row, item number in its row, item)
            yielded, kept, limit = False, 0, self.per_process_limit()
            for checked in checked_records(stream, self.cfg, report, num_workers=worker_count(self.cfg.num_workers,
                                           None, self.num_processes), process_index=index, num_processes=count,
                                           start=start, prepare=items, prefetch=2):
                report.kept += epoch == 0
                kept += 1
                row = (checked.seq - index) // count  # 0-based row of this process's share
                for number, item in enumerate(checked.payload):
                    self.check_images(item)
                    if not (row == start and number < skip_items):  # used before the resumed checkpoint
                        pending.append((row, number, item))
                while len(pending) >= self.batch_size:
                    batch, pending = pending[: self.batch_size], pending[self.batch_size :]
                    last_row, last_number, _ = batch[-1]
                    partial = bool(pending) and pending[0][0] == last_row
                    self.position = StreamPosition(epoch, last_row if partial else last_row + 1,
                                                   last_number + 1 if partial else 0)
                    yielded = True
                    yield collate([item for _, _, item in batch])
                if limit is not None and kept >= limit:  # data.max_samples: this process's part of them
                    break
            if not yielded:
                raise DataError(f"data.source={self.source}: the stream gives process {self.process_index} of "
                                f"{self.num_processes} fewer usable records than one batch of {self.batch_size} "
                                f"(train.batch_size).\n{self.report.summary()}")
            epoch, start, skip_items = epoch + 1, 0, 0  # the incomplete last batch is dropped, as in every epoch

    def per_process_limit(self) -> int | None:
        """``data.max_samples`` split over the processes (each reads its own part of the stream)."""
        if self.cfg.max_samples is None:
            return None
        return -(-self.cfg.max_samples // self.num_processes)

    def check_images(self, item: dict) -> None:
        k = item["pixels"].shape[0]
        if self.first_k is None:
            self.first_k = k
        elif k != self.first_k:
            raise DataError(f"data.source={self.source}: record {item['index']} has {k} images after {self.first_k} "
                            "in earlier ones; every record of one run needs the same number (filter the data)")

    def summed_report(self) -> SkipReport:
        """The first epoch's skips of every process, with those counted before a resume (call on all processes)."""
        total = SkipReport.from_dict(self.previous.as_dict())
        for part in gather_json(self.report.as_dict()):
            total.merge(SkipReport.from_dict(part))
        return total

    def state(self) -> dict:
        """What a checkpoint keeps (call on all processes): every process's position and the skips so far."""
        return {"positions": gather_json(list(self.position)), "report": self.summed_report().as_dict()}

    def resume(self, saved: dict | None) -> StreamPosition:
        """This process's position from a checkpoint's ``state()`` (the start when None)."""
        if saved is None:
            return StreamPosition()
        positions = saved["positions"]
        if len(positions) != self.num_processes:
            raise ConfigError(f"the checkpoint's stream positions are for {len(positions)} processes, this run has "
                              f"{self.num_processes}: resume a streamed run with the same number of processes")
        self.previous = SkipReport.from_dict(saved["report"])
        return StreamPosition(*positions[self.process_index])
