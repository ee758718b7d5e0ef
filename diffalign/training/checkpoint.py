"""Checkpoints that are never half-written: save to a hidden temporary folder, then rename.

``checkpoint-N/`` holds accelerate's state (optimizer, lr scheduler, RNG states), the LoRA in the diffusers
format (so a checkpoint loads with ``pipe.load_lora_weights``) and ``training_state.json`` (step and counters).
Resume picks the highest complete ``checkpoint-N``; temporary folders are ignored and cleaned up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from diffalign.training.lora import load_lora_state, peft_state_dict, save_lora
from diffalign.training.reference import unwrap

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """``latest`` -> newest complete checkpoint (None when there is none yet); a path -> that folder."""
    if not resume:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"train.resume={resume} is not a complete checkpoint folder (no {STATE_FILE})")
    return path


def save_checkpoint(accelerator, output_dir: Path, step: int, state: dict, total_limit: int | None) -> Path:
    """All processes call this. accelerate writes into a temporary folder, the main process renames it."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: Path, total_limit: int | None) -> None:
    for stale in output_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if total_limit is None:
        return
    checkpoints = list_checkpoints(output_dir)
    for _, path in checkpoints[: max(0, len(checkpoints) - total_limit)]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(accelerator, path: Path) -> dict:
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


def register_lora_checkpoint_hooks(accelerator, family):
    """Checkpoints store only the LoRA (not the multi-GB base weights), in the diffusers format."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:  # hooks run on every process; one writer is enough
            for model in models:
                save_lora(family, unwrap(model), output_dir)
                save_file(peft_state_dict(unwrap(model)), str(Path(output_dir) / "lora_state.safetensors"))
        weights.clear()

    def load_hook(models, input_dir):
        state = load_file(str(Path(input_dir) / "lora_state.safetensors"))
        while models:
            load_lora_state(unwrap(models.pop()), state)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
