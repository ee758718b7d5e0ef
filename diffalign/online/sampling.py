"""Sampling with exact transition log-probabilities: the policy's actions for GRPO-style online RL.

Each sampling step from x_i (noise levels alpha_i, sigma_i) to x_{i+1} is a Gaussian with mean ``mu`` and
standard deviation ``s`` per element, so its log-probability is known exactly:

    log p(x_{i+1} | x_i) = mean over the C*h*w elements of  -(x_{i+1} - mu)^2 / (2 s^2) - log s - log sqrt(2 pi)

The mean over elements (not the sum) is what DDPO (kvablack/ddpo-pytorch, ``ddim_with_logprob.py``) and
Flow-GRPO (yifan123/flow_grpo, ``sd3_sde_with_logprob.py``) use, so their clip ranges (1e-4) carry over.

- DDPM-schedule families (SD1.x/2.x, SDXL): DDIM with eta > 0 (Song et al. 2020, eq. 12; DDPO, Black et al. 2023,
  arXiv 2305.13301). With x0_hat, eps_hat read from the prediction at (alpha_i, sigma_i):
      s  = eta * (sigma_{i+1} / sigma_i) * sqrt(1 - alpha_i^2 / alpha_{i+1}^2)
      mu = alpha_{i+1} x0_hat + sqrt(sigma_{i+1}^2 - s^2) eps_hat
- Flow matching (SD3): the Flow-GRPO SDE (Liu et al. 2025, arXiv 2505.05470, eq. 9), which has the marginals of
  the flow ODE. With t = sigma_i, dt = sigma_{i+1} - sigma_i < 0, velocity v = eps_hat - x0_hat and noise level a:
      sigma_t = a sqrt(t / (1 - t))     (at t = 1 the grid's second level stands in for the t of 1 - t, as there)
      mu = x + [v + sigma_t^2 / (2 t) (x + (1 - t) v)] dt,     s = sigma_t sqrt(-dt)

Steps outside ``SamplerSettings.window`` are deterministic (DDIM eta 0, the flow ODE's Euler step) and carry no
log-probability: only the window's steps are actions (Flow-GRPO-Fast, MixGRPO). Classifier-free guidance is
applied as the pipelines apply it, uncond + w (cond - uncond), in one batched call; w = 1 runs the conditional
branch alone (CFG-free).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffalign.errors import ConfigError

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class SamplingGrid:
    """The sampling schedule of S steps.

    timesteps: (S,) what the denoiser receives at step i (integers for DDPM schedules, T * sigma for flow).
    alpha, sigma: (S,) float32 noise levels of x_i, x_i = alpha_i x0 + sigma_i eps.
    alpha_next, sigma_next: (S,) the levels step i moves to. For flow matching and evenly spaced DDIM grids they
        are the next step's levels; diffusers' DDIM step moves to t - T / S whatever the grid's spacing, and so
        does this grid, so that a chain is the pipeline's chain.
    """

    timesteps: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    alpha_next: torch.Tensor
    sigma_next: torch.Tensor

    @property
    def steps(self) -> int:
        return len(self.timesteps)



@dataclass(frozen=True)
class SamplerSettings:
    """How rollouts are sampled.

    steps: S sampling steps. guidance_scale: CFG weight w (1 = CFG-free). eta: DDIM's noise (DDPM families).
    noise_level: the Flow-GRPO SDE's a (flow matching). window: [start, end) step indices that are stochastic,
    the trained actions; None = every step.
    """

    steps: int = 10
    guidance_scale: float = 4.5
    eta: float = 1.0
    noise_level: float = 0.7
    window: tuple[int, int] | None = None

    def stochastic(self) -> torch.Tensor:
        """(S,) bool: the steps that draw noise (and have a log-probability)."""
        start, end = self.window if self.window is not None else (0, self.steps)
        mask = torch.zeros(self.steps, dtype=torch.bool)
        mask[start:end] = True
        return mask


def sampling_grid(family, components, steps: int) -> SamplingGrid:
    """The grid the family's pipeline samples on: DDIM's timesteps and levels (the scheduler config's spacing,
    offset and final alpha) for DDPM schedules; ``FlowMatchEulerDiscreteScheduler``'s shifted sigmas for flow
    matching, set as the family's pipeline sets them (FLUX: linspace(1, 1/S, S) shifted by mu). Raises ``ConfigError`` for fewer than 1 step or more than the training timesteps."""
    total = family.num_train_timesteps(components)
    if not 1 <= steps <= total:
        raise ConfigError(f"online.sample_steps={steps} must be between 1 and the model's {total} training timesteps")
    config = components.noise_scheduler.config
    if family.flow_matching:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        family.set_sampling_timesteps(components, scheduler, steps)
        sigma = scheduler.sigmas.detach().to("cpu", torch.float32)  # (S + 1,), ends at 0
        return SamplingGrid(sigma[:-1] * total, 1 - sigma[:-1], sigma[:-1], 1 - sigma[1:], sigma[1:])
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.detach().cpu().long()
    if int(timesteps.max()) >= total:  # "leading" spacing with steps_offset at S = T
        raise ConfigError(f"online.sample_steps={steps} puts a DDIM step past the model's {total} training "
                          "timesteps; use fewer steps")
    cumprod = scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
    previous = timesteps - total // steps
    final = torch.tensor(float(scheduler.final_alpha_cumprod), dtype=torch.float64)
    reached = torch.where(previous >= 0, cumprod[previous.clamp(min=0)], final)
    levels = cumprod[timesteps]
    return SamplingGrid(timesteps, levels.sqrt().float(), (1 - levels).sqrt().float(), reached.sqrt().float(),
                        (1 - reached).sqrt().float())


@dataclass(frozen=True)
class Gaussian:
    """One transition: mean (N, C, h, w) float32 and std (N, 1, 1, 1) float32 (0 for a deterministic step)."""

    mean: torch.Tensor
    std: torch.Tensor


def ddim_transition(x0_hat: torch.Tensor, eps_hat: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                    alpha_next: torch.Tensor, sigma_next: torch.Tensor, eta) -> Gaussian:
    """DDIM step with noise ``eta`` (a float, or per sample (N, 1, 1, 1)) from levels (alpha, sigma) to
    (alpha_next, sigma_next), each broadcastable to x0_hat ((N, 1, 1, 1)); variance-preserving schedules
    (alpha^2 + sigma^2 = 1)."""
    ratio = (alpha / alpha_next) ** 2
    std = eta * (sigma_next / sigma) * (1 - ratio).clamp(min=0).sqrt()
    direction = (sigma_next ** 2 - std ** 2).clamp(min=0).sqrt()
    return Gaussian(alpha_next * x0_hat + direction * eps_hat, std * torch.ones_like(x0_hat[:, :1, :1, :1]))


def flow_sde_transition(x: torch.Tensor, x0_hat: torch.Tensor, eps_hat: torch.Tensor, t: torch.Tensor,
                        t_next: torch.Tensor, noise_level, t_cap: float) -> Gaussian:
    """The Flow-GRPO SDE step from t to t_next < t (levels broadcastable to x, (N, 1, 1, 1)); ``noise_level`` (a
    float, or per sample (N, 1, 1, 1)) 0 is the ODE's Euler step. ``t_cap`` replaces t in the 1 - t of sqrt(t / (1 - t)) at t = 1, where it is infinite (Flow-GRPO's
    ``sigma_max``, the grid's second level)."""
    velocity = eps_hat - x0_hat
    dt = t_next - t
    denominator = 1 - torch.where(t >= 1, torch.full_like(t, t_cap), t)
    sde_sigma = noise_level * (t / denominator).sqrt()
    drift = velocity + sde_sigma ** 2 / (2 * t) * (x + (1 - t) * velocity)
    std = sde_sigma * (-dt).clamp(min=0).sqrt()
    return Gaussian(x + drift * dt, std * torch.ones_like(x[:, :1, :1, :1]))


def gaussian_log_prob(sample: torch.Tensor, step: Gaussian) -> torch.Tensor:
    """(N,) mean over elements of the Gaussian log-density of ``sample`` (N, C, h, w); float32."""
    std = step.std.float()
    values = -((sample.float() - step.mean.float()) ** 2) / (2 * std ** 2) - std.log() - LOG_SQRT_2PI
    return values.mean(dim=tuple(range(1, values.ndim)))


def guided_prediction(family, model, x: torch.Tensor, timesteps: torch.Tensor, cond: dict, uncond: dict | None,
                      guidance_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The raw prediction with CFG, float32: one batched [uncond; cond] call, or cond alone when w = 1."""
    x_in = x.to(dtype)
    if guidance_scale == 1.0 or uncond is None:
        return family.predict(model, x_in, timesteps, cond).float()
    both = {name: torch.cat([uncond[name], cond[name]]) for name in cond}
    pred_uncond, pred_cond = family.predict(model, torch.cat([x_in, x_in]), torch.cat([timesteps, timesteps]),
                                            both).float().chunk(2)
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)


def transition(family, components, grid: SamplingGrid, settings: SamplerSettings, x: torch.Tensor,
               pred: torch.Tensor, index: torch.Tensor, stochastic: torch.Tensor) -> Gaussian:
    """The Gaussian of step ``index`` (N,) long for samples at ``x`` (N, C, h, w) float32 given the guided
    prediction ``pred``; ``stochastic`` (N,) bool chooses the noisy step (else the deterministic one, std 0)."""
    view = (-1, *[1] * (x.ndim - 1))
    device = x.device
    index = index.cpu()
    alpha, sigma = grid.alpha[index].to(device).view(view), grid.sigma[index].to(device).view(view)
    alpha_next = grid.alpha_next[index].to(device).view(view)
    sigma_next = grid.sigma_next[index].to(device).view(view)
    x0_hat, eps_hat = family.split_prediction(components, pred, x, alpha, sigma)
    noisy = stochastic.to(device).view(view).float()
    if family.flow_matching:
        cap = float(grid.sigma_next[0]) if grid.steps > 1 else 0.5
        return flow_sde_transition(x, x0_hat, eps_hat, sigma, sigma_next, settings.noise_level * noisy, cap)
    return ddim_transition(x0_hat, eps_hat, alpha, sigma, alpha_next, sigma_next, settings.eta * noisy)


@dataclass
class Trajectory:
    """Sampled chains of N images: latents (N, S + 1, C, h, w) float32 from the initial noise x_0 to the sample
    x_S; log_probs (N, S) float32, log p(x_{i+1} | x_i) at the stochastic steps and 0 elsewhere."""

    latents: torch.Tensor
    log_probs: torch.Tensor

    @property
    def samples(self) -> torch.Tensor:
        """(N, C, h, w): the clean latents x_S."""
        return self.latents[:, -1]


def latent_shape(components) -> tuple[int, int, int]:
    """(C, h, w) of the family's latents at the training resolution."""
    vae = components.vae
    side = components.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    return vae.config.latent_channels, side, side


def step_gaussian(family, components, model, grid: SamplingGrid, settings: SamplerSettings, x: torch.Tensor,
                  index: torch.Tensor, cond: dict, uncond: dict | None, stochastic: torch.Tensor,
                  dtype: torch.dtype) -> Gaussian:
    """The policy's transition at step ``index`` (N,) from ``x`` (N, C, h, w): one guided prediction of ``model``
    (with gradients when called with them), then ``transition``."""
    timesteps = grid.timesteps[index.cpu()].to(x.device)
    pred = guided_prediction(family, model, x, timesteps, cond, uncond, settings.guidance_scale, dtype)
    return transition(family, components, grid, settings, x.float(), pred, index, stochastic)


@torch.no_grad()
def sample_trajectory(family, components, model, grid: SamplingGrid, settings: SamplerSettings, cond: dict,
                      uncond: dict | None, generators: list[torch.Generator], device,
                      dtype: torch.dtype) -> Trajectory:
    """Sample N = len(cond rows) chains with ``model``; chain k draws its initial noise, then each stochastic
    step's noise in step order, from ``generators[k]`` (CPU), so a chain is a function of the weights and its own
    seed, whatever else shares its batch or process.

    Args:
        cond, uncond: per-image conditioning, N rows each (uncond: the negative / empty prompt, or None for
            CFG-free sampling).
        dtype: the denoiser's input dtype (the run's weight dtype).
    """
    count = next(iter(cond.values())).shape[0]
    stochastic = settings.stochastic()
    shape = latent_shape(components)

    def draw() -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=generator) for generator in generators]).to(device)

    x = draw()
    latents, log_probs = [x], torch.zeros(count, grid.steps)
    for i in range(grid.steps):
        index = torch.full((count,), i, dtype=torch.long)
        step = step_gaussian(family, components, model, grid, settings, x, index, cond, uncond,
                             stochastic[i].expand(count), dtype)
        if stochastic[i]:
            x = step.mean + step.std * draw()
            log_probs[:, i] = gaussian_log_prob(x, step).cpu()
        else:
            x = step.mean
        latents.append(x)
    return Trajectory(torch.stack(latents, dim=1), log_probs.to(device))
