"""Shard files of the record index and feature cache: safetensors files written atomically, read lazily.

Why safetensors shards and not Arrow through ``datasets``: the cache holds tensors in the run's dtype (bfloat16
included, which Arrow lacks), a training step reads a few rows of them (``safe_open(...).get_slice`` reads just
those bytes of the memory-mapped file, with no conversion to Python objects), each process writes its own shards
with no shared writer, and a shard renamed into place is a finished unit of work, which is what makes a build
killed with -9 resumable. It is also the one format diffalign writes everywhere else (LoRA weights, checkpoints).
Text that goes with a shard (prompts, where images came from, skip counts) is JSON in its header ``metadata``.

The helpers that move small arrays between processes (``all_gather_rows``, ``gather_json``) go through
``torch.distributed`` as tensors, so nothing is pickled.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# Open handles kept per process. A handle is a memory map, and the pages a process has read through it count in its
# RSS until it closes: 16 handles of 64 MB shards bound that at 1 GB per process and DataLoader worker. Training
# reads a million-row cache (thousands of shards) at random, so a larger pool would rarely be hit anyway.
MAX_OPEN_SHARDS = 16


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write ``tensors`` and JSON ``metadata`` to ``path`` under a temporary name, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(tmp),
              metadata={name: json.dumps(value) for name, value in metadata.items()})
    os.chmod(tmp, 0o666 & ~current_umask())  # as any new file: a cache_dir may be shared between users
    os.replace(tmp, path)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_metadata(path: Path) -> dict[str, Any]:
    """A shard's JSON metadata (its header only)."""
    with safe_open(str(path), framework="pt") as handle:
        return {name: json.loads(value) for name, value in (handle.metadata() or {}).items()}


def read_tensors(path: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Whole tensors of a shard (the small per-record ones)."""
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in (names or handle.keys())}


class ShardReader:
    """Reads rows of many shard files, keeping at most ``MAX_OPEN_SHARDS`` open; safe to use in DataLoader
    workers (handles opened by another process are not reused)."""

    def __init__(self, folder: Path, names: list[str]):
        self.folder, self.names = folder, names
        self.handles: OrderedDict[int, Any] = OrderedDict()
        self.pid = os.getpid()

    def handle(self, shard: int):
        if self.pid != os.getpid():  # a forked worker: open its own
            self.handles, self.pid = OrderedDict(), os.getpid()
        if shard in self.handles:
            self.handles.move_to_end(shard)
            return self.handles[shard]
        handle = safe_open(str(self.folder / self.names[shard]), framework="pt")
        self.handles[shard] = handle
        if len(self.handles) > MAX_OPEN_SHARDS:
            self.handles.popitem(last=False)
        return handle

    def row(self, shard: int, name: str, index: int) -> torch.Tensor:
        return self.handle(shard).get_slice(name)[index]

    def metadata(self, shard: int) -> dict[str, str]:
        return self.handle(shard).metadata() or {}

    def __getstate__(self):  # a spawned worker opens its own handles
        return {"folder": self.folder, "names": self.names}

    def __setstate__(self, state):
        self.__init__(state["folder"], state["names"])


# ------------------------------------------------------------------------------------------ between processes
def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def all_gather_rows(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every process's ``tensor`` (any first dimension, same trailing shape and dtype), in process order."""
    if not _distributed():
        return [tensor]
    device = torch.device("cuda", torch.cuda.current_device()) \
        if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    world = torch.distributed.get_world_size()
    size = torch.tensor([tensor.shape[0]], device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor.to(device)
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded)
    return [part[: int(s.item())].cpu() for part, s in zip(gathered, sizes)]


def gather_json(value: Any) -> list[Any]:
    """Every process's JSON-able ``value``, in process order (as UTF-8 bytes through ``all_gather_rows``)."""
    encoded = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
    return [json.loads(part.numpy().tobytes().decode()) for part in all_gather_rows(encoded)]


def barrier() -> None:
    if _distributed():
        torch.distributed.barrier()
