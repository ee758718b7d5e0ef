"""A finished build (``diffalign.data.build``): ``index.safetensors`` and the shards it points into.

The index holds one row per training record, in source order: where its images are (image shard and slots), its
prompt (text shard and slot, or the prompt's hash for an index without a cache), its labels, scores and tie flag
(NaN where absent), and its source position. Its header holds the shard names, the summed skip report and the
build's figures. ``RecordIndex`` reads any record's tensors from the memory-mapped shards, touching only those
bytes, so every process and DataLoader worker can serve any record without holding the data.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from diffalign.data.encode import source_of
from diffalign.data.records import PreferenceRecord, SkipReport
from diffalign.data.shards import ShardReader, read_metadata, read_tensors, write_shard
from diffalign.errors import DataError

INDEX_FILE = "index.safetensors"
RECORD_FIELDS = ("seq", "source_index", "prompt_hash", "image_slot", "labels", "scores", "tie")


def write_index(folder: Path, num_processes: int, max_samples: int | None, stats: dict) -> None:
    """Join every image shard's records in source order (the first ``max_samples`` kept source records) and the
    text shards' prompts into ``index.safetensors``, with the summed skip report."""
    image_shards = sorted(file.name for file in folder.glob(f"images-{num_processes}p-*.safetensors"))
    text_shards = sorted(file.name for file in folder.glob(f"text-{num_processes}p-*.safetensors"))
    parts, report, layout, per_process = [], SkipReport(), {"flips": 0, "image_sizes": False}, {}
    for number, name in enumerate(image_shards):
        tensors = read_tensors(folder / name, list(RECORD_FIELDS))
        tensors["image_shard"] = torch.full_like(tensors["seq"], number, dtype=torch.int32)
        parts.append(tensors)
        report.merge(SkipReport.from_dict(read_metadata(folder / name)["report"]))
        with safe_open(str(folder / name), framework="pt") as handle:  # the header only
            if "latents" in handle.keys():
                images = handle.get_slice("latents").get_shape()
                layout = {"flips": images[1], "image_sizes": "image_size" in handle.keys()}
                process = name.split("-")[2]  # images-<P>p-<process>-<shard>
                per_process[process] = per_process.get(process, 0) + images[0]
    records = {name: torch.cat([part[name] for part in parts]) for name in [*RECORD_FIELDS, "image_shard"]}
    order = torch.sort(records["seq"], stable=True).indices
    records = {name: tensor[order] for name, tensor in records.items()}
    if max_samples is not None:  # adapted records of one source record share its seq
        kept = torch.unique(records["seq"])[:max_samples]
        records = {name: tensor[torch.isin(records["seq"], kept)] for name, tensor in records.items()}
        report.kept = min(report.kept, max_samples)
    records["text_shard"] = torch.full_like(records["seq"], -1, dtype=torch.int32)
    records["text_slot"] = torch.full_like(records["seq"], -1, dtype=torch.int32)
    if text_shards:
        hashes = [read_tensors(folder / name, ["prompt_hash"])["prompt_hash"] for name in text_shards]
        all_hashes = torch.cat(hashes)
        shard_of = torch.cat([torch.full_like(h, n, dtype=torch.int32) for n, h in enumerate(hashes)])
        slot_of = torch.cat([torch.arange(len(h), dtype=torch.int32) for h in hashes])
        sorted_hashes, order = torch.sort(all_hashes)
        position = torch.searchsorted(sorted_hashes, records["prompt_hash"]).clamp(max=len(sorted_hashes) - 1)
        if not torch.equal(sorted_hashes[position], records["prompt_hash"]):
            raise DataError(f"the text shards in {folder} lack prompts of the index; delete the folder to rebuild it")
        records["text_shard"], records["text_slot"] = shard_of[order[position]], slot_of[order[position]]
    size = sum((folder / name).stat().st_size for name in image_shards + text_shards)
    metadata = {"image_shards": image_shards, "text_shards": text_shards, "report": report.as_dict(), **layout,
                "stats": stats | {"bytes": size, "records": len(records["seq"]),
                                  "images_per_process": [per_process.get(f"{rank:03d}", 0)
                                                         for rank in range(num_processes)]}}
    write_shard(folder / INDEX_FILE, records, metadata)


class RecordIndex:
    """An opened build: ``len(index)`` records, read by position.

    Attributes:
        cached: whether it holds latents and prompt embeddings (else records point into the source).
        images_per_record: K, the same for every record.
        flips: orientations stored per image (2 with ``data.random_flip``, else 1).
        report: the summed ``SkipReport`` of the build. stats: its figures (bytes, seconds, images per process).
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        metadata = read_metadata(self.folder / INDEX_FILE)
        self.report = SkipReport.from_dict(metadata["report"])
        self.stats = metadata["stats"]
        self.records = read_tensors(self.folder / INDEX_FILE)  # ~60 bytes a record
        self.images = ShardReader(self.folder, metadata["image_shards"])
        self.texts = ShardReader(self.folder, metadata["text_shards"])
        self.cached = bool(metadata["text_shards"]) or len(self) == 0
        self.images_per_record = int(self.records["image_slot"].shape[1]) if len(self) else 0
        self.has_labels = len(self) > 0 and not torch.isnan(self.records["labels"]).all().item()
        self.has_scores = len(self) > 0 and not torch.isnan(self.records["scores"]).all().item()
        self.flips, self.image_sizes = metadata["flips"], metadata["image_sizes"]
        self._shard_json: dict[tuple[int, str], object] = {}

    def __len__(self) -> int:
        return len(self.records["seq"])

    def latents(self, position: int, flipped: bool, count: int | None = None) -> torch.Tensor:
        """The record's first ``count`` images' latents in one orientation, (K, C, h, w) float32."""
        shard, slots = int(self.records["image_shard"][position]), self.records["image_slot"][position][:count]
        orientation = 1 if flipped and self.flips > 1 else 0
        return torch.stack([self.images.row(shard, "latents", int(slot))[orientation] for slot in slots]).float()

    def sizes(self, position: int, count: int | None = None) -> torch.Tensor:
        """(K, 4) int64: each image's (orig_h, orig_w, crop_top, crop_left) (families with image sizes)."""
        shard, slots = int(self.records["image_shard"][position]), self.records["image_slot"][position][:count]
        return torch.stack([self.images.row(shard, "image_size", int(slot)) for slot in slots])

    def cond(self, position: int) -> dict[str, torch.Tensor]:
        """The record's prompt conditioning, float32 tensors without a batch dimension."""
        shard, slot = int(self.records["text_shard"][position]), int(self.records["text_slot"][position])
        handle = self.texts.handle(shard)
        return {name: handle.get_slice(name)[slot].float() for name in handle.keys() if name != "prompt_hash"}

    def targets(self, position: int, count: int | None = None) -> dict[str, torch.Tensor]:
        """Labels and scores of the record's first ``count`` images, where the data has them."""
        out = {}
        for name, present in (("labels", self.has_labels), ("scores", self.has_scores)):
            if present:
                out[name] = self.records[name][position][:count].float()
        return out

    def record(self, position: int) -> PreferenceRecord:
        """The record with its prompt text and image sources (for an index without a cache)."""
        shard = int(self.records["image_shard"][position])
        refs, prompts = self.shard_json(shard, "refs"), self.shard_json(shard, "prompts")
        slot = int(self.records["image_slot"][position][0]) // self.images_per_record
        targets = self.targets(position)
        labels, scores = targets.get("labels"), targets.get("scores")
        return PreferenceRecord(
            index=int(self.records["source_index"][position]),
            prompt=prompts[str(int(self.records["prompt_hash"][position]))],
            images=[source_of(ref) for ref in refs[slot]],
            labels=None if labels is None else labels.tolist(), scores=None if scores is None else scores.tolist(),
            tie=bool(self.records["tie"][position]))

    def shard_json(self, shard: int, name: str):
        key = (shard, name)
        if key not in self._shard_json:
            if len(self._shard_json) > 16:  # a few shards' headers at a time
                self._shard_json.clear()
            self._shard_json[key] = json.loads(self.images.metadata(shard)[name])
        return self._shard_json[key]
