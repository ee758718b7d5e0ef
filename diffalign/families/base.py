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

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, *self.text_encoders]


class Family:
    """Base class: shared image preprocessing; families override the rest."""

    name: str = ""
    pipeline_class_names: tuple[str, ...] = ()
    denoiser_subfolder: str = "unet"  # where a full fine-tune is saved, as in the checkpoint layout
    default_lora_targets: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")

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

    def predict(
        self, denoiser: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        raise NotImplementedError

    def build_pipeline(self, components: DiffusionComponents, denoiser: torch.nn.Module | None = None):
        raise NotImplementedError

    def save_lora(self, directory: str, lora_state_dict: dict, adapter_metadata: dict) -> None:
        raise NotImplementedError

    def pipeline_class(self):
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------------------
    @staticmethod
    def preprocess_image(image: Image.Image, resolution: int, flip: bool = False) -> torch.Tensor:
        """Resize the shorter side to ``resolution`` (bilinear), centre-crop, map to [-1, 1], (3, H, W).

        Deterministic on purpose: it is what makes the latent cache valid. Random flips are served by caching
        both orientations.
        """
        width, height = image.size
        scale = resolution / min(width, height)
        new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        if new_size != image.size:
            image = image.resize(new_size, Image.BILINEAR)
        left = (image.width - resolution) // 2
        top = (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = array.view(resolution, resolution, 3).permute(2, 0, 1).float()
        return pixels / 127.5 - 1.0
