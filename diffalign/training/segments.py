"""Timestep-segment training (AlignHuman, arXiv 2506.11144): one LoRA per timestep interval, each on its own data.

High-noise timesteps shape layout and motion, low-noise ones fidelity and detail, so each interval gets its own
LoRA trained only on timesteps inside it. The run writes ``segments.yaml``, which
``load_pipeline(segments=...)`` and ``diffalign sample --segments`` read directly, switching LoRAs while
denoising. The split points are parameters (the paper does not state them).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from accelerate import PartialState

from diffalign.config import Config, DataConfig, save_config
from diffalign.config_io import dataclass_from_dict, deep_merge
from diffalign.guidance.segments import Segment, write_segments
from diffalign.training.trainer import TrainResult, train


def segment_config(cfg: Config, index: int) -> Config:
    """The plain single-LoRA config that trains segment ``index``."""
    segment = cfg.segments[index]
    single = copy.deepcopy(cfg)
    single.segments = []
    single.train.timesteps.interval = list(segment.interval)
    single.data = dataclass_from_dict(DataConfig, deep_merge(dataclasses.asdict(cfg.data), segment.data),
                                      f"segments[{index}].data")
    name = segment.name or f"segment-{index}"
    single.train.output_dir = str(Path(cfg.train.output_dir) / name)
    return single


def train_segments(cfg: Config) -> list[TrainResult]:
    """Train every segment in turn and write ``<output_dir>/segments.yaml``; returns the per-segment results."""
    results = [train(segment_config(cfg, index)) for index in range(len(cfg.segments))]
    output_dir = Path(cfg.train.output_dir)
    if PartialState().is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
        write_segments(output_dir / "segments.yaml", [
            Segment(str(result.output_dir), tuple(segment.interval), segment.scale)
            for segment, result in zip(cfg.segments, results)
        ])
    return results
