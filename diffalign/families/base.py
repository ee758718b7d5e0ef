"""The family seam: what differs between model families (SD1.x/2.x, SDXL, SD3) and nothing else.

A family knows how to load its components, encode prompts and images, build the noisy input and the training
target, call the denoiser, build a sampling pipeline and save a LoRA in the format its pipeline loads.
The trainer calls these and knows no family specifics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from PIL import Image

from diffalign.errors import ConfigError, ModelError


def read_model_index(pretrained: str, revision: str | None = None) -> dict:
    """A checkpoint's ``model_index.json`` (its pipeline class and components), from a local diffusers folder or
    the hub. Raises ``ModelError`` when there is none or it cannot be reached."""
    local = Path(pretrained)
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise ModelError(f"{pretrained} has no model_index.json; model.pretrained must be a diffusers-format folder")
        return json.loads(index.read_text())
    try:
        return json.loads(Path(hf_hub_download(pretrained, "model_index.json", revision=revision)).read_text())
    except Exception as error:  # offline, missing repo, gated model: say what to do
        raise ModelError(
            f"could not read model_index.json for model.pretrained='{pretrained}': {error}. Give a local diffusers "
            "folder, a reachable hub id (log in with `hf auth login` for gated models), or tiny:sd15 offline."
        ) from error


@dataclass
class DiffusionComponents:
    """What ``Family.load`` returns: the loaded modules and the settings every other family method reads."""

    family: Family
    pretrained: str  # resolved local path or hub id
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list
    noise_scheduler: object  # training scheduler (add_noise, get_velocity, config.prediction_type)
    resolution: int
    extra: dict = field(default_factory=dict)
    vae_dtype: torch.dtype | None = None  # None: the run's weight dtype; float32 where the VAE overflows in fp16

    def frozen_modules(self) -> list[torch.nn.Module]:
        """The modules that never train: the VAE and the text encoders."""
        return [self.vae, *self.text_encoders]


class Family:
    """Base class: shared image preprocessing; families override the rest.

    Shapes: B records of K images each are flattened image-major to N = B * K rows before ``predict``; latents
    are (N, C, h, w) with h = w = resolution / the VAE's factor; ``timesteps`` are (N,) in [0, T).
    """

    name: str = ""
    pipeline_class_names: tuple[str, ...] = ()
    denoiser_subfolder: str = "unet"  # the pipeline component; where a full fine-tune is saved, as in the checkpoint
    denoiser_class_name: str = "UNet2DConditionModel"  # its diffusers class, for loading a full fine-tune
    default_timestep_density: str = "uniform"  # what train.timesteps.sampling=auto means for this family
    default_lora_targets: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
    # Conditioning that differs between the images of one record (SDXL's time ids), shaped (B, K, ...) in a batch;
    # everything else is per prompt, shaped (B, ...), and shared by the record's K images.
    per_image_cond_keys: tuple[str, ...] = ()
    # Whether the data path records each image's original size and crop (``image_size``) for ``image_cond``.
    needs_image_sizes: bool = False
    # Rectified-flow noise (x_t = (1 - t) x0 + t eps, velocity target) instead of a DDPM schedule.
    flow_matching: bool = False
    # Whether ``diffalign export --format kohya`` converts this family's LoRA (SD3's has no kohya layout).
    kohya_export: bool = True
    # Sampling's default guidance scale (``diffalign sample`` / ``pairs`` / ``eval``, validation images).
    default_guidance_scale: float = 7.5
    # Whether the pipeline runs true CFG (a separate negative branch, ``true_cfg_scale``) instead of a CFG batch;
    # NPO guidance then needs it.
    true_cfg: bool = False
    # The family's pipeline passes timestep / this to its denoiser (FLUX: sigma = t / 1000); the adapter router
    # multiplies it back, so segment intervals are always in training timesteps.
    pipeline_timestep_scale: float = 1.0

    def load(self, model_cfg, resolved_path: str) -> DiffusionComponents:
        """Load the checkpoint's denoiser, VAE, text encoders, tokenizers and training scheduler.

        Args:
            model_cfg: the ``model`` config section (revision, variant, a separate ``vae``, ``resolution``).
            resolved_path: a local diffusers folder or hub id (``model.pretrained`` after ``resolve_pretrained``).

        Returns:
            The components on the CPU in float32, the training resolution checked against the VAE and patches.
        """
        raise NotImplementedError

    def encode_prompts(self, components: DiffusionComponents, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning tensors of ``prompts``, batch-first, one row per prompt; cached to disk as they are.

        Returns:
            name -> tensor (len(prompts), ...), the keyword arguments ``predict`` reads (e.g.
            ``encoder_hidden_states`` (P, 77, D)).
        """
        raise NotImplementedError

    def encode_images(self, components: DiffusionComponents, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latents of images: the posterior mode (deterministic, so a cached latent is exact).

        Args:
            pixels: (N, 3, H, W) in [-1, 1], H = W = ``components.resolution``.

        Returns:
            x0 (N, C, h, w), scaled (and shifted) as the denoiser expects.
        """
        raise NotImplementedError

    def noisy_input_and_target(
        self, components: DiffusionComponents, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The noised input x_t and the denoiser's regression target at ``timesteps``.

        Args:
            x0, noise: (N, C, h, w) clean latents and Gaussian noise.
            timesteps: (N,) training timesteps (from ``sample_timesteps``).

        Returns:
            (x_t, target), both (N, C, h, w): epsilon, v or x0 for DDPM schedules (the scheduler's
            ``prediction_type``), the velocity eps - x0 for flow matching.
        """
        raise NotImplementedError

    def sample_timesteps(self, components: DiffusionComponents, count: int, generator: torch.Generator,
                         timestep_cfg=None) -> torch.Tensor:
        """``count`` training timesteps from ``generator`` (CPU), honouring ``train.timesteps``.

        Args:
            timestep_cfg: the ``train.timesteps`` section (density, interval, logit-normal mean and std), or None
                for the family's default density over the whole schedule.

        Returns:
            (count,) timesteps in [0, T) (or the configured interval): integers for DDPM, floats for flow matching.
        """
        raise NotImplementedError

    def timestep_weights(self, components: DiffusionComponents, timesteps: torch.Tensor, timestep_cfg):
        """Per-sample loss weights for ``timesteps`` under ``train.timesteps.weighting``.

        Returns:
            (N,) float32 CPU weights, or None for all ones. Raises ``ConfigError`` for a weighting the noise
            schedule does not define (min_snr on flow matching).
        """
        raise NotImplementedError

    def image_cond(self, components: DiffusionComponents, image_sizes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image conditioning from ``image_sizes`` (B, K, 4) = (orig_h, orig_w, crop_top, crop_left), each
        value shaped (B, K, ...); keys must be in ``per_image_cond_keys``. Only families with
        ``needs_image_sizes`` are called."""
        return {}

    def run_cond(self, components: DiffusionComponents, rows: int, device) -> dict[str, torch.Tensor]:
        """Conditioning set by the run, not the data (FLUX.1-dev's guidance value): (rows,) tensors added to
        every training batch's conditioning after the cache and prompt dropout; never cached."""
        return {}

    def embedded_guidance(self, components: DiffusionComponents) -> bool:
        """Whether the denoiser takes its guidance value as an input (guidance-distilled FLUX.1-dev) instead of
        running classifier-free guidance's two branches."""
        return False

    def lora_targets(self, denoiser: torch.nn.Module) -> tuple[str, ...]:
        """The default ``lora.target_modules`` for this denoiser: ``default_lora_targets``, which a family
        extends for optional layers (SD3.5's ``attn2``)."""
        return self.default_lora_targets

    def predict(
        self, denoiser: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The denoiser's output for ``x_t`` (N, C, h, w) at ``timesteps`` (N,) under ``cond`` (from
        ``encode_prompts`` and ``image_cond``, every value with N rows). Returns (N, C, h, w)."""
        raise NotImplementedError

    def num_train_timesteps(self, components: DiffusionComponents) -> int:
        """T: training timesteps lie in [0, T) (integers for DDPM schedules, floats for flow matching)."""
        raise NotImplementedError

    def noise_levels(self, components: DiffusionComponents,
                     timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t), CPU float32, shaped (N,), for the training timesteps ``timesteps`` (the values the
        denoiser receives): x_t = alpha_t x0 + sigma_t eps. DDPM: sqrt(alphas_cumprod), sqrt(1 - alphas_cumprod);
        flow matching: 1 - t / T, t / T."""
        raise NotImplementedError

    def split_prediction(self, components: DiffusionComponents, pred: torch.Tensor, x_t: torch.Tensor,
                         alpha: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) implied by the denoiser's output ``pred`` at ``x_t``, whose noise levels are
        ``alpha``, ``sigma`` (from ``noise_levels``, broadcastable to ``x_t``, e.g. (N, 1, 1, 1)). Affine in
        ``pred``, so guidance (weights summing to 1) may be applied to raw predictions before splitting."""
        raise NotImplementedError

    @torch.no_grad()
    def decode_latents(self, components: DiffusionComponents, latents: torch.Tensor) -> torch.Tensor:
        """Pixels (N, 3, H, W) float32 in [-1, 1] of latents as ``encode_images`` returns them (scaled and
        shifted), decoded by the VAE in its own dtype, as the pipelines decode."""
        vae = components.vae
        unscaled = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        return vae.decode(unscaled.to(vae.device, vae.dtype)).sample.float().clamp(-1, 1)

    def build_pipeline(self, components: DiffusionComponents, denoiser: torch.nn.Module | None = None):
        """The family's stock diffusers pipeline over ``components`` (with ``denoiser`` in place of the loaded one
        when given), for validation images and sampling."""
        raise NotImplementedError

    @staticmethod
    def configure_pipeline(pipe) -> None:
        """Adjust a freshly loaded pipeline of this family (``load_pipeline``, ``build_pipeline``); default none."""

    def save_lora(self, directory: str, lora_state_dict: dict, adapter_metadata: dict) -> None:
        """Write ``lora_state_dict`` (peft key names) in the file format the family's pipeline loads."""
        raise NotImplementedError

    def pipeline_class(self):
        """The diffusers pipeline class of the family (``StableDiffusionPipeline`` ...)."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------------------
    @staticmethod
    def training_resolution(requested: int | None, sample_size: int, vae, patch_size: int = 1) -> int:
        """``model.resolution``, or the denoiser's native size in pixels; a multiple of the VAE's downsampling
        factor times the denoiser's patch size (so latents tile into whole patches)."""
        vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        resolution = requested or sample_size * vae_factor
        multiple = vae_factor * patch_size
        if resolution % multiple:
            raise ConfigError(f"model.resolution={resolution} must be a multiple of {multiple} (the VAE's factor "
                              f"{vae_factor} x patch size {patch_size})")
        return resolution

    @staticmethod
    def crop_geometry(width: int, height: int, resolution: int) -> tuple[int, int, int, int]:
        """(resized_w, resized_h, crop_left, crop_top) of ``preprocess_image``: the shorter side resized to
        ``resolution``, then the centre ``resolution`` square cropped out of the resized image."""
        scale = resolution / min(width, height)
        new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
        return new_w, new_h, (new_w - resolution) // 2, (new_h - resolution) // 2

    @classmethod
    def image_size(cls, image: Image.Image, resolution: int) -> tuple[int, int, int, int]:
        """(orig_h, orig_w, crop_top, crop_left) of ``image`` as ``preprocess_image`` crops it (SDXL's size and
        crop micro-conditioning). The same for the flipped image: a flip mirrors the crop box, and we keep the
        unflipped offsets (a centre crop mirrors onto itself, up to one pixel for odd margins)."""
        width, height = image.size
        _, _, left, top = cls.crop_geometry(width, height, resolution)
        return height, width, top, left

    @classmethod
    def preprocess_image(cls, image: Image.Image, resolution: int, flip: bool = False) -> torch.Tensor:
        """Resize the shorter side to ``resolution`` (bilinear), centre-crop, map to [-1, 1], (3, H, W).

        Deterministic on purpose: it is what makes the latent cache valid. Random flips are served by caching
        both orientations.
        """
        new_w, new_h, left, top = cls.crop_geometry(*image.size, resolution)
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), Image.BILINEAR)
        image = image.crop((left, top, left + resolution, top + resolution))
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = array.view(resolution, resolution, 3).permute(2, 0, 1).float()
        return pixels / 127.5 - 1.0
