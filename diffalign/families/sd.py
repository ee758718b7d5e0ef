"""Stable Diffusion 1.x / 2.x: UNet2DConditionModel, one CLIP text encoder, DDPM noise schedule.

The training target follows the scheduler's ``prediction_type``: epsilon (SD1.x, SD2-base), v_prediction
(SD2.x 768-v) or sample.
"""

from __future__ import annotations

import torch

from diffalign.errors import ModelError
from diffalign.families.base import DiffusionComponents, Family
from diffalign.families.timesteps import resolve_density, sample_ddpm_timesteps, timestep_weights

# diffusers and transformers are imported in the methods that use them: their model and pipeline classes take
# seconds to import, and ``import diffalign.families`` (the CLI's choices, ``diffalign list``) stays quick.


# (x0, eps) from each prediction type at x_t = alpha x0 + sigma eps; v = alpha eps - sigma x0.
def split_epsilon(eps: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor,
                  sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Epsilon prediction: x0 = (x_t - sigma eps) / alpha."""
    return (x_t - sigma * eps) / alpha, eps


def split_v_prediction(v: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor,
                       sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v prediction: x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v (alpha^2 + sigma^2 = 1: no division)."""
    return alpha * x_t - sigma * v, sigma * x_t + alpha * v


def split_sample(x0: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor,
                 sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (x0) prediction: eps = (x_t - alpha x0) / sigma."""
    return x0, (x_t - alpha * x0) / sigma


SPLITS = {"epsilon": split_epsilon, "v_prediction": split_v_prediction, "sample": split_sample}


class StableDiffusionFamily(Family):
    name = "sd"
    pipeline_class_names = ("StableDiffusionPipeline",)

    def load(self, model_cfg, resolved_path: str) -> DiffusionComponents:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        common = dict(revision=model_cfg.revision)
        unet = UNet2DConditionModel.from_pretrained(resolved_path, subfolder="unet", variant=model_cfg.variant, **common)
        vae = (AutoencoderKL.from_pretrained(model_cfg.vae) if model_cfg.vae  # a separate VAE folder / hub id
               else AutoencoderKL.from_pretrained(resolved_path, subfolder="vae", variant=model_cfg.variant, **common))
        text_encoder = CLIPTextModel.from_pretrained(
            resolved_path, subfolder="text_encoder", variant=model_cfg.variant, **common
        )
        tokenizer = CLIPTokenizer.from_pretrained(resolved_path, subfolder="tokenizer", **common)
        scheduler = DDPMScheduler.from_pretrained(resolved_path, subfolder="scheduler", **common)
        resolution = self.training_resolution(model_cfg.resolution, unet.config.sample_size, vae)
        return DiffusionComponents(
            family=self,
            pretrained=resolved_path,
            denoiser=unet,
            vae=vae,
            text_encoders=[text_encoder],
            tokenizers=[tokenizer],
            noise_scheduler=scheduler,
            resolution=resolution,
        )

    @torch.no_grad()
    def encode_prompts(self, components: DiffusionComponents, prompts: list[str]) -> dict[str, torch.Tensor]:
        tokenizer, text_encoder = components.tokenizers[0], components.text_encoders[0]
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(text_encoder.device)
        hidden = text_encoder(ids)[0]
        return {"encoder_hidden_states": hidden}

    @torch.no_grad()
    def encode_images(self, components: DiffusionComponents, pixels: torch.Tensor) -> torch.Tensor:
        vae = components.vae
        # The posterior mean, not a sample: deterministic, so a cached latent is the same latent every epoch.
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        return latents * vae.config.scaling_factor

    def sample_timesteps(self, components: DiffusionComponents, count: int, generator: torch.Generator,
                         timestep_cfg=None) -> torch.Tensor:
        density = resolve_density(timestep_cfg, self.default_timestep_density)
        return sample_ddpm_timesteps(self.num_train_timesteps(components), count, generator, timestep_cfg, density)

    def timestep_weights(self, components: DiffusionComponents, timesteps: torch.Tensor, timestep_cfg):
        from diffusers.training_utils import compute_snr

        scheduler = components.noise_scheduler
        snr = compute_snr(scheduler, timesteps.cpu())  # alphas_cumprod / (1 - alphas_cumprod), as diffusers' scripts
        return timestep_weights(timesteps, snr, timestep_cfg, scheduler.config.prediction_type)

    def noisy_input_and_target(self, components, x0, noise, timesteps):
        scheduler = components.noise_scheduler
        x_t = scheduler.add_noise(x0, noise, timesteps)
        prediction_type = scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = scheduler.get_velocity(x0, noise, timesteps)
        elif prediction_type == "sample":
            target = x0
        else:
            raise ModelError(f"unsupported prediction_type {prediction_type!r}")
        return x_t, target

    def predict(self, denoiser, x_t, timesteps, cond):
        return denoiser(x_t, timesteps, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    def num_train_timesteps(self, components: DiffusionComponents) -> int:
        return components.noise_scheduler.config.num_train_timesteps

    def noise_levels(self, components: DiffusionComponents, timesteps: torch.Tensor):
        # float64 for 1 - alphas_cumprod, where alphas_cumprod is close to 1 (small t), then float32 as promised
        alphas_cumprod = components.noise_scheduler.alphas_cumprod.detach().to("cpu", torch.float64)[timesteps.cpu()]
        return alphas_cumprod.sqrt().float(), (1 - alphas_cumprod).sqrt().float()

    def split_prediction(self, components: DiffusionComponents, pred, x_t, alpha, sigma):
        prediction_type = components.noise_scheduler.config.prediction_type
        if prediction_type not in SPLITS:
            raise ModelError(f"unsupported prediction_type {prediction_type!r}")
        return SPLITS[prediction_type](pred, x_t, alpha, sigma)

    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def build_pipeline(self, components: DiffusionComponents, denoiser=None):
        from diffusers import DDIMScheduler

        return self.pipeline_class()(
            vae=components.vae,
            text_encoder=components.text_encoders[0],
            tokenizer=components.tokenizers[0],
            unet=denoiser if denoiser is not None else components.denoiser,
            scheduler=DDIMScheduler.from_config(components.noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def save_lora(self, directory: str, lora_state_dict: dict, adapter_metadata: dict) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers

        # UNet LoRAs in diffusers' own key names (lora.down / lora.up), as diffusers' SD and SDXL scripts save them
        self.pipeline_class().save_lora_weights(
            directory, unet_lora_layers=convert_state_dict_to_diffusers(lora_state_dict),
            unet_lora_adapter_metadata=adapter_metadata
        )
