"""Which timesteps a step trains on, and how much each one counts: noise-schedule math the families share.

- Sampling: uniform over the schedule, or over ``train.timesteps.interval = [t_lo, t_hi)`` only (one LoRA per
  segment for timestep-segment alignment: high-noise steps shape layout, low-noise steps shape detail).
  Flow-matching models default to the logit-normal density of SD3 (Esser et al. 2024, sec. 3.1): the noise level
  u in (0, 1) has logit(u) ~ N(m, s^2), which concentrates training on the middle of the trajectory. With an
  interval, the density is truncated to it (inverse-CDF sampling, so no draw is wasted).
- Weighting: per-sample weights w(t) that multiply the policy *and* reference errors before the objective. For
  SFT that is the usual weighted MSE; for the DPO family it acts as a per-timestep beta, the knob "Rethinking
  DPO in Diffusion Models" (arXiv 2505.18736) turns because reward scale is unbalanced across timesteps.
  ``min_snr`` is Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon targets,
  min(SNR, gamma) / (SNR + 1) for v-prediction, min(SNR, gamma) for sample prediction.
"""

from __future__ import annotations

import torch

from diffalign.errors import ConfigError


def interval_bounds(num_train_timesteps: int, interval) -> tuple[int, int]:
    """[t_lo, t_hi) of ``train.timesteps.interval`` (the whole schedule when None), refused past its end."""
    low, high = (0, num_train_timesteps) if interval is None else (int(interval[0]), int(interval[1]))
    if high > num_train_timesteps:
        raise ConfigError(f"train.timesteps.interval={interval} exceeds the schedule's {num_train_timesteps} timesteps")
    return low, high


def sample_discrete_timesteps(num_train_timesteps: int, count: int, generator: torch.Generator,
                              interval: list[int] | None) -> torch.Tensor:
    """(count,) integer timesteps drawn uniformly from [t_lo, t_hi) (``randint``, as diffusers' scripts draw)."""
    low, high = interval_bounds(num_train_timesteps, interval)
    return torch.randint(low, high, (count,), generator=generator)


def resolve_density(timestep_cfg, family_default: str) -> str:
    """``train.timesteps.sampling`` with ``auto`` replaced by the family's default density."""
    sampling = timestep_cfg.sampling if timestep_cfg is not None else "auto"
    return family_default if sampling == "auto" else sampling


def sample_unit_levels(count: int, generator: torch.Generator, density: str, low: float = 0.0, high: float = 1.0,
                       mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """``count`` noise levels u in [low, high) (float64): uniform, or logit-normal (logit(u) ~ N(mean, std^2))
    truncated to [low, high) by drawing its CDF uniformly between the bounds' CDF values."""
    p = torch.rand(count, generator=generator, dtype=torch.float64)
    if density == "uniform":
        return low + (high - low) * p
    if density != "logit_normal":
        raise ConfigError(f"unknown timestep density {density!r}; use uniform or logit_normal")
    normal = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64))
    bounds = torch.logit(torch.tensor([low, high], dtype=torch.float64))  # logit(0) = -inf, logit(1) = inf
    cdf_low, cdf_high = normal.cdf(bounds)
    return torch.sigmoid(normal.icdf(cdf_low + (cdf_high - cdf_low) * p))


def sample_ddpm_timesteps(num_train_timesteps: int, count: int, generator: torch.Generator, timestep_cfg,
                          density: str) -> torch.Tensor:
    """Integer timesteps for DDPM-schedule families: uniform (``randint``, as diffusers' scripts draw them) or a
    density over u = t / T, floored onto the grid."""
    interval = timestep_cfg.interval if timestep_cfg is not None else None
    if density == "uniform":
        return sample_discrete_timesteps(num_train_timesteps, count, generator, interval)
    low, high = interval_bounds(num_train_timesteps, interval)
    u = sample_unit_levels(count, generator, density, low / num_train_timesteps, high / num_train_timesteps,
                           timestep_cfg.logit_mean, timestep_cfg.logit_std)
    return torch.floor(u * num_train_timesteps).long().clamp(low, high - 1)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023, arXiv 2303.09556) of ``snr`` (N,) for the prediction type."""
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def table_weights(timesteps: torch.Tensor, table: list[list[float]]) -> torch.Tensor:
    """(N,) float32 weights: ``weight`` where t lies in [low, high) of a ``[low, high, weight]`` row, 1 elsewhere."""
    weights = torch.ones(timesteps.shape, dtype=torch.float32)
    t = timesteps.float().cpu()
    for low, high, weight in table:
        weights[(t >= low) & (t < high)] = float(weight)
    return weights


def timestep_weights(timesteps: torch.Tensor, snr: torch.Tensor | None, cfg, prediction_type: str) -> torch.Tensor | None:
    """(N,) weights for ``timesteps`` under ``train.timesteps``; None means all ones (no work to do)."""
    if cfg.weighting == "none":
        return None
    if cfg.weighting == "min_snr":
        return min_snr_weights(snr.float().cpu(), cfg.min_snr_gamma, prediction_type)
    return table_weights(timesteps, cfg.weight_table)
