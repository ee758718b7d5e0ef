"""Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel``, rectified-flow noise, three text encoders.

Noise and target (rectified flow, Esser et al. 2024): x_t = (1 - sigma) x0 + sigma eps, and the transformer
predicts the velocity eps - x0. Every objective compares its errors against that target, so the DPO-family
formulas carry over unchanged.

Timesteps: the transformer sees t = 1000 sigma, the same value ``FlowMatchEulerDiscreteScheduler`` passes at
sampling time. Intervals (``train.timesteps.interval``, segments, weight tables) are therefore in one unit for
training and guidance: segment [500, 1000) is sigma in [0.5, 1). Training draws an unshifted level u from the
density (logit-normal by default, as in SD3; or uniform) and shifts it like the scheduler does,
sigma = shift u / (1 + (shift - 1) u) (shift 3.0 for SD3-medium), as diffusers' SD3 training script does.

Conditioning, as ``StableDiffusion3Pipeline.encode_prompt`` builds it:
  - ``encoder_hidden_states``: the penultimate hidden states of both CLIP encoders, concatenated on the feature
    axis and zero-padded to T5's width, followed on the sequence axis by T5's last hidden states (256 tokens, the
    pipeline's default ``max_sequence_length``); zeros when the checkpoint has no T5 (``text_encoder_3`` null,
    which the pipeline allows);
  - ``pooled_projections``: the pooled, projected outputs of both CLIP encoders, concatenated.
"""

from __future__ import annotations

import torch

from diffalign.errors import ConfigError, ModelError
from diffalign.families.base import DiffusionComponents, Family, read_model_index
from diffalign.families.timesteps import interval_bounds, resolve_density, sample_unit_levels, table_weights

# diffusers and transformers are imported in the methods that use them: their model and pipeline classes take
# seconds to import, and ``import diffalign.families`` (the CLI's choices, ``diffalign list``) stays quick.

T5_MAX_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length: train on what sampling sees


# ---------------------------------------------------------------------------------------------- flow matching
def flow_matching_noisy(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma eps, with ``sigmas`` (N,) broadcast over the sample dimensions."""
    sigma = sigmas.view(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)
    return (1 - sigma) * x0 + sigma * noise


def flow_matching_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity d x_t / d sigma = eps - x0."""
    return noise - x0


def shift_levels(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The scheduler's time shift: sigma = shift u / (1 + (shift - 1) u); shift > 1 moves training to more noise."""
    return shift * u / (1 + (shift - 1) * u)


def unshift_levels(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Inverse of ``shift_levels``: u = sigma / (shift - (shift - 1) sigma)."""
    return sigma / (shift - (shift - 1) * sigma)


class StableDiffusion3Family(Family):
    name = "sd3"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    denoiser_subfolder = "transformer"
    denoiser_class_name = "SD3Transformer2DModel"
    default_timestep_density = "logit_normal"
    flow_matching = True
    kohya_export = False
    # The attention projections of every joint block, image and text streams (diffusers' SD3 LoRA script);
    # the last block has no to_add_out (context_pre_only), which peft simply skips.
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")

    def load(self, model_cfg, resolved_path: str) -> DiffusionComponents:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        common = dict(revision=model_cfg.revision)
        weights = dict(variant=model_cfg.variant, **common)
        transformer = SD3Transformer2DModel.from_pretrained(resolved_path, subfolder="transformer", **weights)
        vae = (AutoencoderKL.from_pretrained(model_cfg.vae) if model_cfg.vae
               else AutoencoderKL.from_pretrained(resolved_path, subfolder="vae", **weights))
        text_encoders = [CLIPTextModelWithProjection.from_pretrained(resolved_path, subfolder=sub, **weights)
                         for sub in ("text_encoder", "text_encoder_2")]
        tokenizers = [CLIPTokenizer.from_pretrained(resolved_path, subfolder=sub, **common)
                      for sub in ("tokenizer", "tokenizer_2")]
        index = read_model_index(resolved_path, model_cfg.revision)
        has_t5 = (index.get("text_encoder_3") or [None])[0] is not None
        t5 = T5EncoderModel.from_pretrained(resolved_path, subfolder="text_encoder_3", **weights) if has_t5 else None
        t5_tokenizer = T5TokenizerFast.from_pretrained(resolved_path, subfolder="tokenizer_3", **common) if has_t5 else None
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(resolved_path, subfolder="scheduler", **common)
        if scheduler.config.get("use_dynamic_shifting"):
            raise ModelError(f"{resolved_path}: the scheduler shifts its timesteps by resolution (use_dynamic_shifting); "
                              "the sd3 family trains with the static `shift` of SD3 / SD3.5 checkpoints")
        resolution = self.training_resolution(model_cfg.resolution, transformer.config.sample_size, vae,
                                              transformer.config.patch_size)
        return DiffusionComponents(
            family=self,
            pretrained=resolved_path,
            denoiser=transformer,
            vae=vae,
            text_encoders=[*text_encoders, *([t5] if t5 is not None else [])],
            tokenizers=[*tokenizers, *([t5_tokenizer] if t5_tokenizer is not None else [])],
            noise_scheduler=scheduler,
            resolution=resolution,
            # Kept in fp32, as diffusers' SD3 LoRA script keeps it: it is small, runs once per image with the
            # feature cache, and fp32 rules out half-precision overflow in its decoder.
            vae_dtype=torch.float32,
        )

    # -- conditioning ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, components: DiffusionComponents, prompts: list[str]) -> dict[str, torch.Tensor]:
        clip_states, pooled = [], []
        for tokenizer, encoder in zip(components.tokenizers[:2], components.text_encoders[:2]):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(encoder.device)
            output = encoder(ids, output_hidden_states=True)
            clip_states.append(output.hidden_states[-2])
            pooled.append(output.text_embeds)
        clip_states = torch.cat(clip_states, dim=-1)
        t5_states = self.t5_states(components, prompts, clip_states)
        clip_states = torch.nn.functional.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip_states, t5_states.to(clip_states.dtype)], dim=-2),
                "pooled_projections": torch.cat(pooled, dim=-1)}

    def t5_states(self, components, prompts: list[str], clip_states: torch.Tensor) -> torch.Tensor:
        if len(components.text_encoders) < 3:  # no T5: the pipeline feeds zeros of the joint attention width
            width = components.denoiser.config.joint_attention_dim
            return clip_states.new_zeros(len(prompts), T5_MAX_LENGTH, width)
        tokenizer, encoder = components.tokenizers[2], components.text_encoders[2]
        ids = tokenizer(prompts, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True,
                        add_special_tokens=True, return_tensors="pt").input_ids.to(encoder.device)
        return encoder(ids)[0]

    @torch.no_grad()
    def encode_images(self, components: DiffusionComponents, pixels: torch.Tensor) -> torch.Tensor:
        vae = components.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    # -- noise, timesteps and targets -------------------------------------------------------------------------
    def num_train_timesteps(self, components: DiffusionComponents) -> int:
        return components.noise_scheduler.config.num_train_timesteps

    def sample_timesteps(self, components: DiffusionComponents, count: int, generator: torch.Generator,
                         timestep_cfg=None) -> torch.Tensor:
        """t = T sigma (float32), sigma = shift(u), u from the density; an interval [t_lo, t_hi) bounds sigma."""
        total, shift = self.num_train_timesteps(components), self.timestep_shift(components)
        interval = timestep_cfg.interval if timestep_cfg is not None else None
        bounds = torch.tensor(interval_bounds(total, interval), dtype=torch.float64) / total
        bounds = unshift_levels(bounds, shift)
        density = resolve_density(timestep_cfg, self.default_timestep_density)
        mean, std = (timestep_cfg.logit_mean, timestep_cfg.logit_std) if timestep_cfg is not None else (0.0, 1.0)
        u = sample_unit_levels(count, generator, density, float(bounds[0]), float(bounds[1]), mean, std)
        return (shift_levels(u, shift) * total).float()

    def timestep_shift(self, components: DiffusionComponents) -> float:
        """The shift the pipeline samples with at the training resolution: SD3's static ``shift``."""
        return float(components.noise_scheduler.config.shift)

    def set_sampling_timesteps(self, components: DiffusionComponents, scheduler, steps: int) -> None:
        """Set ``scheduler`` (a copy of the training one) to the sigmas the family's pipeline samples ``steps``
        steps on: ``StableDiffusion3Pipeline`` lets the scheduler space them."""
        scheduler.set_timesteps(steps)

    def lora_targets(self, denoiser) -> tuple[str, ...]:
        """The joint attention's projections, plus the second (image-only) attention of SD3.5's dual-attention
        blocks (``attn2``, in the blocks ``dual_attention_layers`` lists; SD3.5-medium has 13), which would
        otherwise never be adapted."""
        if getattr(denoiser.config, "dual_attention_layers", None):
            return (*self.default_lora_targets, "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
        return self.default_lora_targets

    def timestep_weights(self, components: DiffusionComponents, timesteps: torch.Tensor, timestep_cfg):
        if timestep_cfg.weighting == "none":
            return None
        if timestep_cfg.weighting == "table":
            return table_weights(timesteps, timestep_cfg.weight_table)
        raise ConfigError(f"train.timesteps.weighting={timestep_cfg.weighting} is defined for DDPM noise schedules; "
                         "for flow matching use weighting=table (per-interval weights) or none")

    def sigmas(self, components: DiffusionComponents, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.float() / self.num_train_timesteps(components)

    def noisy_input_and_target(self, components, x0, noise, timesteps):
        return (flow_matching_noisy(x0, noise, self.sigmas(components, timesteps)),
                flow_matching_target(x0, noise))

    def noise_levels(self, components: DiffusionComponents, timesteps: torch.Tensor):
        sigma = self.sigmas(components, timesteps.cpu())
        return 1 - sigma, sigma

    def split_prediction(self, components, pred, x_t, alpha, sigma):
        """(x0, eps) from the velocity v = eps - x0 at x_t = alpha x0 + sigma eps, alpha = 1 - sigma."""
        return x_t - sigma * pred, x_t + alpha * pred

    def predict(self, denoiser, x_t, timesteps, cond):
        return denoiser(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                        pooled_projections=cond["pooled_projections"]).sample

    # -- pipeline and LoRA ------------------------------------------------------------------------------------
    def pipeline_class(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def build_pipeline(self, components: DiffusionComponents, denoiser=None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        encoders, tokenizers = components.text_encoders, components.tokenizers
        return self.pipeline_class()(
            transformer=denoiser if denoiser is not None else components.denoiser,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.noise_scheduler.config),
            vae=components.vae,
            text_encoder=encoders[0],
            tokenizer=tokenizers[0],
            text_encoder_2=encoders[1],
            tokenizer_2=tokenizers[1],
            text_encoder_3=encoders[2] if len(encoders) > 2 else None,
            tokenizer_3=tokenizers[2] if len(tokenizers) > 2 else None,
        )

    def save_lora(self, directory: str, lora_state_dict: dict, adapter_metadata: dict) -> None:
        # peft key names (lora_A / lora_B), as diffusers' SD3 LoRA script saves them
        self.pipeline_class().save_lora_weights(directory, transformer_lora_layers=lora_state_dict,
                                                transformer_lora_adapter_metadata=adapter_metadata)
