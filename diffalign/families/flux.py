"""FLUX.1 ([dev] and [schnell]): ``FluxTransformer2DModel``, rectified flow, CLIP's pooled output and T5.

Noise and target are SD3's (``families.sd3``): x_t = (1 - sigma) x0 + sigma eps, velocity target eps - x0, and
the family's timesteps are t = 1000 sigma (the pipeline passes t / 1000 = sigma to the transformer, and so does
``predict``). Latents stay (N, 16, h, w) everywhere in diffalign (cache, noise, losses, sampling); ``predict``
packs them into the transformer's 2x2 patch sequence (N, h/2 * w/2, 64) with the image position ids
(0, row, col), and unpacks its output, as ``FluxPipeline._pack_latents`` / ``_unpack_latents`` do.

Resolution-dependent shifting (the scheduler's ``use_dynamic_shifting``, on for [dev]): the pipeline samples on
sigma = e^mu u / (1 + (e^mu - 1) u) with mu linear in the image sequence length L = h/2 * w/2,
mu = base_shift + (max_shift - base_shift) (L - base_image_seq_len) / (max_image_seq_len - base_image_seq_len)
(``FluxPipeline``'s ``calculate_shift``; 0.5 at 256 tokens, 1.15 at 4096: e^mu = 3.16 at 1024 px). Training
draws u from the density and shifts it with the same e^mu at the training resolution, so that training and
sampling agree on t. Without dynamic shifting ([schnell]) the scheduler's static ``shift`` is used, as for SD3.

Conditioning, as ``FluxPipeline.encode_prompt`` builds it:
  - ``encoder_hidden_states``: T5's last hidden states, 512 tokens (the pipeline's default ``max_sequence_length``);
  - ``pooled_projections``: CLIP's pooled output (``pooler_output``, no projection);
  - the text position ids are zeros, built in ``predict``.

Distilled guidance ([dev]): the transformer embeds a guidance value (``guidance_embeds``), and [dev] is sampled
with it (``guidance_scale``, 3.5 by default) and no true CFG. Training must pass some value; ``model.flux_guidance``
(default 1.0) is sent with every training forward, as ``guidance`` in the conditioning (``run_cond``). 1.0 is
what SimpleTuner trains FLUX LoRAs with (``flux_guidance_value``, documented as keeping the distilled guidance
intact, so the LoRA still responds to ``guidance_scale`` at sampling); diffusers' DreamBooth FLUX script trains
with 3.5 instead (its ``--guidance_scale``). Online rounds embed ``online.guidance_scale`` instead and run no CFG,
as flow_grpo samples and trains FLUX. [schnell] has no guidance embedding and gets none.
"""

from __future__ import annotations

import math

import torch

from diffalign.errors import ModelError
from diffalign.families.base import DiffusionComponents
from diffalign.families.sd3 import StableDiffusion3Family

T5_MAX_LENGTH = 512  # FluxPipeline's default max_sequence_length: train on what sampling sees


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """mu of resolution-dependent shifting: linear in the image sequence length through (base_seq_len,
    base_shift) and (max_seq_len, max_shift) (diffusers ``pipeline_flux.calculate_shift``; FLUX.1, BFL)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h/2 * w/2, 4C): each 2x2 patch becomes one token, channel-major inside the patch."""
    n, c, h, w = latents.shape
    patches = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of ``pack_latents``: (N, h/2 * w/2, 4C) -> (N, C, h, w) for latents of ``height`` x ``width``."""
    n, _, channels = tokens.shape
    patches = tokens.view(n, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(n, channels // 4, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) position ids of the packed tokens: (0, row, col), as ``FluxPipeline`` builds them."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxFamily(StableDiffusion3Family):
    name = "flux"
    pipeline_class_names = ("FluxPipeline",)
    denoiser_class_name = "FluxTransformer2DModel"
    # The same names match the attention projections of both block types: the double-stream blocks' image and
    # text streams (to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out) and the single-stream blocks' to_q/k/v (their
    # output projection is shared with the MLP, proj_out, and is left alone).
    default_lora_targets = StableDiffusion3Family.default_lora_targets
    patch = 2  # the pipeline's 2x2 packing (the transformer's own patch_size is 1)
    kohya_export = True  # BFL's module names, as ComfyUI loads FLUX LoRAs (training/kohya_flux.py)
    default_guidance_scale = 3.5  # FluxPipeline's: [dev]'s embedded value ([schnell] ignores it)
    true_cfg = True
    pipeline_timestep_scale = 1000.0  # FluxPipeline passes sigma = t / 1000 to the transformer

    def load(self, model_cfg, resolved_path: str) -> DiffusionComponents:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        common = dict(revision=model_cfg.revision)
        weights = dict(variant=model_cfg.variant, **common)
        transformer = FluxTransformer2DModel.from_pretrained(resolved_path, subfolder="transformer", **weights)
        vae = (AutoencoderKL.from_pretrained(model_cfg.vae) if model_cfg.vae
               else AutoencoderKL.from_pretrained(resolved_path, subfolder="vae", **weights))
        clip = CLIPTextModel.from_pretrained(resolved_path, subfolder="text_encoder", **weights)
        t5 = T5EncoderModel.from_pretrained(resolved_path, subfolder="text_encoder_2", **weights)
        tokenizers = [CLIPTokenizer.from_pretrained(resolved_path, subfolder="tokenizer", **common),
                      T5TokenizerFast.from_pretrained(resolved_path, subfolder="tokenizer_2", **common)]
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(resolved_path, subfolder="scheduler", **common)
        self.check_scheduler(scheduler, resolved_path)
        # The transformer has no sample size; the VAE's (1024 px for FLUX.1) is the pipeline's default too.
        native = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
        resolution = self.training_resolution(model_cfg.resolution, native, vae, self.patch)
        guidance = float(model_cfg.flux_guidance) if transformer.config.guidance_embeds else None
        return DiffusionComponents(
            family=self, pretrained=resolved_path, denoiser=transformer, vae=vae, text_encoders=[clip, t5],
            tokenizers=tokenizers, noise_scheduler=scheduler, resolution=resolution,
            extra={"guidance": guidance},
            vae_dtype=torch.float32,  # as for SD3: small, once per image with the cache, no fp16 overflow
        )

    @staticmethod
    def check_scheduler(scheduler, path: str) -> None:
        """Refuse scheduler settings whose sigmas this family does not reproduce (FLUX.1 uses none of them)."""
        config = scheduler.config
        unsupported = [name for name in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                                         "use_beta_sigmas", "invert_sigmas", "stochastic_sampling") if config.get(name)]
        if config.get("time_shift_type", "exponential") != "exponential":
            unsupported.append(f"time_shift_type={config.time_shift_type}")
        if unsupported:
            raise ModelError(f"{path}: the scheduler sets {', '.join(unsupported)}; the flux family trains on "
                             "FLUX.1's schedule (exponential dynamic shifting or a static shift) only")

    # -- conditioning ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, components: DiffusionComponents, prompts: list[str]) -> dict[str, torch.Tensor]:
        (clip_tokenizer, t5_tokenizer), (clip, t5) = components.tokenizers, components.text_encoders
        clip_ids = clip_tokenizer(prompts, padding="max_length", max_length=clip_tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids.to(clip.device)
        pooled = clip(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = t5_tokenizer(prompts, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True,
                              return_tensors="pt").input_ids.to(t5.device)
        return {"encoder_hidden_states": t5(t5_ids, output_hidden_states=False)[0],
                "pooled_projections": pooled.to(clip.dtype)}

    def run_cond(self, components: DiffusionComponents, rows: int, device) -> dict[str, torch.Tensor]:
        """[dev]: ``guidance`` (rows,) filled with ``model.flux_guidance``; [schnell]: nothing."""
        guidance = components.extra.get("guidance")
        return {} if guidance is None else {"guidance": torch.full((rows,), guidance, device=device)}

    def embedded_guidance(self, components: DiffusionComponents) -> bool:
        return components.extra.get("guidance") is not None

    # -- timesteps ------------------------------------------------------------------------------------------
    def image_seq_len(self, components: DiffusionComponents) -> int:
        """L = h/2 * w/2: the packed image tokens at the training resolution."""
        side = components.resolution // 2 ** (len(components.vae.config.block_out_channels) - 1)
        return (side // self.patch) ** 2

    def timestep_shift(self, components: DiffusionComponents) -> float:
        """e^mu at the training resolution under dynamic shifting (the pipeline's mu), else the static shift."""
        config = components.noise_scheduler.config
        if not config.get("use_dynamic_shifting"):
            return float(config.shift)
        return math.exp(self.mu(components))

    def mu(self, components: DiffusionComponents) -> float:
        config = components.noise_scheduler.config
        return calculate_shift(self.image_seq_len(components), config.get("base_image_seq_len", 256),
                               config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                               config.get("max_shift", 1.15))

    def set_sampling_timesteps(self, components: DiffusionComponents, scheduler, steps: int) -> None:
        """As ``FluxPipeline`` sets them: sigmas linspace(1, 1/S, S), shifted with mu (or the static shift)."""
        sigmas = [1.0 - i * (1.0 - 1.0 / steps) / max(steps - 1, 1) for i in range(steps)]
        dynamic = components.noise_scheduler.config.get("use_dynamic_shifting")
        scheduler.set_timesteps(sigmas=sigmas, mu=self.mu(components) if dynamic else None)

    # -- the transformer --------------------------------------------------------------------------------------
    def predict(self, denoiser, x_t, timesteps, cond):
        n, _, height, width = x_t.shape
        states = cond["encoder_hidden_states"]
        output = denoiser(
            hidden_states=pack_latents(x_t),
            timestep=timesteps.to(x_t.dtype) / 1000,  # the pipeline's t / 1000: sigma
            guidance=cond.get("guidance"),
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=states,
            txt_ids=states.new_zeros(states.shape[1], 3),
            img_ids=image_ids(height, width, x_t.device, x_t.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(output, height, width)

    # -- pipeline and LoRA ------------------------------------------------------------------------------------
    def pipeline_class(self):
        from diffusers import FluxPipeline

        return FluxPipeline

    def build_pipeline(self, components: DiffusionComponents, denoiser=None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        (clip, t5), (clip_tokenizer, t5_tokenizer) = components.text_encoders, components.tokenizers
        pipe = self.pipeline_class()(
            transformer=denoiser if denoiser is not None else components.denoiser,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.noise_scheduler.config),
            vae=components.vae, text_encoder=clip, tokenizer=clip_tokenizer, text_encoder_2=t5,
            tokenizer_2=t5_tokenizer,
        )
        self.configure_pipeline(pipe)
        return pipe

    @staticmethod
    def configure_pipeline(pipe) -> None:
        """Make the pipeline's default size the VAE's native one: ``FluxPipeline`` hard-codes 128 latents, which
        is FLUX.1's 1024 px at its 8x VAE but not a smaller model's (the tiny one would sample at 512 px)."""
        pipe.default_sample_size = pipe.vae.config.sample_size // pipe.vae_scale_factor
