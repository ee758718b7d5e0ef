"""Offline tiny diffusers models with random weights, one builder per checkpoint they imitate.

Each builder saves a real ``save_pretrained`` folder of the stock pipeline, so tests and demos load it through the
same ``from_pretrained`` code as a hub checkpoint:

- ``build_tiny_sd15``: SD1.5's shape (family ``sd``): epsilon prediction, a quick-GELU CLIP text encoder;
- ``build_tiny_sd2v``: SD2.x 768-v's shape (family ``sd``): v-prediction, linear-projection attention;
- ``build_tiny_sdxl``: SDXL's shape (family ``sdxl``): two CLIP text encoders, ``text_time`` conditioning;
- ``build_tiny_sd3``: SD3's shape (family ``sd3``): an MMDiT, flow matching, two CLIP encoders and T5;
- ``build_tiny_sd35``: SD3.5-medium's shape (family ``sd3``): SD3's plus dual-attention blocks and QK norm;
- ``build_tiny_flux`` / ``build_tiny_flux_schnell``: FLUX.1 [dev]'s / [schnell]'s shape (family ``flux``).

``diffalign.offline.specs`` registers them in ``TINY_MODELS`` (``tiny:sd15`` ...), built on first use and cached.
"""

from __future__ import annotations

import gzip
import string
from pathlib import Path

import torch

# diffusers, transformers and open_clip are imported in the builders: their model classes take seconds to import,
# and the registry of tiny models (the CLI's choices, ``diffalign list``) stays quick to import.

TINY_RESOLUTION = 32


# ---------------------------------------------------------------------------------------------- tokenizer
def build_clip_tokenizer(out_dir: str | Path | None = None):
    """A transformers CLIPTokenizer with the real 49,408-token CLIP vocabulary, derived from the BPE file that
    open_clip ships (so it needs no download). Saved to ``out_dir`` when given."""
    import open_clip  # heavy: only the tokenizer builders need it
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is a version header; CLIP keeps the first 48,894 merges
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [token + "</w>" for token in byte_tokens]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    merge_pairs = [tuple(merge.split()) for merge in merges]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merge_pairs, model_max_length=77)
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


# ---------------------------------------------------------------------------------------------- models
def tiny_text_encoder(seed: int, hidden_size: int = 32, hidden_act: str = "quick_gelu", with_projection: bool = False):
    """A 2-layer CLIP text encoder; ``with_projection`` gives CLIPTextModelWithProjection (SDXL's 2nd encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_act=hidden_act,
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden_size,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def tiny_vae(seed: int, **overrides):
    """A 3-block ``AutoencoderKL`` (factor 4: 8x8 latents at 32 px) with SD's scaling factor; ``overrides`` change
    its config (SD3's 16 latent channels, shift and scaling factors)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # Three blocks: an 8x downsampling VAE would leave 4x4 latents at 32 px, too small to carry structure.
    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=TINY_RESOLUTION,
        scaling_factor=0.18215,
    )
    return AutoencoderKL(**{**config, **overrides})


def build_t5_tokenizer(out_dir: str | Path | None = None):
    """A T5 tokenizer (SentencePiece-style Unigram: <pad>=0, </s>=1, <unk>=2) over single characters, built
    offline; real T5's 32k-piece vocabulary needs a download. Appends </s> like T5."""
    from transformers import T5TokenizerFast

    characters = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -2.5) for c in characters] + [(c, -3.0) for c in characters]  # word-initial first
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def tiny_t5_encoder(seed: int, vocab_size: int, d_model: int = 64):
    """A 2-layer ``T5EncoderModel`` (gated-GELU, as T5 v1.1 in SD3) of width ``d_model``."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    return T5EncoderModel(config)


def tiny_unet(seed: int, cross_attention_dim: int = 32, **overrides):
    """The tiny 2-block UNet every tiny UNet model starts from (8x8 latents); ``overrides`` give each its shape."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = dict(
        sample_size=TINY_RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return UNet2DConditionModel(**{**config, **overrides})


def sd15_scheduler_config() -> dict:
    """The noise schedule of SD1.5 (scaled-linear betas, 1000 steps, epsilon prediction)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def save_tiny_sd_pipeline(out_dir: str | Path, seed: int, hidden_act: str, prediction_type: str,
                          **unet_overrides) -> Path:
    """A tiny StableDiffusionPipeline with random weights saved to ``out_dir``: the SD1.x / SD2.x shape."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    text_encoder = tiny_text_encoder(seed, hidden_act=hidden_act)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed + 1),
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        unet=tiny_unet(seed + 2, text_encoder.config.hidden_size, **unet_overrides),
        scheduler=DDIMScheduler(**{**sd15_scheduler_config(), "prediction_type": prediction_type}),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out_dir))
    return Path(out_dir)


def build_tiny_sd15(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny SD1.5-shaped pipeline: epsilon prediction, a quick-GELU CLIP text encoder."""
    return save_tiny_sd_pipeline(out_dir, seed, hidden_act="quick_gelu", prediction_type="epsilon")


def build_tiny_sd2v(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny SD2.x-768-v-shaped pipeline: v-prediction scheduler, linear-projection attention with per-block head
    counts, and a GELU text encoder (OpenCLIP's activation, as in SD2's text encoder)."""
    return save_tiny_sd_pipeline(out_dir, seed, hidden_act="gelu", prediction_type="v_prediction",
                                 attention_head_dim=(2, 4), use_linear_projection=True)


def build_tiny_sdxl(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny SDXL-shaped StableDiffusionXLPipeline: two CLIP text encoders (the 2nd with a projection, whose
    pooled output and 6 micro-conditioning ids feed the UNet's ``text_time`` embedding), cross-attention over
    both encoders' hidden states concatenated, linear-projection attention with per-block transformer depth."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    text_encoder = tiny_text_encoder(seed)  # CLIP ViT-L's role: quick_gelu, hidden states only
    text_encoder_2 = tiny_text_encoder(seed + 3, hidden_act="gelu", with_projection=True)  # OpenCLIP bigG's role
    time_embed_dim = 8
    unet = tiny_unet(
        seed + 2,
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # 6 time ids (original size, crop top-left, target size), each embedded, plus the pooled text embedding
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim,
    )
    tokenizer = build_clip_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(seed + 1),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        # DDIM with SD's scaled-linear betas (SDXL ships the same betas with an Euler sampler)
        scheduler=DDIMScheduler(**sd15_scheduler_config()),
        force_zeros_for_empty_prompt=True,  # as in SDXL base 1.0's model_index.json
        add_watermarker=False,
    )
    pipe.save_pretrained(str(out_dir))
    return Path(out_dir)


def build_tiny_sd3(out_dir: str | Path, seed: int = 0, with_t5: bool = True, **transformer_overrides) -> Path:
    """A tiny SD3-shaped StableDiffusion3Pipeline: an MMDiT (SD3Transformer2DModel, patch size 2, joint text-image
    attention), a 16-channel VAE with SD3's shift and scaling factors, two CLIP encoders with projections, a T5
    encoder (``with_t5=False`` leaves it out, as the pipeline allows) and the flow-matching Euler scheduler with
    SD3's shift 3. ``transformer_overrides`` change the transformer's config (SD3.5's dual attention)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    text_encoder = tiny_text_encoder(seed, with_projection=True)  # CLIP ViT-L's role
    text_encoder_2 = tiny_text_encoder(seed + 3, hidden_act="gelu", with_projection=True)  # OpenCLIP bigG's role
    clip_width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    t5_tokenizer = build_t5_tokenizer()
    t5 = tiny_t5_encoder(seed + 4, len(t5_tokenizer), d_model=clip_width) if with_t5 else None
    torch.manual_seed(seed + 2)
    transformer = SD3Transformer2DModel(
        sample_size=TINY_RESOLUTION // 4,  # 8x8 latents
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=clip_width,  # T5's width; the CLIP states are zero-padded to it
        caption_projection_dim=32,  # = heads x head dim
        pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
        pos_embed_max_size=16,
        **transformer_overrides,
    )
    tokenizer = build_clip_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=tiny_vae(seed + 1, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer if with_t5 else None,
    )
    pipe.save_pretrained(str(out_dir))
    return Path(out_dir)


def build_tiny_sd35(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny SD3.5-medium-shaped pipeline: SD3's, with a second, image-only attention (``attn2``) in the first
    block (SD3.5-medium's ``dual_attention_layers`` are blocks 0-12) and RMS QK normalisation."""
    return build_tiny_sd3(out_dir, seed, dual_attention_layers=(0,), qk_norm="rms_norm")


def build_tiny_flux(out_dir: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A tiny FLUX.1-[dev]-shaped FluxPipeline: double- and single-stream blocks (``FluxTransformer2DModel``,
    2x2-packed 16-channel latents: 64 input channels), the embedded guidance value, rotary position axes, a
    16-channel VAE with FLUX's shift and scaling factors and no quant convs, CLIP (pooled output) and T5, and the
    flow-matching Euler scheduler with dynamic (resolution-dependent) shifting, as in FLUX.1-dev's config.
    ``guidance_embeds=False`` gives [schnell]'s shape: no guidance input, a static shift of 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    text_encoder = tiny_text_encoder(seed)  # CLIP ViT-L's role: only its pooled output is used
    t5_tokenizer = build_t5_tokenizer()
    t5 = tiny_t5_encoder(seed + 4, len(t5_tokenizer), d_model=32)
    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=t5.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),  # sums to the head dim, as (16, 56, 56) does to 128
    )
    if guidance_embeds:  # FLUX.1-dev's scheduler_config.json
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                    base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                    max_image_seq_len=4096)
    else:  # FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=tiny_vae(seed + 1, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                     use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
    )
    pipe.save_pretrained(str(out_dir))
    return Path(out_dir)


def build_tiny_flux_schnell(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny FLUX.1-[schnell]-shaped pipeline (``build_tiny_flux`` without the guidance embedding)."""
    return build_tiny_flux(out_dir, seed, guidance_embeds=False)
