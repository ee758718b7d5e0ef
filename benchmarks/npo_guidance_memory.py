"""Memory of NPO-guided sampling: one model with per-branch LoRA switching vs the authors' two model copies.

    python benchmarks/npo_guidance_memory.py                      # SD1.5-sized UNet (random weights), CPU
    python benchmarks/npo_guidance_memory.py --size tiny          # the tiny test model, seconds
    python benchmarks/npo_guidance_memory.py --steps 3 --resolution 128 --guidance-scale 7.5 --merge-weight 0

Diffusion-NPO guidance runs the conditional CFG branch with theta_pos = base + positive LoRA and the negative
branch with theta_neg = base + NPO LoRA + (1 - m) * positive LoRA. Three modes, each in its own fresh process
(so every peak is that mode's own), on the same base, LoRAs, prompt, seed, scheduler (the checkpoint's DDIM),
guidance scale, steps and latent size:

- "two models" (the baseline, as the authors do it): two copies of the denoiser, each with its LoRA(s) loaded
  as stock diffusers adapters (``load_lora_weights`` + ``set_adapters``), fused (``fuse_lora``) and unloaded,
  driven by a hand-written CFG loop ``eps = eps_neg + s * (eps_pos - eps_neg)``.
- "one model + adapter switching" (ours): ``load_pipeline(base, lora=POS, npo=NPO)`` and one pipeline call
  (``output_type="latent"``); both LoRAs stay unfused on one copy of the base and are switched per branch.
- "base only": ``load_pipeline(base)`` without LoRAs and one pipeline call: the floor.

Reported per mode: the bytes of denoiser parameters held (unique tensors over the denoiser copies, LoRA
included), the process's peak RSS over its whole life (``ru_maxrss``: loading included), the peak RSS during
sampling only (VmHWM reset through /proc/self/clear_refs after loading, where the kernel allows it), the CUDA
peak allocated when run on a GPU, and seconds per sampling call (the last of ``--calls`` calls). Ratios are
against the two-model baseline of the same run. The final latents of ours and of the baseline are compared:
they must agree up to fused-vs-unfused float rounding, which shows both compute the same guidance.

``--size sd15`` builds once (cached under $DIFFALIGN_CACHE/bench/) a diffusers StableDiffusionPipeline folder
whose UNet has the real SD1.5 UNet2DConditionModel config with random weights (~860M parameters), a 2-layer
CLIP text encoder of width 768, the tiny VAE (4x downsampling: --resolution 128 gives 32x32 latents) and the
SD1.5 DDIM scheduler; it is loaded through ``load_pipeline`` like a real checkpoint. The two
LoRAs are random, rank 8 on to_q/to_k/to_v/to_out.0 (the authors' SD1.5 setting), saved as training saves them.
fp32 throughout. ``--size tiny`` uses ``tiny:sd15`` with rank-8 random LoRAs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red square on a grey background"
SEED = 0
LORA_RANK = 8
LORA_STD = 0.02
MODES = {
    "two_models": "two models (authors' approach, baseline)",
    "ours": "one model + adapter switching (ours)",
    "base": "base only (one model, no LoRA)",
}
DEFAULT_RESOLUTION = {"sd15": 128, "tiny": 32}


# ---------------------------------------------------------------------------------------------- assets
def bench_dir(size: str) -> Path:
    from diffalign.paths import cache_root

    return cache_root() / "bench" / f"npo-guidance-{size}"


def build_sd15_random(out_dir: Path, seed: int = 0) -> None:
    """A StableDiffusionPipeline folder: the real SD1.5 UNet config with random weights, a small CLIP text encoder
    of width 768, the tiny VAE and the SD1.5 DDIM scheduler."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffalign.offline.models import build_clip_tokenizer, sd15_scheduler_config, tiny_vae

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12,
        max_position_embeddings=77, projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(  # runwayml/stable-diffusion-v1-5 unet/config.json
        sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
        freq_shift=0, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                        "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
        act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed + 1), text_encoder=text_encoder, tokenizer=build_clip_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(**sd15_scheduler_config()), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out_dir))


def build_random_loras(base: str, out_dirs: dict[str, Path], seed: int = 1) -> None:
    """Random rank-8 LoRAs (one per out dir) on the base's denoiser, saved as training saves them."""
    import torch
    from diffusers import UNet2DConditionModel

    from diffalign.config import LoraConfig
    from diffalign.families import detect_family
    from diffalign.training.lora import attach_lora, save_lora

    family = detect_family(base)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder=family.denoiser_subfolder)
    attach_lora(unet, LoraConfig(rank=LORA_RANK, alpha=LORA_RANK), family.default_lora_targets)
    for index, out_dir in enumerate(out_dirs.values()):
        torch.manual_seed(seed + index)
        with torch.no_grad():
            for name, param in unet.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, LORA_STD)
        save_lora(family, unet, out_dir)


def prepare(size: str) -> dict[str, str]:
    """Paths of the base and of the two LoRAs, built on first use (atomically, so a killed build leaves nothing)."""
    from diffalign.offline.specs import resolve_model_spec
    from diffalign.paths import build_atomically

    root = bench_dir(size)
    if size == "sd15":
        base = str(build_atomically(root / "base", build_sd15_random))
    else:
        base = resolve_model_spec("tiny:sd15")
    loras = {name: root / f"lora-r{LORA_RANK}" / name for name in ("pos", "npo")}
    if not all(path.exists() for path in loras.values()):
        def build(tmp: Path) -> None:
            build_random_loras(base, {name: tmp / name for name in loras})
        build_atomically(root / f"lora-r{LORA_RANK}", build)
    return {"base": base, **{name: str(path) for name, path in loras.items()}}


# ---------------------------------------------------------------------------------------------- measuring
def current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def param_bytes(*modules) -> int:
    seen, total = set(), 0
    for module in modules:
        for param in module.parameters():
            key = (param.data_ptr(), param.numel(), param.dtype)
            if key not in seen:
                seen.add(key)
                total += param.numel() * param.element_size()
    return total


def load_two_models(paths: dict, merge_weight: float):
    """The authors' setup: a positive copy (base + pos, fused) and a negative copy (base + npo + (1-m) pos, fused)."""
    from diffusers import DiffusionPipeline

    from diffalign.training.lora import LORA_WEIGHT_NAME

    pipe_pos = DiffusionPipeline.from_pretrained(paths["base"])
    # The second pipeline shares text encoder, VAE, tokenizer and scheduler: only its UNet is a second copy.
    shared = {name: getattr(pipe_pos, name) for name in ("text_encoder", "vae", "tokenizer", "scheduler")}
    pipe_neg = DiffusionPipeline.from_pretrained(paths["base"], **shared)
    pipe_pos.load_lora_weights(paths["pos"], weight_name=LORA_WEIGHT_NAME, adapter_name="positive")
    pipe_pos.fuse_lora(components=["unet"], adapter_names=["positive"])
    pipe_pos.unload_lora_weights()
    adapters = {"npo": 1.0, "positive": 1.0 - merge_weight}
    adapters = {name: weight for name, weight in adapters.items() if weight != 0.0}
    for name in adapters:
        pipe_neg.load_lora_weights(paths["pos" if name == "positive" else "npo"], weight_name=LORA_WEIGHT_NAME,
                                   adapter_name=name)
    pipe_neg.set_adapters(list(adapters), list(adapters.values()))
    pipe_neg.fuse_lora(components=["unet"], adapter_names=list(adapters))
    pipe_neg.unload_lora_weights()
    return pipe_pos, pipe_neg


def two_model_sample(pipe_pos, unet_neg, args, device):
    """A hand-written CFG loop over two denoisers, step for step what StableDiffusionPipeline does."""
    import torch

    unet_pos, scheduler = pipe_pos.unet, pipe_pos.scheduler
    with torch.no_grad():
        prompt_embeds, negative_embeds = pipe_pos.encode_prompt(PROMPT, device, 1, True)
        scheduler.set_timesteps(args.steps, device=device)
        generator = torch.Generator("cpu").manual_seed(SEED)
        latents = pipe_pos.prepare_latents(1, unet_pos.config.in_channels, args.resolution, args.resolution,
                                           prompt_embeds.dtype, device, generator)
        extra = pipe_pos.prepare_extra_step_kwargs(generator, 0.0)
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            eps_neg = unet_neg(model_input, t, encoder_hidden_states=negative_embeds).sample
            eps_pos = unet_pos(model_input, t, encoder_hidden_states=prompt_embeds).sample
            eps = eps_neg + args.guidance_scale * (eps_pos - eps_neg)
            latents = scheduler.step(eps, t, latents, **extra).prev_sample
    return latents


def child(args) -> None:
    import torch
    from diffusers.utils import logging as diffusers_logging
    from safetensors.torch import save_file

    from diffalign.guidance.pipeline import load_pipeline

    diffusers_logging.disable_progress_bar()
    paths = json.loads(args.paths)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    if args.mode == "two_models":
        pipe_pos, pipe_neg = load_two_models(paths, args.merge_weight)
        pipe_pos.to(device)
        pipe_neg.unet.to(device)
        denoisers = [pipe_pos.unet, pipe_neg.unet]
        sample = lambda: two_model_sample(pipe_pos, pipe_neg.unet, args, device)  # noqa: E731
    else:
        lora_args = {"lora": paths["pos"], "npo": paths["npo"], "npo_merge_weight": args.merge_weight}
        pipe = load_pipeline(paths["base"], **(lora_args if args.mode == "ours" else {}), device=device)
        pipe.set_progress_bar_config(disable=True)
        denoisers = [pipe.unet]
        sample = lambda: pipe(  # noqa: E731
            PROMPT, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, height=args.resolution,
            width=args.resolution, generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent",
        ).images
    load_s = time.perf_counter() - started
    rss_loaded = current_rss()
    reset_ok = reset_peak_rss()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(args.calls):
        started = time.perf_counter()
        latents = sample()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    save_file({"latents": latents.detach().cpu().contiguous()}, args.latents)
    result = {
        "param_bytes": param_bytes(*denoisers),
        "rss_loaded": rss_loaded,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_sampling": peak_rss_since_reset() if reset_ok else None,
        "cuda_peak": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "seconds_per_call": seconds[-1],
        "load_s": load_s,
        "latent_shape": list(latents.shape),
    }
    Path(args.result).write_text(json.dumps(result))


def child_command(args, *extra: str) -> list[str]:
    return [sys.executable, __file__, "--child", "--size", args.size, "--steps", str(args.steps),
            "--resolution", str(args.resolution), "--guidance-scale", str(args.guidance_scale),
            "--merge-weight", str(args.merge_weight), "--calls", str(args.calls), *extra]


def child_env() -> dict:
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error"}


def run_mode(mode: str, args, paths: dict, workdir: Path) -> dict:
    result, latents = workdir / f"{mode}.json", workdir / f"{mode}.safetensors"
    command = child_command(args, "--mode", mode, "--paths", json.dumps(paths), "--result", str(result),
                            "--latents", str(latents))
    subprocess.run(command, check=True, env=child_env())
    return {**json.loads(result.read_text()), "latents_path": str(latents)}


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} CPU cores, torch {torch.__version__}"


def mib(value) -> str:
    if value is None:
        return "n/a"
    return f"{value / 2**20:,.0f}" if abs(value) >= 10 * 2**20 else f"{value / 2**20:.2f}"


def ratio(value, base) -> str:
    return "n/a" if value is None or not base else f"{value / base:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "sd15"), default="sd15")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=None,
                        help="pixels; the tiny VAE downsamples 4x (default: 128 for sd15, 32 for tiny)")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--merge-weight", type=float, default=0.0, help="m in theta_neg = base + npo + (1-m) pos")
    parser.add_argument("--calls", type=int, default=2, help="sampling calls per mode; the last one is timed")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=tuple(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--latents", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.resolution = args.resolution or DEFAULT_RESOLUTION[args.size]
    if args.child and args.prepare:
        Path(args.result).write_text(json.dumps(prepare(args.size)))
        return
    if args.child:
        return child(args)

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()  # building in a child keeps the parent small and the builds out of the rows
        subprocess.run(child_command(args, "--prepare", "--result", str(workdir / "paths.json")), check=True,
                       env=child_env())
        prepare_s = time.perf_counter() - started
        paths = json.loads((workdir / "paths.json").read_text())
        rows = {mode: run_mode(mode, args, paths, workdir) for mode in MODES}
        ours_latents, two_latents, base_latents = (load_file(rows[m]["latents_path"])["latents"]
                                                   for m in ("ours", "two_models", "base"))

    baseline = rows["two_models"]
    cuda = baseline["cuda_peak"] is not None
    latent_side = rows["ours"]["latent_shape"][-1]
    print(f"\nNPO-guided sampling memory, --size {args.size}: {args.steps} DDIM steps, CFG {args.guidance_scale}, "
          f"merge weight {args.merge_weight}, {args.resolution}px ({latent_side}x{latent_side} latents), fp32, "
          f"rank-{LORA_RANK} LoRAs; machine: {machine()}\n")
    columns = ["mode", "denoiser weights (MiB)", "peak RSS (MiB)", "peak RSS while sampling (MiB)"]
    columns += ["CUDA peak allocated (MiB)"] if cuda else []
    columns += ["s / sampling call", "weights vs two models", "peak RSS vs two models",
                "sampling RSS vs two models"] + (["CUDA peak vs two models"] if cuda else [])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for mode, label in MODES.items():
        row = rows[mode]
        cells = [label, mib(row["param_bytes"]), mib(row["peak_rss"]), mib(row["peak_rss_sampling"])]
        cells += [mib(row["cuda_peak"])] if cuda else []
        cells += [f"{row['seconds_per_call']:.2f}", ratio(row["param_bytes"], baseline["param_bytes"]),
                  ratio(row["peak_rss"], baseline["peak_rss"]),
                  ratio(row["peak_rss_sampling"], baseline["peak_rss_sampling"])]
        cells += [ratio(row["cuda_peak"], baseline["cuda_peak"])] if cuda else []
        print("| " + " | ".join(cells) + " |")

    parts = []
    for mode in ("ours", "two_models"):
        weights = rows[mode]["param_bytes"] - rows["base"]["param_bytes"]
        part = f"{MODES[mode].split(' (')[0]} +{mib(weights)} MiB weights"
        if rows[mode]["peak_rss_sampling"] is not None and rows["base"]["peak_rss_sampling"] is not None:
            part += f", {(rows[mode]['peak_rss_sampling'] - rows['base']['peak_rss_sampling']) / 2**20:+,.0f} MiB RSS"
        parts.append(part)
    print("\nabove base only: " + "; ".join(parts))
    scale = two_latents.abs().max().item()
    diff = (ours_latents - two_latents).abs().max().item()
    base_diff = (base_latents - two_latents).abs().max().item()
    print(f"same guidance: max |ours - two models| = {diff:.2e} on latents of max |x| = {scale:.2f} "
          f"(fused vs unfused LoRA rounding; for scale, base-only differs from two models by {base_diff:.2e})")
    print("load time (s): " + ", ".join(f"{mode} {rows[mode]['load_s']:.1f}" for mode in MODES)
          + f"; one-time build / cache check of base and LoRAs: {prepare_s:.1f} s")
    print("peak RSS includes loading; 'while sampling' is the peak after loading finished (VmHWM reset).")


if __name__ == "__main__":
    main()
