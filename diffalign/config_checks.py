"""Validation of the config sections with cross-field rules (timesteps, segments); called by ``Config.validate``."""

from __future__ import annotations

import dataclasses

from diffalign.config import (
    Config,
    ConfigError,
    DataConfig,
    TimestepConfig,
    check_choice,
    dataclass_from_dict,
    deep_merge,
)


def validate_segments(cfg: Config) -> None:
    if not cfg.segments:
        return
    from diffalign.guidance.segments import parse_segments

    try:
        parse_segments([(segment.name or f"segment {i}", segment.interval) for i, segment in enumerate(cfg.segments)])
    except ValueError as error:
        raise ConfigError(f"segments: {error}") from error
    if cfg.train.timesteps.interval is not None:
        raise ConfigError("train.timesteps.interval is set per segment by segments[].interval; remove it")
    names = [segment.name for segment in cfg.segments if segment.name]
    if len(names) != len(set(names)):
        raise ConfigError(f"segments: names must be unique, got {names}")
    for i, segment in enumerate(cfg.segments):
        dataclass_from_dict(DataConfig, deep_merge(dataclasses.asdict(cfg.data), segment.data), f"segments[{i}].data")


def validate_timesteps(ts: TimestepConfig) -> None:
    check_choice("train.timesteps.sampling", ts.sampling, ["auto", "uniform", "logit_normal"])
    if ts.logit_std <= 0:
        raise ConfigError(f"train.timesteps.logit_std must be positive, got {ts.logit_std}")
    check_choice("train.timesteps.weighting", ts.weighting, ["none", "min_snr", "table"])
    if ts.interval is not None:
        if len(ts.interval) != 2 or not 0 <= ts.interval[0] < ts.interval[1]:
            raise ConfigError(f"train.timesteps.interval must be [t_lo, t_hi) with 0 <= t_lo < t_hi, got {ts.interval}")
    if ts.weighting == "min_snr" and ts.min_snr_gamma <= 0:
        raise ConfigError(f"train.timesteps.min_snr_gamma must be positive, got {ts.min_snr_gamma}")
    if ts.weighting == "table":
        if not ts.weight_table:
            raise ConfigError("train.timesteps.weighting=table needs train.timesteps.weight_table: [[t_lo, t_hi, weight], ...]")
        spans = sorted((row[0], row[1]) for row in ts.weight_table if len(row) == 3)
        if len(spans) != len(ts.weight_table) or any(lo >= hi for lo, hi in spans):
            raise ConfigError(f"train.timesteps.weight_table rows must be [t_lo, t_hi, weight] with t_lo < t_hi, got {ts.weight_table}")
        if any(prev_hi > lo for (_, prev_hi), (lo, _) in zip(spans, spans[1:])):
            raise ConfigError(f"train.timesteps.weight_table intervals overlap: {ts.weight_table}")
    elif ts.weight_table:
        raise ConfigError("train.timesteps.weight_table is set but train.timesteps.weighting is not 'table'")
