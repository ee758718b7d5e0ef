"""Which timesteps a step trains on, and how much each one counts.

- Sampling: uniform over the schedule, or over ``train.timesteps.interval = [t_lo, t_hi)`` only (one LoRA per
  segment for timestep-segment alignment: high-noise steps shape layout, low-noise steps shape detail).
- Weighting: per-sample weights w(t) that multiply the policy *and* reference errors before the objective. For
  SFT that is the usual weighted MSE; for the DPO family it acts as a per-timestep beta, the knob "Rethinking
  DPO in Diffusion Models" (arXiv 2505.18736) turns because reward scale is unbalanced across timesteps.
  ``min_snr`` is Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon targets,
  min(SNR, gamma) / (SNR + 1) for v-prediction, min(SNR, gamma) for sample prediction.
"""

from __future__ import annotations

import torch


def sample_discrete_timesteps(num_train_timesteps: int, count: int, generator: torch.Generator,
                              interval: list[int] | None) -> torch.Tensor:
    low, high = (0, num_train_timesteps) if interval is None else (int(interval[0]), int(interval[1]))
    if high > num_train_timesteps:
        raise ValueError(f"train.timesteps.interval={interval} exceeds the schedule's {num_train_timesteps} timesteps")
    return torch.randint(low, high, (count,), generator=generator)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def table_weights(timesteps: torch.Tensor, table: list[list[float]]) -> torch.Tensor:
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
