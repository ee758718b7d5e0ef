"""The record index and feature cache of a training run: one pass over the data, on every process, as shards.

    >>> from diffalign.config import load_config
    >>> from diffalign.families import load_components
    >>> from diffalign.offline import resolve_data_spec
    >>> cfg = load_config("configs/tiny_dpo.yaml")
    >>> source = resolve_data_spec(cfg.data.source)                      # tiny:pairs, built offline
    >>> index = build_index(cfg.data, cfg.model, "pair", load_components(cfg.model), source)  # doctest: +ELLIPSIS
    data: ...
    data: kept 64 records, skipped 0
    >>> len(index), index.images_per_record, index.cached
    (64, 2, True)

Phases, each split across the processes of the run (process p owns rows p, p + P, ... of the source):

1. **Check** (``prescan``): every process reads its share's labels, scores and prompts (no pixels), so what the
   objective needs is checked and the cache's size is known before any image is decoded. The counts are summed
   across processes; the disk the cache will need is printed, and a disk without it stops the run.
2. **Images** (``encode_share``): each process decodes its share's images in DataLoader workers, once, encodes
   them with the VAE and writes a shard every ``shard_rows`` rows of its share, each with its records, prompts
   and skip counts. A process killed here resumes after its last finished shard.
3. **Prompts** (``encode_prompts``): the distinct prompts, split by their hash across processes, are encoded once
   and written to text shards.
4. **Index**: the main process joins the shards' records in source order (small: about 60 bytes a record) into
   ``index.safetensors`` with the summed skip report. Its presence marks a finished build.

Without ``components`` (``data.cache=false``) the same pass checks every image and writes the index alone: the
records then point at their images in the source, decoded again at each step.

A build lives in ``<data.cache_dir>/<model fingerprint>/<build key>`` (``records/<build key>`` without a cache).
The key covers the source (its files' paths, sizes and modification times, or the hub id and the ``datasets``
fingerprint), the data settings that change which records are kept and how they are encoded, and the objective's
data kind, so a second run on the same model and data starts training at once. Images named by path (jsonl,
HPDv2 folders) are keyed by their metadata file: after replacing images in place, delete the build folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from array import array
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffalign.config import DataConfig
from diffalign.data.cache import default_cache_dir, model_fingerprint
from diffalign.data.decoding import checked_records, worker_count
from diffalign.data.encode import PrepareImages, ShardWriter, prompt_hash, shard_name, share_rows
from diffalign.data.index import INDEX_FILE, RecordIndex, write_index
from diffalign.data.kinds import KindAdapter
from diffalign.data.readers import open_rows
from diffalign.data.shards import all_gather_rows, barrier, gather_json, read_metadata, write_shard
from diffalign.data.tables import TABLE_KEYS, parquet_files
from diffalign.data.validation import check_row
from diffalign.errors import DataError
from diffalign.logs import get_logger

logger = get_logger(__name__)

BUILD_VERSION = 1
SHARD_BYTES = 64 * 2**20  # a shard's latents, held by its process until written (twice, while written); 64 MB
# keeps that small beside the model, and a million-row SDXL cache at a few thousand shards
RECORD_BYTES = 64  # index and shard bytes per record besides its latents


def build_index(data_cfg: DataConfig, model_cfg, data_kind: str, components=None, source: str | None = None,
                process_index: int = 0, num_processes: int = 1, show_progress: bool = True) -> RecordIndex:
    """Check, adapt and (with ``components``) encode every record of the data once, or reuse a finished build.

    Args:
        data_cfg, model_cfg: the ``data`` and ``model`` sections.
        data_kind: the objective's ``data_kind`` (``diffalign.data.kinds``).
        components: the loaded model, for the feature cache; None for an index of checked records only.
        source: ``data.source`` resolved (a ``tiny:`` spec turned into a folder); default ``data_cfg.source``.
        process_index, num_processes: this process and how many share the work (every one must call this).

    Returns:
        The opened ``RecordIndex``, the same on every process.

    Raises:
        DataError: data that cannot give what ``data_kind`` needs, a bad record under ``data.strict=true``,
        too little disk for the cache. ConfigError: an unknown ``data.format``.
    """
    source = str(data_cfg.source if source is None else source)
    if process_index:  # the main process opens (downloads, converts) the source first; the others reuse it
        barrier()
    stream = open_rows(data_cfg, source)
    if not process_index:
        barrier()
    folder = build_folder(data_cfg, model_cfg, data_kind, components, source)
    if (folder / INDEX_FILE).is_file():
        index = RecordIndex(folder)
        logger.info(f"data: reusing the {'feature cache' if index.cached else 'record index'} at {folder} "
                    f"({len(index)} records)\n{index.report.summary()}")
        return index
    share, checking = (process_index, num_processes), time.perf_counter()
    adapter, counts = prescan(stream, data_cfg, data_kind, source, share, show_progress)
    check_seconds = time.perf_counter() - checking
    shard_rows, text_rows, need = plan(data_cfg, components, counts, folder)
    barrier()
    if process_index == 0:
        remove_other_builds(folder, num_processes)
    barrier()
    started = time.perf_counter()
    encode_share(data_cfg, data_kind, components, source, folder, share, shard_rows, adapter_k(adapter, counts),
                 show_progress)
    barrier()
    if components is not None:
        encode_prompts(data_cfg, components, folder, share, text_rows, show_progress)
    barrier()
    if process_index == 0:
        stats = {"check_seconds": round(check_seconds, 3), "encode_seconds": round(time.perf_counter() - started, 3),
                 "estimated_bytes": need}
        write_index(folder, num_processes, data_cfg.max_samples, stats)
    barrier()
    index = RecordIndex(folder)
    logger.info(index.report.summary())
    return index


def build_folder(data_cfg: DataConfig, model_cfg, data_kind: str, components, source: str) -> Path:
    root = Path(data_cfg.cache_dir) if data_cfg.cache_dir else default_cache_dir()
    settings = {
        "version": BUILD_VERSION, "source": source_identity(source, data_cfg), "format": data_cfg.format,
        "split": data_cfg.split, "drop_ties": data_cfg.drop_ties, "max_samples": data_cfg.max_samples,
        "max_image_pixels": data_cfg.max_image_pixels, "data_kind": data_kind,
        "shard_rows": data_cfg.cache_shard_rows,
    }
    if components is None:
        return root / "records" / hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:16]
    settings |= {"resolution": components.resolution, "dtype": data_cfg.cache_dtype,
                 "flips": 2 if data_cfg.random_flip else 1, "image_sizes": components.family.needs_image_sizes}
    fingerprint = model_fingerprint(model_cfg, components.pretrained, components.family.name)
    return root / fingerprint / hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:16]


def source_identity(source: str, data_cfg: DataConfig) -> list:
    """What the source is: its files with sizes and modification times, or a hub id with its fingerprint."""
    path = Path(source).expanduser()
    files = parquet_files(source) if path.suffix == ".parquet" or path.is_dir() and not any(
        (path / name).is_file() for name in ("metadata.jsonl", "train.json", "test.json")) else None
    if files is None and path.is_dir():
        files = [str(file) for file in sorted(path.glob("*.json*")) if file.is_file()]
    elif files is None and path.is_file():
        files = [str(path)]
    if files is None:  # a hub dataset: the fingerprint datasets gave the loaded table
        return [source, data_cfg.split, TABLE_KEYS.get(source)]
    return [[str(Path(file).resolve()), Path(file).stat().st_size, Path(file).stat().st_mtime_ns] for file in files]


# ---------------------------------------------------------------------------------------------- 1. check
def prescan(stream, cfg: DataConfig, data_kind: str, source: str, share: tuple[int, int],
            show_progress: bool) -> tuple[KindAdapter, dict]:
    """Labels, scores and prompts of this process's share (no pixels), summed over processes; the data-kind
    checks run here, so a mismatch stops the run before any decoding."""
    process_index, num_processes = share
    adapter = KindAdapter(data_kind, source)
    hashes, kept, images, records, counts_k = array("q"), 0, 0, 0, {}
    rows = tqdm(stream.rows, total=stream.total, desc="checking records", disable=not show_progress or None,
                leave=False)
    for seq, row in enumerate(rows):
        stream.skips.drain()  # skips are counted (or raised, under data.strict) by the cache pass, in row order
        if seq % num_processes == process_index and (cfg.max_samples is None or kept < cfg.max_samples):
            record = check_row(row, cfg, stream.skips)
            stream.skips.drain()
            if record is not None:
                kept += 1
                adapter.observe(record)
                if adapter.accepts(record):
                    for new in adapter.adapt(record):
                        records += 1
                        images += len(new.images)
                        counts_k[len(new.images)] = counts_k.get(len(new.images), 0) + 1
                        hashes.append(prompt_hash(new.prompt))
    unique = torch.unique(torch.frombuffer(hashes, dtype=torch.int64)) if hashes else torch.zeros(0, dtype=torch.int64)
    mine = {"shapes": dict(adapter.shapes), "stats": dict(adapter.stats), "sizes": dict(adapter.sizes),
            "kept": kept, "records": records, "images": images, "k": counts_k}
    everyone = gather_json(mine)
    for other in everyone[:process_index] + everyone[process_index + 1:]:
        adapter.shapes.update(other["shapes"])
        adapter.stats.update(other["stats"])
        adapter.sizes.update({int(k): n for k, n in other["sizes"].items()})
    adapter.check_shapes()
    counts = {name: sum(other[name] for other in everyone) for name in ("kept", "records", "images")}
    counts["k"] = sorted({int(k) for other in everyone for k in other["k"]})
    counts["prompts"] = len(torch.unique(torch.cat(all_gather_rows(unique))))
    adapter.finish(counts["kept"], counts["records"])
    return adapter, counts


def adapter_k(adapter: KindAdapter, counts: dict) -> int:
    """The one image count every adapted record has (``KindAdapter.finish`` refused mixed counts)."""
    if len(counts["k"]) > 1:
        raise DataError(f"records of {counts['k']} images: every record of one run needs the same number")
    return counts["k"][0] if counts["k"] else 1


def plan(cfg: DataConfig, components, counts: dict, folder: Path) -> tuple[int, int, int]:
    """Rows per image shard and prompts per text shard (about ``SHARD_BYTES`` each: what a process holds before
    writing), and the bytes the build will need: printed, and checked against the free disk."""
    flips = 2 if cfg.random_flip else 1
    dtype_bytes = torch.empty(0, dtype=getattr(torch, cfg.cache_dtype)).element_size()
    image_bytes = prompt_bytes = 0
    if components is not None:
        vae = components.vae.config
        side = components.resolution // 2 ** (len(vae.block_out_channels) - 1)
        image_bytes = flips * vae.latent_channels * side * side * dtype_bytes
        cond = components.family.encode_prompts(components, [""])
        prompt_bytes = sum(tensor[0].numel() for tensor in cond.values()) * dtype_bytes
    per_row = max(image_bytes * max(counts["k"] or [1]), 1)
    shard_rows = cfg.cache_shard_rows or max(64, min(8192, SHARD_BYTES // per_row))
    text_rows = cfg.cache_shard_rows or max(64, min(8192, SHARD_BYTES // max(prompt_bytes, 1)))
    need = counts["images"] * image_bytes + counts["prompts"] * prompt_bytes + counts["records"] * RECORD_BYTES
    done = sum(file.stat().st_size for file in folder.glob("*.safetensors")) if folder.is_dir() else 0
    anchor = next(parent for parent in [folder, *folder.parents] if parent.exists())
    free = shutil.disk_usage(anchor).free
    if components is not None:
        what = (f"{counts['records']} records to cache: {counts['images']} images x {flips} orientation"
                f"{'s' if flips > 1 else ''} x {image_bytes // flips} bytes + {counts['prompts']} distinct prompts x "
                f"{prompt_bytes} bytes")
    else:
        what = f"{counts['records']} records to index (data.cache=false: no latents)"
    logger.info(f"data: {what} = {gib(need)} at {folder} ({gib(done)} already written, {gib(free)} free)")
    if need - done > free:
        raise DataError(f"the feature cache needs {gib(need - done)} more at {folder}, but only {gib(free)} is free: "
                        f"free some space, point data.cache_dir at a larger disk, or shrink the cache "
                        f"(data.cache_dtype=float16 halves it; data.random_flip=false halves the latents)")
    return shard_rows, text_rows, need


def gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**27 else f"{count / 2**20:.1f} MiB"


def remove_other_builds(folder: Path, num_processes: int) -> None:
    """Shards of an unfinished build with another process count cannot be resumed, and half-written files of a
    killed one are of no use: remove them."""
    for file in folder.glob("*-*p-*"):
        if not file.name.split("-")[1] == f"{num_processes}p":
            file.unlink()
    for file in folder.glob(".*.tmp"):
        file.unlink()


# ---------------------------------------------------------------------------------------------- 2. images
def encode_share(cfg: DataConfig, data_kind: str, components, source: str, folder: Path, share: tuple[int, int],
                 shard_rows: int, images_per_record: int, show_progress: bool) -> None:
    """Decode, check, adapt and encode this process's share, resuming after its finished shards."""
    process_index, num_processes = share
    done = folder / f"done-{num_processes}p-{process_index:03d}.json"
    if not done.is_file():
        first = 0
        while (folder / shard_name("images", num_processes, process_index, first)).is_file():
            first += 1
        flips = 2 if cfg.random_flip else 1
        family = components.family if components is not None else None
        prepare = PrepareImages(data_kind, source, family, getattr(components, "resolution", 0), flips)
        writer = ShardWriter(folder, num_processes, process_index, first, images_per_record, components,
                             getattr(torch, cfg.cache_dtype), cfg.encode_batch_size)
        stream = open_rows(cfg, source)
        workers = worker_count(cfg.num_workers, stream.total, num_processes)
        progress = tqdm(desc="caching latents" if components is not None else "checking images",
                        total=None if stream.total is None else share_rows(stream.total, *share[::-1]),
                        initial=first * shard_rows, disable=not show_progress or None, unit="rows")
        kept = sum(read_metadata(folder / shard_name("images", num_processes, process_index, shard))["report"]["kept"]
                   for shard in range(first))  # a resumed build: what its finished shards kept
        for item in checked_records(stream, cfg, None, num_workers=workers, process_index=process_index,
                                    num_processes=num_processes, start=first * shard_rows, prepare=prepare,
                                    prefetch=2, yield_skips=True):
            last = (share_rows(item.seq, num_processes, process_index) - 1) // shard_rows if item.end else \
                (item.seq // num_processes) // shard_rows
            while writer.shard < last + (1 if item.end else 0):
                writer.flush()
            if item.skip is not None:
                writer.skip(*item.skip)
                progress.update(item.seq % num_processes == process_index)
            elif item.record is not None:
                writer.add(item)
                progress.update(1)
                kept += 1
                if cfg.max_samples is not None and kept >= cfg.max_samples:  # enough from this share
                    writer.flush()
                    break
        progress.close()
        done.write_text(json.dumps({"shards": writer.shard, "images_encoded_by_this_run": writer.images_encoded}))


# ---------------------------------------------------------------------------------------------- 3. prompts
def encode_prompts(cfg: DataConfig, components, folder: Path, share: tuple[int, int], per_shard: int,
                   show_progress: bool) -> None:
    """Encode the distinct prompts whose hash falls to this process, once, into text shards."""
    process_index, num_processes = share
    owned: dict[int, str] = {}
    for file in sorted(folder.glob(f"images-{num_processes}p-*.safetensors")):
        for key, text in read_metadata(file)["prompts"].items():
            if int(key) % num_processes == process_index:
                owned[int(key)] = text
    keys = sorted(owned)
    dtype = getattr(torch, cfg.cache_dtype)
    family = components.family
    with tqdm(total=len(keys), desc="caching prompts", disable=not show_progress or None, leave=False) as bar:
        for number, start in enumerate(range(0, len(keys), per_shard)):
            path = folder / shard_name("text", num_processes, process_index, number)
            chunk = keys[start : start + per_shard]
            if not path.is_file():
                parts: dict[str, list[torch.Tensor]] = {}
                for batch in range(0, len(chunk), cfg.encode_batch_size):
                    prompts = [owned[key] for key in chunk[batch : batch + cfg.encode_batch_size]]
                    for name, tensor in family.encode_prompts(components, prompts).items():
                        parts.setdefault(name, []).append(tensor.to("cpu", dtype))
                tensors = {name: torch.cat(values) for name, values in parts.items()}
                parts.clear()  # one copy held while the shard is written, not two
                write_shard(path, tensors | {"prompt_hash": torch.tensor(chunk, dtype=torch.int64)}, {})
            bar.update(len(chunk))
