"""The toy world: a tiny text-to-image model *pre-trained here* on red or blue shapes, so alignment is visible.

``tiny:sd15`` has random weights and draws noise; a colour reward cannot move it anywhere meaningful. The toy
base is trained on CPU from a seed, in a few minutes, on 32x32 images of a square, circle or triangle, each red
or blue with a 50/50 split and prompts that never name the colour ("a circle"). The trained model draws both
colours for one prompt, so a reward that prefers red (``toy_redness``) has something to align.

    path = resolve_model_spec("tiny:toy")     # diffalign.offline.specs: built on first use, cached under
                                              # $DIFFALIGN_CACHE/tiny/toy-<TOY_VERSION>-seed<seed>

Both parts are trained, because a random VAE decodes colours with no signal:
- VAE: ``AutoencoderKL`` (3 blocks, factor 4, 8x8x4 latents), MSE + 1e-4 KL; its scaling factor is set from the
  latent std with ``register_to_config`` (assigning ``vae.config.scaling_factor`` does nothing);
- UNet: 2 blocks (32, 64) with cross-attention to a frozen random tiny CLIP text encoder, epsilon prediction on
  the SD1.5 noise schedule, 10% prompt dropout for CFG, cosine lr decay and an EMA of the weights (the colour
  balance drifts with plain training).
The folder is a stock ``StableDiffusionPipeline`` checkpoint; ``toy_base.json`` records the settings, losses,
times and the measured red share of its samples.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffalign.logs import get_logger
from diffalign.offline.data import SHAPES, draw_shape
from diffalign.offline.models import (
    TINY_RESOLUTION,
    build_clip_tokenizer,
    sd15_scheduler_config,
    tiny_text_encoder,
    tiny_unet,
)
from diffalign.rewards.toy import redness
from diffalign.training.ema import ExponentialMovingAverage

# diffusers is imported in the functions that build and train: its model and pipeline classes take seconds to
# import, and this module is imported whenever the tiny specs are (the CLI's choices, ``diffalign list``).

logger = get_logger(__name__)

TOY_VERSION = "v2"  # bump when the recipe changes, so stale caches are not reused
TOY_COLOURS = ("red", "blue")


def toy_prompts() -> list[str]:
    """The prompts the toy base is trained on (colour is never named: it is the free, two-sided variation)."""
    return [f"a {shape}" for shape in SHAPES]


@dataclass
class ToyBaseSettings:
    """The toy base's recipe (``TOY_VERSION`` names it): data size, steps, batch sizes and learning rates."""

    seed: int = 0
    num_images: int = 6144
    vae_steps: int = 300
    vae_batch_size: int = 32
    vae_learning_rate: float = 1e-3
    vae_channels: tuple[int, ...] = (16, 32, 32)
    unet_steps: int = 1000
    unet_batch_size: int = 64
    unet_learning_rate: float = 1e-3
    unet_ema_decay: float = 0.995
    prompt_dropout: float = 0.1
    text_hidden_size: int = 64
    balance_samples: int = 96  # images sampled at the end to measure the red share


def toy_images(count: int, seed: int) -> tuple[list, list[str], list[str]]:
    """``count`` images with their prompt and colour: shape cycles, colour is a fair coin."""
    rng = random.Random(seed)
    images, prompts, colours = [], [], []
    for index in range(count):
        shape = SHAPES[index % len(SHAPES)]
        colour = TOY_COLOURS[rng.random() < 0.5]
        images.append(draw_shape(shape, colour, rng))
        prompts.append(f"a {shape}")
        colours.append(colour)
    return images, prompts, colours


def to_tensor(images) -> torch.Tensor:
    """PIL RGB images -> (N, 3, H, W) float32 in [-1, 1]."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def toy_vae(settings: ToyBaseSettings):
    """The toy VAE, untrained: ``AutoencoderKL`` with ``settings.vae_channels`` blocks (factor 4, 8x8x4 latents)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(settings.seed + 1)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(settings.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(settings.vae_channels),
        block_out_channels=settings.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(32, settings.vae_channels[0]),
        sample_size=TINY_RESOLUTION,
    )


def toy_unet(settings: ToyBaseSettings):
    """The toy UNet, untrained: the tiny 2-block UNet, cross-attending to ``settings.text_hidden_size`` features."""
    # (attention_head_dim is diffusers' legacy name for the number of heads: 2 train ~20% faster than 8 here)
    return tiny_unet(settings.seed + 2, settings.text_hidden_size, attention_head_dim=2)


def train_vae(vae, pixels: torch.Tensor, settings: ToyBaseSettings, log: dict) -> None:
    """Train ``vae`` in place on ``pixels`` (N, 3, H, W): MSE + 1e-4 KL; records the final MSE in ``log``."""
    generator = torch.Generator().manual_seed(settings.seed + 3)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_learning_rate, weight_decay=0.0)
    vae.train()
    with tqdm(range(settings.vae_steps), desc="toy VAE", disable=None) as bar:
        for step in bar:
            batch = pixels[torch.randint(0, len(pixels), (settings.vae_batch_size,), generator=generator)]
            posterior = vae.encode(batch).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
            reconstruction = vae.decode(latents).sample
            mse = F.mse_loss(reconstruction, batch)
            loss = mse + 1e-4 * posterior.kl().mean() / posterior.mean[0].numel()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 20 == 0:
                bar.set_postfix(mse=f"{mse.item():.4f}")
    log["vae_final_mse"] = mse.item()
    vae.eval()


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Posterior means (N, 4, h, w) of ``pixels`` (N, 3, H, W), unscaled."""
    return torch.cat([vae.encode(pixels[i : i + batch_size]).latent_dist.mean for i in range(0, len(pixels), batch_size)])


@torch.no_grad()
def embed_prompts(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Text encoder hidden states (len(prompts), 77, hidden) of the padded prompts."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def train_unet(unet, latents: torch.Tensor, prompt_ids: torch.Tensor, embeddings: torch.Tensor,
               settings: ToyBaseSettings, log: dict):
    """Epsilon-prediction pre-training on cached latents; returns the EMA copy (the model that is saved).

    ``embeddings`` holds one row per distinct prompt and a last row for the empty prompt (prompt dropout)."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup

    scheduler = DDPMScheduler.from_config(sd15_scheduler_config())
    generator = torch.Generator().manual_seed(settings.seed + 4)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.unet_learning_rate, weight_decay=1e-2)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, 50, settings.unet_steps)
    ema = copy.deepcopy(unet).requires_grad_(False)
    average = ExponentialMovingAverage(dict(ema.named_parameters()))  # updates the copy's parameters in place
    unet.train()
    empty_row = len(embeddings) - 1
    with tqdm(range(settings.unet_steps), desc="toy UNet", disable=None) as bar:
        for step in bar:
            picks = torch.randint(0, len(latents), (settings.unet_batch_size,), generator=generator)
            clean = latents[picks]
            rows = prompt_ids[picks].clone()
            rows[torch.rand(len(rows), generator=generator) < settings.prompt_dropout] = empty_row
            noise = torch.randn(clean.shape, generator=generator)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),), generator=generator)
            noisy = scheduler.add_noise(clean, noise, timesteps)
            prediction = unet(noisy, timesteps, encoder_hidden_states=embeddings[rows]).sample
            loss = F.mse_loss(prediction, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr_schedule.step()
            # the decay warms up as (1 + step) / (10 + step), as diffusers' EMAModel does, up to unet_ema_decay
            average.update(dict(unet.named_parameters()), min(settings.unet_ema_decay, (1 + step) / (10 + step)))
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    log["unet_final_loss"] = loss.item()
    return ema.eval()


def red_share(pipe, prompts: list[str], count: int, seed: int = 10_000) -> float:
    """Fraction of sampled images whose shape is red (redness > 0), with DDIM 20 steps and CFG 4."""
    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, count, 32):
        batch = [prompts[i % len(prompts)] for i in range(start, min(count, start + 32))]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
        images += pipe(batch, num_inference_steps=20, guidance_scale=4.0, generator=generators).images
    return sum(redness(image) > 0 for image in images) / len(images)


def build_toy_base(out_dir: str | Path, seed: int = 0, settings: ToyBaseSettings | None = None) -> Path:
    """Pre-train the toy VAE and UNet from ``seed`` and save a StableDiffusionPipeline folder to ``out_dir``."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    settings = settings or ToyBaseSettings(seed=seed)
    torch.manual_seed(settings.seed)
    log: dict = {"settings": asdict(settings), "version": TOY_VERSION}
    started = time.time()
    images, prompts, colours = toy_images(settings.num_images, settings.seed)
    pixels = to_tensor(images)
    log["red_share_data"] = colours.count("red") / len(colours)

    vae = toy_vae(settings)
    train_vae(vae, pixels, settings, log)
    with torch.no_grad():
        reconstructed = vae.decode(vae.encode(pixels[:256]).latent_dist.mean).sample
    colour_kept = [(float((r[0] - r[2]).mean()) > 0) == (c == "red") for r, c in zip(reconstructed, colours[:256])]
    log["vae_colour_kept"] = sum(colour_kept) / len(colour_kept)
    raw_latents = encode_latents(vae, pixels)
    scaling_factor = float(1.0 / raw_latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    log["scaling_factor"] = scaling_factor
    log["vae_seconds"] = round(time.time() - started, 1)
    logger.info(f"toy VAE: {log['vae_seconds']} s, mse {log['vae_final_mse']:.4f}, colour kept {log['vae_colour_kept']:.2f}")

    tokenizer = build_clip_tokenizer()
    text_encoder = tiny_text_encoder(settings.seed, hidden_size=settings.text_hidden_size).eval()
    distinct = toy_prompts()
    embeddings = embed_prompts(text_encoder, tokenizer, distinct + [""])
    prompt_ids = torch.tensor([distinct.index(prompt) for prompt in prompts])
    unet_started = time.time()
    unet = train_unet(toy_unet(settings), raw_latents * scaling_factor, prompt_ids, embeddings, settings, log)
    log["unet_seconds"] = round(time.time() - unet_started, 1)

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**sd15_scheduler_config()), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    log["red_share_samples"] = red_share(pipe, distinct, settings.balance_samples)
    log["total_seconds"] = round(time.time() - started, 1)
    out_dir = Path(out_dir)
    pipe.save_pretrained(str(out_dir))
    (out_dir / "toy_base.json").write_text(json.dumps(log, indent=2) + "\n")
    return out_dir
