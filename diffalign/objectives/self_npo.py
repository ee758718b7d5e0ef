"""Self-NPO: a *negative* model learned from the model itself, with no preference labels (data-free NPO).

Source: G-U-N/Diffusion-NPO, ``Self-NPO/train.py`` (SD1.5) and ``Self-NPO/train_xl.py`` (SDXL).

Intuition: NPO guidance wants a model that is "the opposite of good" for the unconditional branch of CFG. Self-NPO
gets one by truncated diffusion fine-tuning towards the model's own *negatively guided* samples: an EMA teacher
denoises a few DDIM steps with guidance weight w <= 0 (w = -1 is purely unconditional), and the student learns to
predict where those steps lead from any noisier point. Only images and captions are used (data kind ``images``).

Each step, for latents x0 with captions c (empty prompt: c_0):

    1. pick a DDIM index on a grid of ``grid_steps`` timesteps with stride s = T / grid_steps (SD: 25 steps,
       s = 40, t in {39, 79, ..., 999}): t_s; noise x0 to x_{t_s} = alpha_s x0 + sigma_s eps;
    2. without gradients the teacher runs ``teacher_steps`` DDIM steps (eta 0) with the guided prediction
       p_g = p(x, c) + w (p(x, c) - p(x, c_0)), each from t to max(t - s, 0):
       x_prev = alpha_prev x0_hat + sigma_prev eps_hat, (x0_hat, eps_hat) the split of p_g at x (see below),
       reaching t_e = max(t_s - s * teacher_steps, 0) (SD: t_s - 200) with sample x_prev; the target is the
       teacher's guided x0_hat at t_e;
    3. t' ~ uniform on the integers in (t_e, T - 1]; re-noise x_prev from t_e to t' in variance-exploding form,
       nsr = sigma / alpha:   x_{t'} = (x_prev / alpha_e + sqrt(nsr_{t'}^2 - nsr_e^2) z) alpha_{t'},  z ~ N(0, I);
    4. the student (the one forward with gradients) predicts at t' with the caption; its x0_hat is the target's
       counterpart;
    5. loss = mean(sqrt((x0_student - target)^2 + c^2) - c)   (pseudo-Huber, c = ``huber_c``).

The teacher is an EMA of the student (decay ``ema_decay``, updated after every optimizer step), initialised from
the base: ``objective.reference`` resolves to ``ema`` and its decay and update interval come from this objective's
own parameters (``objective.self_npo.ema_decay``, every step), not from ``objective.ema_decay``. Setting
``objective.reference=lora_disabled`` or ``frozen_copy`` gives a fixed base-model teacher instead.

The result (a LoRA or a ``unet/`` folder) is used exactly like NPO weights: as the negative weights of NPO
guidance (the unconditional branch of CFG), not sampled alone.

Authors' settings: SD1.5 w = -1, lr 1e-6, batch 20, 1000 steps, EMA decay 0.999, full fine-tune; SDXL w = -5;
25-step DDIM grid (stride 40), 5 teacher steps (t_e = max(t_s - 200, 0)); pseudo-Huber c = 0.001.

Differences from the source: all randomness comes from the step generator (exact resume); the target is always
the teacher's x0 at t_e (the source, when every sample of a batch reaches t = 0 early, stops one evaluation short
and keeps the x0 of the last step instead); the latents are the VAE posterior mean (the feature cache), not a
sample. ``train.timesteps`` (interval, weighting) does not apply: the timesteps are this procedure's own.

Any prediction type: the family's ``noise_levels`` gives alpha_t, sigma_t and its ``split_prediction`` turns the
denoiser's output into (x0_hat, eps_hat): SD/SDXL epsilon, v-prediction (SD2.x 768-v) and sample; flow matching
(alpha = 1 - t/T, sigma = t/T, v = eps - x0) through its own family. Guidance is an affine combination of the
raw predictions (weights 1 + w and -w) and the split is affine in the prediction, so guiding the raw predictions
guides x0_hat and eps_hat alike.

Here: the hyperparameters and the pure functions. The step procedure, registered as ``"self_npo"`` in
``diffalign.training.steps.STEPS`` (the objective's ``step``), is ``diffalign.training.self_npo``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.objectives.base import Objective, check_positive, register_objective


@dataclass
class SelfNPOParams:
    guidance_weight: float = -1.0  # w in cond + w (cond - uncond): -1 = unconditional (SD1.5); SDXL used -5
    grid_steps: int = 25  # DDIM grid of the teacher: stride = num_train_timesteps // grid_steps (40 for SD)
    teacher_steps: int = 5  # DDIM steps the teacher takes: t_e = max(t_s - stride * teacher_steps, 0)
    huber_c: float = 0.001  # pseudo-Huber constant
    ema_decay: float = 0.999  # teacher <- decay * teacher + (1 - decay) * student, after every optimizer step

    def __post_init__(self):
        if self.grid_steps < 1:
            raise ValueError(f"grid_steps must be at least 1, got {self.grid_steps}")
        if self.teacher_steps < 1:
            raise ValueError(f"teacher_steps must be at least 1, got {self.teacher_steps}")
        if self.teacher_steps > self.grid_steps:
            raise ValueError(f"teacher_steps ({self.teacher_steps}) cannot exceed grid_steps ({self.grid_steps})")
        check_positive(self, "huber_c")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


# ---------------------------------------------------------------------------------------------- pure functions
def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """mean(sqrt((pred - target)^2 + c^2) - c): ~ (pred - target)^2 / 2c near 0, ~ |pred - target| far away.

    Evaluated as d^2 / (sqrt(d^2 + c^2) + c), the same value without the cancellation of the subtraction, in at
    least float32.
    """
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    diff_sq = (pred.to(dtype) - target.to(dtype)) ** 2
    return (diff_sq / (torch.sqrt(diff_sq + c**2) + c)).mean()


def ddim_step(x0_hat: torch.Tensor, eps_hat: torch.Tensor, alpha_prev: torch.Tensor,
              sigma_prev: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta 0) to the level (alpha_prev, sigma_prev): alpha_prev x0_hat + sigma_prev eps_hat.

    The same for every parameterisation once the prediction is split into (x0_hat, eps_hat); no division by the
    current level's alpha (zero at the noisy end of flow matching).
    """
    return alpha_prev * x0_hat + sigma_prev * eps_hat


def guided_prediction(cond: torch.Tensor, uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Guidance as Self-NPO writes it: cond + w (cond - uncond). w = -1 gives uncond; CFG scale g is w = g - 1.

    Any prediction type (eps, v, x0): the weights sum to 1 and the split into (x0_hat, eps_hat) is affine in the
    prediction, so guiding before or after the split is the same.
    """
    return cond + w * (cond - uncond)


def renoise_variance_exploding(x_prev: torch.Tensor, alpha_e: torch.Tensor, sigma_e: torch.Tensor,
                               alpha_t: torch.Tensor, sigma_t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Move a sample at noise level e to the noisier level t: (x_prev / alpha_e + sqrt(nsr_t^2 - nsr_e^2) z) alpha_t.

    In the variance-exploding coordinates x / alpha the noise-to-signal ratio nsr = sigma / alpha is the noise
    standard deviation, so adding independent noise of variance nsr_t^2 - nsr_e^2 reaches level t exactly.
    """
    nsr_e, nsr_t = sigma_e / alpha_e, sigma_t / alpha_t
    extra = torch.sqrt(torch.clamp(nsr_t**2 - nsr_e**2, min=0.0))
    return (x_prev / alpha_e + extra * z) * alpha_t


# ---------------------------------------------------------------------------------------------- registration
register_objective(
    Objective(
        name="self_npo",
        params_cls=SelfNPOParams,
        step="self_npo",  # the step procedure in diffalign.training.self_npo; no loss_fn
        needs_reference=True,  # the EMA teacher
        images_per_record=1,
        data_kind="images",
        default_reference="ema",  # the teacher is an EMA of the student ...
        reference_overrides=lambda params: {"ema_decay": params.ema_decay, "ema_update_every": 1},  # ... every step
        description="Self-NPO: truncated fine-tuning towards the EMA teacher's negatively guided DDIM steps "
                    "(pseudo-Huber in x0 space); a negative model for NPO guidance, no preference labels",
        source="G-U-N/Diffusion-NPO (Self-NPO/train.py)",
    )
)
