"""On-disk cache of VAE latents and text conditioning, computed once per image and prompt.

Layout under ``data.cache_dir`` (default ``$DIFFALIGN_CACHE/features``)::

    <model fingerprint>/text/ab/<sha1(prompt)>.safetensors                     conditioning tensors
    <model fingerprint>/latents-<res>px-centercrop-upright-<dtype>/cd/<sha1(image)>.safetensors   both flips

A latent file holds ``latents`` and ``latents_flipped``; for families that condition on image sizes (SDXL) also
``image_size`` = (orig_h, orig_w, crop_top, crop_left) of the crop it was encoded from. Images are encoded
upright (EXIF orientation applied, ``diffalign.images.load_image``), so sizes are the upright ones.

The model fingerprint covers the checkpoint id or folder (with its weight files' sizes and times), revision,
variant and family; the image key is the hash of the encoded image bytes. A second run, a second epoch or a
second process finds everything here. Files are written to a temporary name and renamed, so a killed run
never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffalign.data.records import ImageSource, PreferenceRecord, open_image
from diffalign.errors import DataError
from diffalign.paths import cache_root


def default_cache_dir() -> Path:
    return cache_root() / "features"


def model_fingerprint(model_cfg, resolved_path: str, family_name: str) -> str:
    parts = [family_name, resolved_path, str(model_cfg.revision), str(model_cfg.variant)]
    if getattr(model_cfg, "vae", None):  # only when set, so fingerprints of runs without it stay as they were
        parts.append(f"vae={model_cfg.vae}")
    local = Path(resolved_path)
    if local.is_dir():  # a folder can be rebuilt in place: include what its weights look like
        for file in sorted(local.rglob("*")):
            if file.is_file():
                stat = file.stat()
                parts += [str(file.relative_to(local)), str(stat.st_size), str(stat.st_mtime_ns)]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


def image_key(source: ImageSource) -> str:
    data = source if isinstance(source, bytes | bytearray) else Path(source).read_bytes()
    return hashlib.sha1(data).hexdigest()


def prompt_key(prompt: str) -> str:
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()


def atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


@dataclass
class FeatureCache:
    root: Path  # <cache_dir>/<model fingerprint>
    resolution: int
    dtype: torch.dtype
    image_sizes: bool = False  # latent files also hold each image's original size and crop (SDXL)

    @property
    def latent_dir(self) -> Path:
        # "-upright": images are decoded with their EXIF orientation applied since issue 12. Entries are keyed by
        # the image bytes, which did not change, so latents encoded sideways before would be silently reused;
        # the new folder name makes every image be encoded again, upright.
        dtype = str(self.dtype).removeprefix("torch.")
        return self.root / f"latents-{self.resolution}px-centercrop-upright-{dtype}"

    def latent_path(self, key: str) -> Path:
        return self.latent_dir / key[:2] / f"{key}.safetensors"

    def text_path(self, key: str) -> Path:
        return self.root / "text" / key[:2] / f"{key}.safetensors"

    def load_latents(self, key: str, flipped: bool) -> torch.Tensor:
        tensors = load_file(str(self.latent_path(key)))
        return tensors["latents_flipped" if flipped else "latents"].float()

    def load_image_size(self, key: str) -> torch.Tensor:
        """(orig_h, orig_w, crop_top, crop_left), int64; the same for both orientations (see Family.image_size)."""
        tensors = load_file(str(self.latent_path(key)))
        if "image_size" not in tensors:
            raise DataError(f"cached latents {self.latent_path(key)} lack the image size this model family needs; "
                             f"delete {self.latent_dir} to rebuild them")
        return tensors["image_size"]

    def load_text(self, key: str) -> dict[str, torch.Tensor]:
        return {name: tensor.float() for name, tensor in load_file(str(self.text_path(key))).items()}


@dataclass
class CachedRecord:
    """A record's handles into the cache: what the training dataset loads per step."""

    index: int
    prompt_key: str
    image_keys: list[str]
    labels: list[float] | None = None
    scores: list[float] | None = None


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def build_feature_cache(
    records: list[PreferenceRecord], components, data_cfg, model_cfg, show_progress: bool = True
) -> tuple[FeatureCache, list[CachedRecord]]:
    """Encode every image (both orientations) and prompt not yet in the cache; return the per-record keys."""
    family = components.family
    root = Path(data_cfg.cache_dir) if data_cfg.cache_dir else default_cache_dir()
    fingerprint = model_fingerprint(model_cfg, components.pretrained, family.name)
    cache = FeatureCache(root / fingerprint, components.resolution, getattr(torch, data_cfg.cache_dtype),
                         image_sizes=family.needs_image_sizes)

    cached_records, missing_images, missing_prompts = [], {}, {}
    for record in tqdm(records, desc="hashing images", disable=not show_progress or None, leave=False):
        keys = [image_key(source) for source in record.images]
        for key, source in zip(keys, record.images):
            if key not in missing_images and not cache.latent_path(key).exists():
                missing_images[key] = source
        p_key = prompt_key(record.prompt)
        if p_key not in missing_prompts and not cache.text_path(p_key).exists():
            missing_prompts[p_key] = record.prompt
        cached_records.append(CachedRecord(record.index, p_key, keys, record.labels, record.scores))

    batch_size = data_cfg.encode_batch_size
    progress = tqdm(
        total=len(missing_images) + len(missing_prompts), desc="caching latents and text embeddings",
        disable=not show_progress or None,
    )
    for chunk in _batches(list(missing_images.items()), batch_size):
        images = [open_image(source) for _, source in chunk]
        pixels = torch.stack(
            [family.preprocess_image(img, components.resolution, flip) for img in images for flip in (False, True)]
        )
        latents = family.encode_images(components, pixels).to("cpu", cache.dtype)
        for i, (key, _) in enumerate(chunk):
            entry = {"latents": latents[2 * i], "latents_flipped": latents[2 * i + 1]}
            if cache.image_sizes:
                entry["image_size"] = torch.tensor(family.image_size(images[i], components.resolution))
            atomic_save(entry, cache.latent_path(key))
        progress.update(len(chunk))
    for chunk in _batches(list(missing_prompts.items()), batch_size):
        cond = family.encode_prompts(components, [prompt for _, prompt in chunk])
        for i, (key, _) in enumerate(chunk):
            atomic_save({name: tensor[i].to("cpu", cache.dtype) for name, tensor in cond.items()}, cache.text_path(key))
        progress.update(len(chunk))
    progress.close()
    return cache, cached_records
