"""The family seam: what differs between model families (SD1.x/2.x, SDXL, SD3) and nothing else.

A family knows how to load its components, encode prompts and images, build the noisy input and the training
target, call the denoiser, build a sampling pipeline and save a LoRA in the format its pipeline loads.
The trainer calls these and knows no family specifics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image


@dataclass
class DiffusionComponents:
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
        return [self.vae, *self.text_encoders]


class Family:
    """Base class: shared image preprocessing; families override the rest."""

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

    def load(self, model_cfg, resolved_path: str) -> DiffusionComponents:
        raise NotImplementedError

    def encode_prompts(self, components: DiffusionComponents, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning tensors, batch-first, one row per prompt; cached to disk as they are."""
        raise NotImplementedError

    def encode_images(self, components: DiffusionComponents, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> scaled latents x0 (N, C, h, w)."""
        raise NotImplementedError

    def noisy_input_and_target(
        self, components: DiffusionComponents, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def sample_timesteps(self, components: DiffusionComponents, count: int, generator: torch.Generator,
                         timestep_cfg=None) -> torch.Tensor:
        """``count`` training timesteps from ``generator`` (CPU), honouring ``train.timesteps``."""
        raise NotImplementedError

    def timestep_weights(self, components: DiffusionComponents, timesteps: torch.Tensor, timestep_cfg):
        """Per-sample loss weights for ``timesteps`` (None = all ones)."""
        raise NotImplementedError

    def image_cond(self, components: DiffusionComponents, image_sizes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image conditioning from ``image_sizes`` (B, K, 4) = (orig_h, orig_w, crop_top, crop_left), each
        value shaped (B, K, ...); keys must be in ``per_image_cond_keys``. Only families with
        ``needs_image_sizes`` are called."""
        return {}

    def predict(
        self, denoiser: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
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

    def build_pipeline(self, components: DiffusionComponents, denoiser: torch.nn.Module | None = None):
        raise NotImplementedError

    def save_lora(self, directory: str, lora_state_dict: dict, adapter_metadata: dict) -> None:
        """Write ``lora_state_dict`` (peft key names) in the file format the family's pipeline loads."""
        raise NotImplementedError

    def pipeline_class(self):
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
            raise ValueError(f"model.resolution={resolution} must be a multiple of {multiple} (the VAE's factor "
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
