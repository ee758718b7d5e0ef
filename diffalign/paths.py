"""Where diffalign keeps things: the cache root, atomic folder builds, and the data shipped inside the package.

The bottom layer: imports nothing from diffalign. Shipped files are read through ``importlib.resources``, so
they are found in a wheel install as well as in a source checkout.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path


def cache_root() -> Path:
    """``$DIFFALIGN_CACHE``, else ``~/.cache/diffalign``: tiny models, the toy base, feature caches."""
    return Path(os.environ.get("DIFFALIGN_CACHE", Path.home() / ".cache" / "diffalign"))


def shipped(*parts: str) -> Traversable:
    """A file or folder shipped in ``diffalign/assets`` (e.g. ``shipped("prompts", "toy.txt")``)."""
    node = resources.files("diffalign") / "assets"
    for part in parts:
        node = node / part
    return node


def build_atomically(target: Path, build: Callable[[Path], object]) -> Path:
    """Run ``build(tmp_dir)`` and rename the result into place, so a killed or racing build never leaves a
    half-written folder at ``target`` (two processes may race; the loser's copy is discarded)."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
