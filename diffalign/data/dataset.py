"""What the trainer reads: datasets over a record index (or a list of records) and the per-micro-step batches.

Items are addressed as ``(record position, epoch)``. Each record is flipped or not as a whole, a pure function of
(seed, epoch, record): both images of a pair are mirrored together, as the SDXL reference scripts do, so a pair
is never "this image over its own mirror", and an interrupted run resumes to exactly the same batches.
``MicroStepBatches`` is the DataLoader's batch sampler: micro-step m of a run is batch m of a sequence of seeded
per-epoch permutations, so a run resumed at step m continues with the batches it would have had.
"""

from __future__ import annotations

import random

import torch

from diffalign.data.index import RecordIndex
from diffalign.data.records import PreferenceRecord, open_image


def flip_choice(seed: int, epoch: int, position: int) -> bool:
    """Whether record ``position`` is mirrored in ``epoch``: a fair coin drawn from (seed, epoch, position)."""
    return random.Random((seed * 1_000_003 + epoch) * 1_000_003 + position).random() < 0.5


class RecordDataset(torch.utils.data.Dataset):
    """Shared part: how many records, how many images of each are used, and the per-(epoch, record) flips."""

    def __init__(self, size: int, images_per_record: int | None, seed: int, random_flip: bool):
        self.size, self.images_per_record = size, images_per_record
        self.seed, self.random_flip = seed, random_flip

    def __len__(self) -> int:
        return self.size

    def flipped(self, epoch: int, position: int) -> bool:
        return self.random_flip and flip_choice(self.seed, epoch, position)


class IndexedDataset(RecordDataset):
    """Records of a ``RecordIndex``: cached latents (K, C, h, w) and conditioning, or, for an index without a
    cache, decoded pixels (K, 3, H, W) and the prompt (``family`` and ``resolution`` needed)."""

    def __init__(self, index: RecordIndex, images_per_record: int | None, seed: int, random_flip: bool,
                 family=None, resolution: int | None = None):
        super().__init__(len(index), images_per_record, seed, random_flip)
        self.index, self.family, self.resolution = index, family, resolution

    def __getitem__(self, item: tuple[int, int]) -> dict:
        position, epoch = item
        flipped, count, index = self.flipped(epoch, position), self.images_per_record, self.index
        if not index.cached:
            return pixel_item(index.record(position), self.family, self.resolution, count, flipped)
        out = {"latents": index.latents(position, flipped, count), "cond": index.cond(position),
               "index": int(index.records["source_index"][position])}
        if index.image_sizes:  # (K, 4): each image's original size and crop, for SDXL's time ids
            out["image_sizes"] = index.sizes(position, count)
        return out | index.targets(position, count)


class RawPreferenceDataset(RecordDataset):
    """Decoded pixels (K, 3, H, W) and the prompt of records held in a list (small data, tests)."""

    def __init__(self, records: list[PreferenceRecord], family, resolution: int, images_per_record: int | None,
                 seed: int, random_flip: bool):
        super().__init__(len(records), images_per_record, seed, random_flip)
        self.records, self.family, self.resolution = records, family, resolution

    def __getitem__(self, item: tuple[int, int]) -> dict:
        position, epoch = item
        return pixel_item(self.records[position], self.family, self.resolution, self.images_per_record,
                          self.flipped(epoch, position))


def pixel_item(record: PreferenceRecord, family, resolution: int, count: int | None, flipped: bool,
               images: list | None = None) -> dict:
    """One record's first ``count`` images preprocessed (decoded here unless ``images`` holds them decoded), its
    prompt and targets: what the trainer encodes itself when there is no cache."""
    images = images[:count] if images is not None else [open_image(source) for source in record.images[:count]]
    pixels = [family.preprocess_image(image, resolution, flipped) for image in images]
    item = {"pixels": torch.stack(pixels), "prompt": record.prompt, "index": record.index}
    if family.needs_image_sizes:  # (K, 4): each image's original size and crop, for SDXL's time ids
        item["image_sizes"] = torch.tensor([family.image_size(image, resolution) for image in images])
    for name in ("labels", "scores"):  # per image (KTO, SmPO, RankDPO), for the images actually used
        values = getattr(record, name)
        if values is not None:
            item[name] = torch.tensor(values[:count], dtype=torch.float32)
    return item


def collate(items: list[dict]) -> dict:
    batch = {"index": torch.tensor([item["index"] for item in items])}
    if "latents" in items[0]:
        batch["latents"] = torch.stack([item["latents"] for item in items])
        batch["cond"] = {key: torch.stack([item["cond"][key] for item in items]) for key in items[0]["cond"]}
    else:
        batch["pixels"] = torch.stack([item["pixels"] for item in items])
        batch["prompts"] = [item["prompt"] for item in items]
    for name in ("labels", "scores", "image_sizes"):  # image_sizes: (B, K, 4), families with needs_image_sizes
        if all(name in item for item in items):
            batch[name] = torch.stack([item[name] for item in items])
    return batch


def epoch_batches(num_records: int, batch_size: int, num_processes: int, process_index: int, epoch: int,
                  seed: int) -> list[list[tuple[int, int]]]:
    """This process's batches for one epoch: a seeded permutation shared by all processes, each taking its own
    slice of every global batch. The incomplete last global batch is dropped so all processes take equal steps."""
    order = torch.randperm(num_records, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    per_step = batch_size * num_processes
    batches = []
    for step in range(num_records // per_step):
        start = step * per_step + process_index * batch_size
        batches.append([(position, epoch) for position in order[start : start + batch_size]])
    return batches


class MicroStepBatches:
    """A DataLoader batch sampler over micro-steps ``start, start + 1, ...`` (without end): micro-step m is batch
    m mod (batches per epoch) of epoch m // (batches per epoch) (``epoch_batches``)."""

    def __init__(self, num_records: int, batch_size: int, num_processes: int, process_index: int, seed: int,
                 start: int = 0):
        self.args = (num_records, batch_size, num_processes, process_index)
        self.seed, self.start = seed, start
        self.per_epoch = num_records // (batch_size * num_processes)

    def __iter__(self):
        micro_step, loaded, batches = self.start, None, []
        while True:
            epoch, position = divmod(micro_step, self.per_epoch)
            if epoch != loaded:
                batches, loaded = epoch_batches(*self.args, epoch=epoch, seed=self.seed), epoch
            yield batches[position]
            micro_step += 1
