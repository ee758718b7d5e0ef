"""The ``online`` config section: what each round of online RL samples, how it is scored, what is trained.

A round samples ``group_size`` images for each of ``prompts_per_round`` prompts (the whole round over all
processes: process p holds images p n .. (p + 1) n - 1 of the prompt-major round, n = P G / processes), scores them,
computes advantages over the gathered round, then trains ``inner_epochs`` passes over its samples in micro-batches
of ``train.batch_size`` images (the sampling batch too, so the first pass recomputes exactly what was sampled).
Each micro-batch trains one step per sample; the ``trained_steps`` steps of a sample accumulate into one gradient
with ``train.gradient_accumulation_steps`` micro-batches, so a round makes
``inner_epochs * (n / train.batch_size) / train.gradient_accumulation_steps`` optimizer steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from diffalign.errors import ConfigError


@dataclass
class OnlineConfig:
    prompts: str = "shapes"  # any prompt set or file `diffalign eval` reads (diffalign list prompts)
    prompts_per_round: int = 8  # P, over all processes
    group_size: int = 4  # G images per prompt
    sample_steps: int = 10  # sampling steps of training rounds (evaluation may use more)
    guidance_scale: float = 4.5  # CFG of training rounds; 1.0 = CFG-free (one branch); FLUX.1-dev: the embedded value
    negative_prompt: str = ""  # the unconditional branch's prompt under CFG
    eta: float = 1.0  # DDIM noise of the stochastic steps (SD1.x/2.x, SDXL)
    noise_level: float = 0.7  # the Flow-GRPO SDE's noise level a (SD3)
    sde_window: list[int] | None = None  # [start, end): the stochastic (trained) steps; null = all
    train_fraction: float = 1.0  # share of a sample's stochastic steps trained, drawn at random per sample
    inner_epochs: int = 1  # passes over each round's samples
    rewards: Any = field(default_factory=lambda: {"clip": 1.0})  # {name: weight} summed; a name or list: weight 1
    reward_weights: dict[str, str] = field(default_factory=dict)  # name -> local weights file/folder
    monitor_rewards: list[str] = field(default_factory=list)  # scored and logged, never trained on
    max_prompts: int | None = None  # use the first N prompts of the set


def trained_steps(online: OnlineConfig) -> int:
    """Trained steps per sample: ``train_fraction`` of the stochastic window, at least 1."""
    start, end = online.sde_window if online.sde_window else (0, online.sample_steps)
    return max(1, math.floor(online.train_fraction * (end - start) + 1e-9))


def round_layout(online: OnlineConfig, batch_size: int, accumulation: int, processes: int) -> tuple[int, int, int]:
    """(images per process n, micro-batches per process and pass, optimizer steps per round); raises
    ``ConfigError`` with the sizes to change when they do not divide."""
    total = online.prompts_per_round * online.group_size
    if total % processes:
        raise ConfigError(f"online.prompts_per_round x online.group_size = {total} images per round do not split over "
                          f"{processes} processes; make it a multiple of {processes}")
    per_process = total // processes
    if per_process % batch_size:
        raise ConfigError(f"{per_process} images per process and round do not split into micro-batches of "
                          f"train.batch_size={batch_size}; choose a batch size that divides it")
    chunks = per_process // batch_size
    if (online.inner_epochs * chunks) % accumulation:
        raise ConfigError(f"a round has {online.inner_epochs * chunks} micro-batches per process (inner_epochs x "
                          f"{chunks}), which train.gradient_accumulation_steps={accumulation} does not divide")
    return per_process, chunks, online.inner_epochs * chunks // accumulation


def check_online(cfg, processes: int) -> list[str]:
    """Everything about an online run that can fail before the model loads: the round layout, the reward names and
    kinds, and the prompts (returned). Raises ``ConfigError``."""
    from diffalign.errors import closest
    from diffalign.evaluation.prompts import load_prompts  # the prompt sets: imported when a run starts
    from diffalign.rewards import REWARDS, is_pairwise

    check_round_layout(cfg, processes)
    online, objective = cfg.online, cfg.objective.name
    for where, names in (("online.rewards", list(online.rewards)), ("online.monitor_rewards", online.monitor_rewards)):
        for name in names:
            if name not in REWARDS:
                raise ConfigError(f"{where}: unknown reward '{name}'.{closest(name, REWARDS.names())} "
                                  "(diffalign list rewards)")
    pairwise = [name for name in online.rewards if is_pairwise(name)]
    if pairwise and objective != "pref_grpo":
        raise ConfigError(f"reward {pairwise[0]} is pairwise (it compares two images); objective {objective} needs "
                          "scalar rewards: use it with objective.name=pref_grpo")
    if pairwise and len(online.rewards) > 1:
        raise ConfigError(f"online.rewards: a pairwise reward ({pairwise[0]}) is used alone; it cannot be summed "
                          "with other rewards (log others with online.monitor_rewards)")
    for name in online.monitor_rewards:
        if is_pairwise(name):
            raise ConfigError(f"online.monitor_rewards: {name} is pairwise; monitors are scalar rewards")
    prompts = load_prompts(online.prompts, limit=online.max_prompts)
    if not prompts:
        raise ConfigError(f"online.prompts={online.prompts} holds no prompts")
    return prompts


def check_round_layout(cfg, processes: int) -> tuple[int, int, int]:
    """``round_layout`` for this run, and checkpoints on round boundaries; called as soon as the process count
    is known, before the model is loaded. Raises ``ConfigError``."""
    layout = round_layout(cfg.online, cfg.train.batch_size, cfg.train.gradient_accumulation_steps, processes)
    if cfg.train.checkpointing_steps % layout[2]:
        raise ConfigError(f"train.checkpointing_steps={cfg.train.checkpointing_steps} must be a multiple of the "
                          f"{layout[2]} optimizer steps of a round, so that a checkpoint never falls inside a round "
                          "(a resume samples the round again)")
    return layout


def validate_online(cfg, step: str) -> None:
    """Range checks of the ``online`` section for an objective with step procedure ``step``; ``online.rewards``
    given as a name or a list becomes {name: 1.0}. Sizes that depend on the process count, reward names and the
    prompts are checked at start (``check_online``)."""
    online = cfg.online
    if isinstance(online.rewards, str):
        online.rewards = {online.rewards: 1.0}
    elif isinstance(online.rewards, list) and all(isinstance(name, str) for name in online.rewards):
        online.rewards = {name: 1.0 for name in online.rewards}
    if not isinstance(online.rewards, dict):
        raise ConfigError(f"online.rewards is a mapping of reward name to weight, e.g. {{pickscore: 1.0}} (or a name, "
                          f"or a list of names), got {online.rewards!r}")
    if step == "grpo" and (online.eta <= 0 or online.noise_level <= 0):
        raise ConfigError("grpo and pref_grpo learn from the sampler's noise: online.eta (SD1.x/2.x, SDXL) and "
                          "online.noise_level (SD3) must be > 0; only nft trains from a deterministic sampler")
    for key in ("prompts_per_round", "sample_steps", "inner_epochs"):
        if getattr(online, key) < 1:
            raise ConfigError(f"online.{key} must be at least 1, got {getattr(online, key)}")
    if online.group_size < 2:
        raise ConfigError(f"online.group_size must be at least 2 (advantages compare the images of a group), got "
                          f"{online.group_size}")
    if online.guidance_scale < 1.0:
        raise ConfigError(f"online.guidance_scale must be at least 1.0 (1.0 = CFG-free), got {online.guidance_scale}")
    if online.eta < 0 or online.noise_level < 0:
        raise ConfigError("online.eta and online.noise_level must be >= 0")
    if not 0.0 < online.train_fraction <= 1.0:
        raise ConfigError(f"online.train_fraction must be in (0, 1], got {online.train_fraction}")
    if online.sde_window is not None:
        window = online.sde_window
        if len(window) != 2 or not 0 <= window[0] < window[1] <= online.sample_steps:
            raise ConfigError(f"online.sde_window must be [start, end) with 0 <= start < end <= online.sample_steps="
                              f"{online.sample_steps}, got {window}")
    if not online.rewards:
        raise ConfigError("online.rewards needs at least one reward, e.g. {clip: 1.0} (diffalign list rewards)")
    for name, weight in online.rewards.items():
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ConfigError(f"online.rewards.{name} must be a finite number (its weight), got {weight!r}")
    if online.max_prompts is not None and online.max_prompts < 1:
        raise ConfigError(f"online.max_prompts must be at least 1, got {online.max_prompts}")
