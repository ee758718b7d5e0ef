"""Checkpoints that are never half-written, never pickled and never non-finite.

``checkpoint-N/`` holds, all safetensors or JSON (``training.state_io``):

- the LoRA in the diffusers format (``pytorch_lora_weights.safetensors``, so a checkpoint loads with
  ``pipe.load_lora_weights``) and in peft's key names (``lora_state.safetensors``), or for a full fine-tune the
  whole denoiser (``denoiser.safetensors``);
- the optimizer, lr scheduler and (fp16) grad scaler states; each process's RNG states;
- an EMA reference's weights (``ema_reference.safetensors``);
- ``training_state.json``: step, counters and ``"finite": true``.

Save writes into a hidden temporary folder and renames it. It refuses state holding inf or NaN (weights,
optimizer moments, EMA), so every checkpoint on disk is finite, and rotation (``checkpoints_total_limit``) only
ever deletes the oldest. Resume picks the newest complete checkpoint, refuses a folder holding pickled files,
and checks what it loaded is finite.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import DistributedType
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from diffalign.errors import ConfigError, TrainingStopped
from diffalign.training.lora import load_lora_state, peft_state_dict, save_lora
from diffalign.training.reference import unwrap
from diffalign.training.state_io import load_state, nonfinite_tensors, pickled_files, save_state

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
LORA_STATE_FILE = "lora_state.safetensors"
MODEL_STATE_FILE = "denoiser.safetensors"
EMA_STATE_FILE = "ema_reference.safetensors"


@dataclass
class TrainingParts:
    """What a checkpoint saves and restores: the (prepared) denoiser, optimizer, lr scheduler and reference."""

    model: torch.nn.Module
    optimizer: Any
    lr_scheduler: Any
    reference: Any  # a strategy from training.reference, or None
    family: Any
    lora: bool

    def trainable(self) -> dict[str, torch.Tensor]:
        return {name: param for name, param in unwrap(self.model).named_parameters() if param.requires_grad}

    def reference_state(self) -> dict[str, torch.Tensor] | None:
        return self.reference.state_dict() if hasattr(self.reference, "state_dict") else None

    def nonfinite(self) -> list[str]:
        """Where this state holds inf or NaN: trained weights, optimizer state and EMA weights."""
        return (nonfinite_tensors(self.trainable(), "weights") + nonfinite_tensors(self.optimizer.state_dict()["state"],
                "optimizer") + nonfinite_tensors(self.reference_state() or {}, "ema_reference"))


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete ``checkpoint-N`` folders (those with a state file), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def is_finite_checkpoint(path: Path) -> bool:
    """Whether the checkpoint was saved finite (its state file says so; checked when it was written)."""
    try:
        return json.loads((path / STATE_FILE).read_text()).get("finite") is True
    except (OSError, ValueError):
        return False


def stored_nonfinite(path: Path) -> list[str]:
    """The tensors stored in ``path`` that hold inf or NaN, read one at a time (memory: one tensor)."""
    found = []
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    tensor = handle.get_tensor(key)
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        found.append(f"{file.name}:{key}")
        except Exception as error:  # safetensors raises its own error type for a damaged header
            found.append(f"{file.name} (unreadable: {type(error).__name__})")
    return found


def resolve_resume(output_dir: str | Path, resume: str | None, notes: list[str] | None = None) -> Path | None:
    """``latest`` -> the newest checkpoint that is complete, was saved finite and whose stored tensors are finite
    (None when there is none yet); a path (absolute, or relative to the working folder or ``output_dir``) ->
    that folder. Checkpoints passed over are described in ``notes``."""
    notes = notes if notes is not None else []
    output_dir = Path(output_dir)
    if not resume:
        return None
    if resume == "latest":
        complete = {path for _, path in list_checkpoints(output_dir)}
        folders = sorted((int(m.group(1)), child) for child in (output_dir.iterdir() if output_dir.is_dir() else [])
                         if (m := CHECKPOINT_PATTERN.match(child.name)) and child.is_dir())
        for _, path in reversed(folders):
            if path not in complete:
                notes.append(f"{path} is incomplete (no {STATE_FILE}): passed over")
            elif not is_finite_checkpoint(path):
                notes.append(f"{path} was not saved finite: passed over")
            elif problems := stored_nonfinite(path):
                notes.append(f"{path} holds non-finite or unreadable tensors ({', '.join(problems[:2])}): passed over")
            else:
                return path
        notes.append(f"train.resume=latest: no usable checkpoint in {output_dir} yet; starting at step 0")
        return None
    path = Path(resume)
    if not path.exists() and (output_dir / resume).exists():
        path = output_dir / resume
    if not path.is_dir():
        raise ConfigError(f"train.resume={resume} does not exist; give a checkpoint-N folder or train.resume=latest")
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"train.resume={resume} is not a complete checkpoint folder (no {STATE_FILE})")
    return path


def save_checkpoint(accelerator, output_dir: Path, step: int, state: dict, total_limit: int | None,
                    parts: TrainingParts) -> Path:
    """All processes call this. Each writes its RNG state into a temporary folder, the main process the rest,
    then renames the folder and prunes old checkpoints. Raises ``TrainingStopped`` (writing nothing) when the
    state holds inf or NaN."""
    problems = parts.nonfinite()
    if accelerator.reduce(torch.tensor(float(len(problems)), device=accelerator.device), reduction="sum").item():
        raise TrainingStopped(f"step {step}: the training state holds non-finite values ({', '.join(problems[:3]) or 'on another process'}); "
                              f"checkpoint-{step} was not written. {kept_checkpoint_note(output_dir)}")
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    sharded = sharded_optimizer(accelerator)
    if accelerator.is_main_process:
        model = unwrap(parts.model)
        if parts.lora:
            save_lora(parts.family, model, tmp)
            save_file(peft_state_dict(model), str(tmp / LORA_STATE_FILE))
        else:
            save_model(model, str(tmp / MODEL_STATE_FILE))
        if not sharded:
            save_state(parts.optimizer.state_dict(), tmp, "optimizer")
        save_state(parts.lr_scheduler.state_dict(), tmp, "lr_scheduler")
        if accelerator.scaler is not None:
            save_state(accelerator.scaler.state_dict(), tmp, "grad_scaler")
        reference_state = parts.reference_state()
        if reference_state is not None:
            save_file({k: v.contiguous() for k, v in reference_state.items()}, str(tmp / EMA_STATE_FILE))
    if sharded:  # FSDP / DeepSpeed: each process holds its own part of the optimizer state
        save_state(parts.optimizer.state_dict(), tmp, f"optimizer_{accelerator.process_index}")
    save_state(rng_state(), tmp, f"rng_state_{accelerator.process_index}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({**state, "finite": True}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def kept_checkpoint_note(output_dir: Path) -> str:
    """Which checkpoint a stopped run leaves to resume from, in words."""
    finite = [path for _, path in list_checkpoints(output_dir) if is_finite_checkpoint(path)]
    if not finite:
        return f"No checkpoint was written to {output_dir} before this point."
    return f"The newest finite checkpoint, {finite[-1]}, is kept: train.resume=latest continues from it."


def prune_checkpoints(output_dir: Path, total_limit: int | None) -> None:
    """Remove temporary folders and the oldest checkpoints beyond ``total_limit``; the newest finite one stays
    whatever the limit."""
    for stale in output_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if total_limit is None:
        return
    checkpoints = [path for _, path in list_checkpoints(output_dir)]
    finite = [path for path in checkpoints if is_finite_checkpoint(path)]
    for path in checkpoints[: max(0, len(checkpoints) - total_limit)]:
        if not finite or path != finite[-1]:
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(accelerator, path: Path, parts: TrainingParts, run: dict | None = None) -> dict:
    """Restore ``parts`` and the RNG states from ``path``; returns its ``training_state.json``.

    ``run`` holds the settings the saved state depends on (``run_settings``); a checkpoint saved with others
    is refused. Raises ``ConfigError`` when the settings differ, the folder holds pickled files (nothing pickled
    is ever loaded), a file is missing or damaged, or the state is not finite."""
    state = json.loads((path / STATE_FILE).read_text())
    for key, value in (run or {}).items():
        saved = state.get("run", {}).get(key, value)
        if saved != value:
            raise ConfigError(f"train.resume: {path} was trained with {key}={saved!r}, this config has {key}={value!r}; "
                              "resume with the checkpoint's settings, or start afresh in a new train.output_dir")
    pickles = pickled_files(path)
    if pickles:
        names = ", ".join(str(p.relative_to(path)) for p in pickles[:3])
        raise ConfigError(f"train.resume: {path} holds pickled files ({names}). diffalign never unpickles training "
                          "state (a crafted pickle runs code when loaded); resume from a checkpoint written by this "
                          "version (safetensors and JSON only), or remove train.resume to start afresh")
    try:
        load_parts(accelerator, path, parts)
    except ConfigError:
        raise
    except Exception as error:  # a missing file (OSError), a missing key, a damaged safetensors header, ...
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"train.resume: {path} is damaged or incomplete ({type(error).__name__}: {first}); "
                          f"resume from an earlier checkpoint, or start afresh") from error
    problems = parts.nonfinite()
    if problems:
        raise ConfigError(f"train.resume: {path} holds non-finite values ({', '.join(problems[:3])}); resume from "
                          "an earlier checkpoint (train.resume=latest passes over such checkpoints)")
    return state


def load_parts(accelerator, path: Path, parts: TrainingParts) -> None:
    model = unwrap(parts.model)
    if parts.lora:
        load_lora_state(model, load_file(str(path / LORA_STATE_FILE)))
    else:
        load_model(model, str(path / MODEL_STATE_FILE), device=str(next(model.parameters()).device))
    name = f"optimizer_{accelerator.process_index}" if sharded_optimizer(accelerator) else "optimizer"
    parts.optimizer.load_state_dict(load_state(path, name))
    parts.lr_scheduler.load_state_dict(load_state(path, "lr_scheduler"))
    if accelerator.scaler is not None and (path / "grad_scaler.json").is_file():
        accelerator.scaler.load_state_dict(load_state(path, "grad_scaler"))
    if hasattr(parts.reference, "load_state_dict"):
        parts.reference.load_state_dict(load_file(str(path / EMA_STATE_FILE)))
    set_rng_state(load_state(path, f"rng_state_{accelerator.process_index}"))


def run_settings(cfg, reference: str) -> dict:
    """The settings a checkpoint's tensors depend on: a resume with other values would load them wrongly (a LoRA
    of another rank or alpha, another base model, a reference state that is not there)."""
    settings = {"model.pretrained": cfg.model.pretrained, "model.revision": cfg.model.revision,
                "model.variant": cfg.model.variant, "model.vae": cfg.model.vae, "lora.enabled": cfg.lora.enabled,
                "objective.reference": reference}
    if cfg.lora.enabled:
        settings.update({"lora.rank": cfg.lora.rank, "lora.alpha": cfg.lora.alpha,
                         "lora.target_modules": cfg.lora.target_modules})
    return settings


def sharded_optimizer(accelerator) -> bool:
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def rng_state() -> dict:
    """Python, numpy and torch (CPU and CUDA) RNG states, as tensors and plain data."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), position, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
