"""What a finished run leaves in ``train.output_dir``: the weights, ``run_info.json``, the model card and the
final validation grid; and the ``TrainResult`` that ``train()`` returns."""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from diffalign.config import Config
from diffalign.data import SkipReport
from diffalign.data.shards import gather_json
from diffalign.training.lora import save_lora, trainable_checksum
from diffalign.training.model_card import write_model_card
from diffalign.training.reference import unwrap
from diffalign.training.validation import log_validation


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    skipped_steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    lora_path: Path | None = None  # LoRA runs: pytorch_lora_weights.safetensors; full fine-tunes: the unet/ folder
    grid_path: Path | None = None
    denoiser: torch.nn.Module | None = field(default=None, repr=False)  # the trained (unwrapped) model, for use in the same process


class RunClock:
    """Wall time of the run and the steady-state time per step (the first step, with its allocation and warm-up,
    left out)."""

    def __init__(self, global_step: int):
        self.started, self.first_step_done, self.first_step, self.loop_ended = time.time(), None, global_step, None

    def step_done(self, global_step: int) -> None:
        if self.first_step_done is None:
            self.first_step_done, self.first_step = time.time(), global_step

    def stop(self) -> None:
        self.loop_ended = time.time()

    def time_to_first_step(self) -> float | None:
        """Seconds from the start of this process to the end of the run's first optimizer step."""
        if self.first_step_done is None:
            return None
        return round(self.first_step_done - psutil.Process().create_time(), 2)

    def seconds_per_step(self, global_step: int) -> float | None:
        if not self.first_step_done or global_step <= self.first_step:
            return None
        return (self.loop_ended - self.first_step_done) / (global_step - self.first_step)


@dataclass
class LoopEnd:
    """Where the loop stopped."""

    global_step: int
    skipped_steps: int
    last_metrics: dict[str, float]
    clock: RunClock


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of its largest finished child (a DataLoader worker), in MiB."""
    scale = 1024 if sys.platform != "darwin" else 1024 * 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return {"self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, 1),
            "children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / scale, 1)}


def write_run_outputs(cfg: Config, accelerator, output_dir: Path, components, denoiser: torch.nn.Module,
                      report: SkipReport, end: LoopEnd, data_stats: dict | None = None,
                      online_stats: dict | None = None) -> TrainResult:
    """All processes call this after the loop (the trained weights already checked finite). The main process
    writes the LoRA (or the ``unet/`` / ``transformer/`` folder of a full fine-tune), the final validation grid
    when validation is on, ``run_info.json`` and the model card; then the trackers are closed."""
    family, model = components.family, unwrap(denoiser)
    checksums = gather_json(trainable_checksum(model))  # as JSON through tensors: gather_object would pickle
    peaks = gather_json(peak_rss_mb())
    result = TrainResult(output_dir, end.global_step, end.skipped_steps, end.last_metrics, denoiser=model)
    if accelerator.is_main_process:
        if cfg.lora.enabled:
            result.lora_path = save_lora(family, model, output_dir)
        else:
            result.lora_path = output_dir / family.denoiser_subfolder
            model.save_pretrained(str(result.lora_path))
        grid = output_dir / "samples" / f"step-{end.global_step}.png"
        if cfg.log.validation_every_n_steps and not grid.exists():
            log_validation(accelerator, components, model, cfg, end.global_step, output_dir)
        result.grid_path = grid if grid.exists() else None
        run_info = {
            "global_step": end.global_step,
            "skipped_steps": end.skipped_steps,
            "num_processes": accelerator.num_processes,
            "lora_checksums": list(checksums),
            "wall_time_s": round(time.time() - end.clock.started, 2),
            "seconds_per_step": end.clock.seconds_per_step(end.global_step),
            # from the process's start: loading the model and building the data included
            "time_to_first_step_s": end.clock.time_to_first_step(),
            "peak_rss_mb": [peak["self"] for peak in peaks],  # per process
            "peak_rss_mb_workers": [peak["children"] for peak in peaks],  # its largest finished DataLoader worker
            "data": {"kept": report.kept, "skipped": dict(report.skipped)},
            "data_build": data_stats or {},  # the check and cache pass: seconds, bytes, images per process
            **({"online": online_stats} if online_stats is not None else {}),  # rounds, first / last rewards
            "final_metrics": end.last_metrics,
        }
        (output_dir / "run_info.json").write_text(json.dumps(run_info, indent=2))
        write_model_card(cfg, output_dir, run_info, family, base_path=components.pretrained,
                         lora_targets=family.lora_targets(components.denoiser))
    accelerator.end_training()
    return result
