"""Stable Diffusion XL: UNet2DConditionModel with ``text_time`` added conditioning, two CLIP text encoders.

Conditioning, as ``StableDiffusionXLPipeline.encode_prompt`` builds it:
  - ``encoder_hidden_states``: the penultimate hidden states of both encoders, concatenated on the feature axis;
  - ``text_embeds``: the pooled, projected output of encoder 2;
  - ``time_ids``: per *image*, (orig_h, orig_w, crop_top, crop_left, target_h, target_w) from the image's
    original size and the offset of our deterministic resize + centre crop (``Family.image_size``).

The noise schedule, targets and timestep sampling are SD's (DDPM, ``prediction_type`` from the scheduler), so
this family subclasses ``StableDiffusionFamily`` and overrides loading, prompts, the UNet call and the pipeline.
"""

from __future__ import annotations

import torch

from diffalign.families.base import DiffusionComponents, read_model_index
from diffalign.families.sd import StableDiffusionFamily

# diffusers and transformers are imported in the methods that use them: their model and pipeline classes take
# seconds to import, and ``import diffalign.families`` (the CLI's choices, ``diffalign list``) stays quick.


class StableDiffusionXLFamily(StableDiffusionFamily):
    name = "sdxl"
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    per_image_cond_keys = ("time_ids",)
    needs_image_sizes = True

    def load(self, model_cfg, resolved_path: str) -> DiffusionComponents:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        common = dict(revision=model_cfg.revision)
        weights = dict(variant=model_cfg.variant, **common)
        unet = UNet2DConditionModel.from_pretrained(resolved_path, subfolder="unet", **weights)
        if model_cfg.vae:  # e.g. madebyollin/sdxl-vae-fp16-fix: a folder or hub id holding just the VAE
            vae = AutoencoderKL.from_pretrained(model_cfg.vae)
        else:
            vae = AutoencoderKL.from_pretrained(resolved_path, subfolder="vae", **weights)
        text_encoders = [
            CLIPTextModel.from_pretrained(resolved_path, subfolder="text_encoder", **weights),
            CLIPTextModelWithProjection.from_pretrained(resolved_path, subfolder="text_encoder_2", **weights),
        ]
        tokenizers = [CLIPTokenizer.from_pretrained(resolved_path, subfolder=sub, **common)
                      for sub in ("tokenizer", "tokenizer_2")]
        scheduler = DDPMScheduler.from_pretrained(resolved_path, subfolder="scheduler", **common)
        resolution = self.training_resolution(model_cfg.resolution, unet.config.sample_size, vae)
        index = read_model_index(resolved_path, model_cfg.revision)
        return DiffusionComponents(
            family=self,
            pretrained=resolved_path,
            denoiser=unet,
            vae=vae,
            text_encoders=text_encoders,
            tokenizers=tokenizers,
            noise_scheduler=scheduler,
            resolution=resolution,
            extra={"force_zeros_for_empty_prompt": index.get("force_zeros_for_empty_prompt", True)},
            # SDXL's own VAE overflows (NaNs) in fp16, so it stays in fp32; a separate VAE (the fp16-fix) runs in
            # the training dtype.
            vae_dtype=None if model_cfg.vae else torch.float32,
        )

    @torch.no_grad()
    def encode_prompts(self, components: DiffusionComponents, prompts: list[str]) -> dict[str, torch.Tensor]:
        hidden_states = []
        for tokenizer, text_encoder in zip(components.tokenizers, components.text_encoders):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(text_encoder.device)
            output = text_encoder(ids, output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])  # SDXL always uses the penultimate layer
        return {
            "encoder_hidden_states": torch.cat(hidden_states, dim=-1),
            "text_embeds": output.text_embeds,  # encoder 2's pooled, projected output
        }

    def image_cond(self, components: DiffusionComponents, image_sizes: torch.Tensor) -> dict[str, torch.Tensor]:
        """time_ids (B, K, 6) = (orig_h, orig_w, crop_top, crop_left, target_h, target_w); the target is the
        square training resolution."""
        target = torch.full((*image_sizes.shape[:-1], 2), components.resolution, device=image_sizes.device)
        return {"time_ids": torch.cat([image_sizes, target], dim=-1).float()}

    def predict(self, denoiser, x_t, timesteps, cond):
        if "time_ids" not in cond:
            raise ValueError("SDXL conditioning needs per-image 'time_ids' (original size, crop, target size); "
                             "build them with family.image_cond from the images' recorded sizes")
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return denoiser(x_t, timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                        added_cond_kwargs=added).sample

    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def build_pipeline(self, components: DiffusionComponents, denoiser=None):
        from diffusers import DDIMScheduler

        return self.pipeline_class()(
            vae=components.vae,
            text_encoder=components.text_encoders[0],
            text_encoder_2=components.text_encoders[1],
            tokenizer=components.tokenizers[0],
            tokenizer_2=components.tokenizers[1],
            unet=denoiser if denoiser is not None else components.denoiser,
            scheduler=DDIMScheduler.from_config(components.noise_scheduler.config),
            force_zeros_for_empty_prompt=components.extra.get("force_zeros_for_empty_prompt", True),
            add_watermarker=False,
        )

    # save_lora: inherited; StableDiffusionXLPipeline.save_lora_weights takes the same unet_lora_layers and
    # unet_lora_adapter_metadata arguments, and load_lora_weights reads the file with its alpha.
