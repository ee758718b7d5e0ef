"""Timestep segments: which LoRA is active in which interval of the denoising trajectory.

A segments file (``segments.yaml``, written by segment training and read by ``load_pipeline(segments=...)`` and
``diffalign sample --segments``)::

    segments:
      - lora: runs/segments/early        # run folder or .safetensors file; relative to the yaml file
        interval: [500, 1000]            # [t_lo, t_hi) in the scheduler's training timesteps
        scale: 1.0
      - lora: runs/segments/late
        interval: [0, 500]

Outside every interval the base model runs. Intervals are in the family's training timesteps: 0..999 on SD's
DDPM schedule, and t = 1000 sigma for flow-matching models (SD3, FLUX), so [500, 1000) is sigma in [0.5, 1]: an
interval that reaches the top of the schedule also holds t = 1000, the pure-noise first step of flow samplers.
FluxPipeline passes sigma itself to its transformer; the router multiplies it by the family's
``pipeline_timestep_scale`` (1000) first, so one segments file means the same on every family.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from diffalign.config_io import parse_yaml
from diffalign.errors import ConfigError
from diffalign.text import read_text

SCHEDULE_TOP = 1000  # num_train_timesteps of every supported family: t = 1000 is sigma = 1 in flow matching


@dataclass
class Segment:
    lora: str
    interval: tuple[float, float]
    scale: float = 1.0

    def contains(self, t: float) -> bool:
        low, high = self.interval
        return low <= t < high or (t == high >= SCHEDULE_TOP)


def parse_segments(spec, base_dir: Path | None = None) -> list[Segment]:
    """Segments from a yaml path, a list of dicts, or a list of ``(lora, (t_lo, t_hi))`` tuples; validated.

    Relative LoRA paths are taken relative to ``base_dir`` (for a yaml file: its folder). Raises ``ConfigError``
    for a missing file, a malformed entry, an empty interval or overlapping intervals.
    """
    if isinstance(spec, str | Path):
        path = Path(spec)
        if path.is_dir():
            path = path / "segments.yaml"
        if not path.is_file():
            raise ConfigError(f"segments file {spec} not found; expected a segments.yaml (see diffalign sample --help)")
        raw = parse_yaml(read_text(path), str(path)) or {}  # the config's YAML reading: 5e3, errors with line
        entries = raw.get("segments") if isinstance(raw, dict) else raw
        base_dir = path.parent
    else:
        entries = spec
    if not isinstance(entries, list) or not entries:
        raise ConfigError("segments must be a non-empty list of {lora, interval, scale} entries")
    segments = [read_segment(number, entry, base_dir) for number, entry in enumerate(entries)]
    ordered = sorted(segments, key=lambda s: s.interval[0])
    for left, right in zip(ordered, ordered[1:]):
        if left.interval[1] > right.interval[0]:
            raise ConfigError(f"segments overlap: {left.lora} {list(left.interval)} and {right.lora} {list(right.interval)}; "
                              "at most one segment may be active at any timestep")
    return segments


def read_segment(number: int, entry, base_dir: Path | None) -> Segment:
    """One entry (a ``{lora, interval, scale}`` dict or a ``(lora, (t_lo, t_hi)[, scale])`` tuple) -> a Segment."""
    if isinstance(entry, dict):
        unknown = set(entry) - {"lora", "interval", "scale"}
        if unknown or "lora" not in entry or "interval" not in entry:
            raise ConfigError(f"segment {number}: expected keys lora, interval (and optional scale), got {sorted(entry)}")
        lora, interval, scale = entry["lora"], entry["interval"], entry.get("scale", 1.0)
    elif isinstance(entry, list | tuple) and len(entry) in (2, 3):
        lora, interval, *rest = entry
        scale = rest[0] if rest else 1.0
    else:
        raise ConfigError(f"segment {number}: expected a {{lora, interval, scale}} entry, got {entry!r}")
    try:
        low, high = (float(value) for value in interval)
        scale = float(scale)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"segment {number} ({lora}): interval {interval!r} and scale {scale!r} must be numbers, "
                          "the interval as [t_lo, t_hi]") from error
    if not low < high:
        raise ConfigError(f"segment {number} ({lora}): interval {list(interval)} is empty; it must be [t_lo, t_hi) with t_lo < t_hi")
    lora_path = Path(lora)
    if base_dir is not None and not lora_path.is_absolute():
        lora_path = base_dir / lora_path
    return Segment(str(lora_path), (low, high), scale)


def write_segments(path: Path, segments: list[Segment]) -> Path:
    """Write a segments.yaml, with LoRA paths relative to its folder when they lie under it."""
    entries = []
    for segment in segments:
        lora = Path(segment.lora)
        try:
            lora = lora.resolve().relative_to(path.parent.resolve())
        except ValueError:
            pass
        entries.append({"lora": str(lora), "interval": [segment.interval[0], segment.interval[1]], "scale": segment.scale})
    path.write_text(yaml.safe_dump({"segments": entries}, sort_keys=False))
    return path
