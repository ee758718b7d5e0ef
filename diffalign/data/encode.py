"""One process's part of a build: its checked records adapted, their images encoded, written shard by shard.

``PrepareImages`` runs in DataLoader workers on each kept record and its decoded images: it adapts the record to
the objective's data kind and preprocesses the images it keeps (both orientations, or one when
``data.random_flip`` is off). ``ShardWriter`` runs in the process that owns the model: it batches the pixels
through the VAE and writes one safetensors shard per ``shard_rows`` rows of its share (``diffalign.data.shards``),
with the records, their prompts (text, for the prompt pass), where each image came from, and the skips of those
rows. Memory is one shard's latents plus the encode batch.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from diffalign.data.decoding import Checked
from diffalign.data.kinds import KindAdapter
from diffalign.data.records import PreferenceRecord, SkipReport, TableImage
from diffalign.data.shards import write_shard
from diffalign.data.validation import CheckedImages
from diffalign.errors import DataError


def prompt_hash(prompt: str) -> int:
    """A prompt's key: the first 8 bytes of its SHA-1, as a signed int64 (collisions: ~1e-8 at a million prompts)."""
    return int.from_bytes(hashlib.sha1(prompt.encode("utf-8")).digest()[:8], "big", signed=True)


def image_ref(source) -> list:
    """Where an image is, as JSON: ``["table", key, row, column, item]`` or ``["path", path]``."""
    if isinstance(source, TableImage):
        return ["table", source.table, source.row, source.column, source.item]
    if isinstance(source, Path):
        return ["path", str(source)]
    raise DataError("records that hold their image bytes (a streamed table) cannot be indexed; set "
                    "data.streaming=false, or data.cache=false to train from the stream")


def source_of(ref: list):
    """The ``ImageSource`` an ``image_ref`` names."""
    return TableImage(ref[1], ref[2], ref[3], ref[4]) if ref[0] == "table" else Path(ref[1])


class PrepareImages:
    """Worker side: the adapted records of one kept record, each with its pixels (K, F, 3, H, W) and, for
    families that condition on it, each image's (orig_h, orig_w, crop_top, crop_left); no pixels when
    ``family`` is None (an index without a cache: the images were only checked)."""

    def __init__(self, data_kind: str, source: str, family=None, resolution: int = 0, flips: int = 2):
        self.data_kind, self.source = data_kind, source
        self.family, self.resolution, self.flips = family, resolution, flips

    def __call__(self, checked: CheckedImages) -> list[tuple[PreferenceRecord, torch.Tensor | None, torch.Tensor | None]]:
        record = checked.record
        adapted = KindAdapter(self.data_kind, self.source).adapt(record)
        prepared = []
        for new in adapted:
            if self.family is None:
                prepared.append((new, None, None))
                continue
            images = checked.decoded(new.images)
            pixels = torch.stack([torch.stack([self.family.preprocess_image(image, self.resolution, flip)
                                               for flip in (False, True)[: self.flips]]) for image in images])
            sizes = torch.tensor([self.family.image_size(image, self.resolution) for image in images]) \
                if self.family.needs_image_sizes else None
            prepared.append((new, pixels, sizes))
        return prepared


def shard_name(kind: str, num_processes: int, process_index: int, shard: int) -> str:
    return f"{kind}-{num_processes}p-{process_index:03d}-{shard:05d}.safetensors"


class ShardWriter:
    """Collects one process's records shard by shard and writes each when its rows are done."""

    def __init__(self, folder: Path, num_processes: int, process_index: int, shard: int, images_per_record: int,
                 components=None, cache_dtype: torch.dtype = torch.float32, encode_batch_size: int = 8):
        self.folder, self.num_processes, self.process_index = folder, num_processes, process_index
        self.shard, self.k, self.components = shard, images_per_record, components
        self.dtype, self.encode_batch_size = cache_dtype, encode_batch_size
        self.images_encoded = 0
        self.start_shard()

    def start_shard(self) -> None:
        self.rows: list[dict] = []
        self.refs: list[list] = []
        self.prompts: dict[str, str] = {}
        self.report = SkipReport()
        self.latents: list[torch.Tensor] = []
        self.sizes: list[torch.Tensor] = []
        self.pending: list[torch.Tensor] = []  # pixels waiting for the VAE: (K, F, 3, H, W) each
        self.next_slot = 0

    def add(self, item: Checked) -> None:
        self.report.kept += 1
        for record, pixels, sizes in item.payload:
            if len(record.images) != self.k:
                raise DataError(f"record {record.index} has {len(record.images)} images where every record of this "
                                f"data needs {self.k}")
            key = prompt_hash(record.prompt)
            self.prompts[str(key)] = record.prompt
            self.rows.append({"seq": item.seq, "index": record.index, "prompt": key, "labels": record.labels,
                              "scores": record.scores, "tie": record.tie,
                              "slots": list(range(self.next_slot, self.next_slot + self.k))})
            self.refs.append([image_ref(image) for image in record.images])
            self.next_slot += self.k
            if pixels is not None:
                self.pending.append(pixels)
                if sizes is not None:
                    self.sizes.append(sizes)
        if sum(len(p) for p in self.pending) >= self.encode_batch_size:
            self.encode_pending()

    def skip(self, reason: str, index: int, detail: str) -> None:
        self.report.add(reason, f"record {index}: {reason}: {detail}")

    def encode_pending(self) -> None:
        if not self.pending:
            return
        family = self.components.family
        pixels = torch.cat(self.pending)  # (n, F, 3, H, W)
        n, flips = pixels.shape[:2]
        for start in range(0, n * flips, self.encode_batch_size * flips):
            batch = pixels.flatten(0, 1)[start : start + self.encode_batch_size * flips]
            latents = family.encode_images(self.components, batch).to("cpu", self.dtype)
            self.latents.append(latents.view(-1, flips, *latents.shape[1:]))
        self.images_encoded += n
        self.pending = []

    def flush(self) -> None:
        """Write the current shard (possibly empty) and start the next."""
        self.encode_pending()
        count = len(self.rows)
        nan = float("nan")
        tensors = {
            "seq": torch.tensor([row["seq"] for row in self.rows], dtype=torch.int64),
            "source_index": torch.tensor([row["index"] for row in self.rows], dtype=torch.int64),
            "prompt_hash": torch.tensor([row["prompt"] for row in self.rows], dtype=torch.int64),
            "image_slot": torch.tensor([row["slots"] for row in self.rows], dtype=torch.int32).view(count, self.k),
            "labels": torch.tensor([row["labels"] or [nan] * self.k for row in self.rows],
                                   dtype=torch.float32).view(count, self.k),
            "scores": torch.tensor([row["scores"] or [nan] * self.k for row in self.rows],
                                   dtype=torch.float32).view(count, self.k),
            "tie": torch.tensor([row["tie"] for row in self.rows], dtype=torch.uint8),
        }
        if self.latents:
            tensors["latents"] = torch.cat(self.latents)
            self.latents.clear()  # one copy held while the shard is written, not two
        if self.sizes:
            tensors["image_size"] = torch.cat(self.sizes)
        metadata = {"prompts": self.prompts, "refs": self.refs, "report": self.report.as_dict()}
        write_shard(self.folder / shard_name("images", self.num_processes, self.process_index, self.shard),
                    tensors, metadata)
        self.shard += 1
        self.start_shard()


def share_rows(rows_read: int, num_processes: int, process_index: int) -> int:
    """How many of the first ``rows_read`` rows belong to this process's share."""
    return max(0, math.ceil((rows_read - process_index) / num_processes))
