"""Training state on disk without pickle: tensors in safetensors, everything else in JSON.

Optimizer, lr-scheduler, grad-scaler and RNG states are nested dicts, lists and tuples of tensors, numbers,
strings and None. ``save_state`` writes such a structure as ``<name>.safetensors`` (every tensor, keyed by its
path in the structure) plus ``<name>.json`` (the structure, each tensor replaced by ``{"__tensor__": key}``,
tuples by ``{"__tuple__": [...]}``, and dicts with non-string keys by ``{"__dict__": [[key, value], ...]}``).
``load_state`` rebuilds it exactly. Anything else (a function, a class instance) cannot be stored this way and
raises ``TypeError`` at save time, naming where it sits, rather than being pickled.

accelerate's ``save_state`` pickles the optimizer, scheduler, RNG states and registered objects
(``optimizer.bin``, ``random_states_0.pkl``, ``custom_checkpoint_0.pkl``) and loads them with ``torch.load``,
some with the weights-only guard off: a crafted file in a checkpoint folder would run code on resume. So diffalign
writes its checkpoints itself, and ``PICKLE_SUFFIXES`` in a checkpoint folder are refused on resume.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt")


def split_tensors(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON-able data, with its tensors moved into ``tensors`` (keyed by ``path``)."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().to("cpu").contiguous()
        return {"__tensor__": path}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}  # JSON has no inf / nan
    if isinstance(value, tuple):
        return {"__tuple__": [split_tensors(item, f"{path}.{i}", tensors) for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [split_tensors(item, f"{path}.{i}", tensors) for i, item in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {key: split_tensors(item, f"{path}.{key}", tensors) for key, item in value.items()}
        return {"__dict__": [[split_tensors(key, f"{path}.key{i}", tensors), split_tensors(item, f"{path}.{i}", tensors)]
                             for i, (key, item) in enumerate(value.items())]}
    raise TypeError(f"cannot store {type(value).__name__} at '{path}' without pickle; training state must be "
                    "tensors, numbers, strings, None, lists, tuples and dicts")


def join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [join_tensors(item, tensors) for item in value]
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if set(value) == {"__tuple__"}:
            return tuple(join_tensors(item, tensors) for item in value["__tuple__"])
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        if set(value) == {"__dict__"}:
            return {join_tensors(key, tensors): join_tensors(item, tensors) for key, item in value["__dict__"]}
        return {key: join_tensors(item, tensors) for key, item in value.items()}
    return value


def save_state(state: Any, directory: Path, name: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = split_tensors(state, name, tensors)
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(structure))


def load_state(directory: Path, name: str) -> Any:
    tensor_file = directory / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.is_file() else {}
    return join_tensors(json.loads((directory / f"{name}.json").read_text()), tensors)


def iter_tensors(value: Any, path: str = ""):
    """(path, tensor) for every tensor nested in ``value``, where it lives (no copy)."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from iter_tensors(item, f"{path}.{i}")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from iter_tensors(item, f"{path}.{key}")


def nonfinite_tensors(state: Any, path: str = "") -> list[str]:
    """Paths of the floating-point tensors in ``state`` that hold inf or NaN (checked on their own device)."""
    return [key for key, tensor in iter_tensors(state, path)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def pickled_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*") if path.suffix.lower() in PICKLE_SUFFIXES)
