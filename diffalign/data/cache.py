"""Where the feature cache lives and what identifies a model in it (the build itself: ``diffalign.data.build``).

Layout under ``data.cache_dir`` (default ``$DIFFALIGN_CACHE/features``)::

    <model fingerprint>/<build key>/index.safetensors                          the finished build's records
    <model fingerprint>/<build key>/images-<P>p-<process>-<shard>.safetensors  latents (n, orientations, C, h, w)
    <model fingerprint>/<build key>/text-<P>p-<process>-<shard>.safetensors    prompt conditioning (m, ...)
    records/<build key>/...                                                     data.cache=false: records only

Images are encoded upright (EXIF orientation applied, ``diffalign.images.load_image``); for families that
condition on image sizes (SDXL) the shards also hold each image's (orig_h, orig_w, crop_top, crop_left).

The model fingerprint covers the checkpoint id or folder (with its weight files' sizes and times), revision,
variant and family; the build key covers the data (``diffalign.data.build``). Every file is written to a
temporary name and renamed, so a killed run never leaves a half-written one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

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


