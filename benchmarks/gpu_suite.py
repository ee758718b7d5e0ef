"""The GPU suite: one prepared script for what needs a GPU, real configs with random weights, one table.

    python benchmarks/gpu_suite.py            # one H100 / H200: about 8 minutes, builds its checkpoints once
    python benchmarks/gpu_suite.py --quick    # CPU smoke test on the tiny models (tests/test_gpu_suite.py)

Sections, each measured in fresh processes (so every memory peak is that run's own), ratios against a baseline
of the same run:

1. SD1.5 LoRA DPO throughput: 512 px, bf16, LoRA rank 8, 8 pairs per step, SD1.5's real UNet, VAE and CLIP
   text encoder configs. Uncached (the VAE and the text encoder run every step, as diffusers'
   ``research_projects/diffusion_dpo`` script does) against cached, cached + ``train.compile=blocks`` (its graph
   count shown, so a silent fallback to eager shows) and cached + compile + ``train.attention=xformers`` (where
   xformers is installed). The ceiling: a pair costs about 6 UNet-forward equivalents (policy forward and, for a
   LoRA, input-gradient backward on two images; reference forward on two), each forward's FLOPs counted here by
   ``torch.utils.flop_counter`` on the real config at 512 px (about 0.80 TFLOP: 4.8 TFLOP per pair), divided into
   the GPU's dense bf16 peak (989 TFLOP/s for H100 SXM and H200, 756 for H100 PCIe; ``--peak-tflops`` for
   others): about 205 pairs/s on an H100 SXM. Each row's share of it is printed.
2. SDXL LoRA DPO memory: 1024 px, 1 pair, LoRA + gradient checkpointing + an fp16-safe VAE (the SDXL VAE config
   with ``force_upcast`` off, as madebyollin/sdxl-vae-fp16-fix), bf16: the run's peak CUDA memory, allocated and
   reserved (what a card must hold, the CUDA context aside), with a bf16 frozen base, an int8 one (torchao) and an
   nf4 one (bitsandbytes, where installed). Quantised bases reach the GPU layer by layer, so the peaks are the
   quantised model's.
3. NPO-guided sampling: one model with adapter switching against two model copies (``npo_guidance_memory.py``).
4. Reward scoring: batched against one image at a time (``score_throughput.py``, tiny random-weight rewards
   unless ``--score-weights NAME=PATH`` gives real ones).

``--quick`` runs sections 1 and 2 on ``tiny:sd15`` / ``tiny:sdxl`` at their native size in fp32 (no compile
rows: the compiled path is tested in tests/test_speed.py), section 3 with ``--size tiny`` and section 4 on 8
images. ``--sections 2,3`` reruns some sections; the checkpoints are built once (fp16 files, about 8 GB for both)
under $DIFFALIGN_CACHE/bench/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_throughput import machine  # this folder is on sys.path when a script here runs

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
FORWARDS_PER_PAIR = 6  # policy forward + LoRA backward (input gradients) on 2 images, reference forward on 2
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


# ---------------------------------------------------------------------------------------------- checkpoints
def clip_text_config(hidden: int, layers: int, heads: int, intermediate: int, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                          hidden_act=act, projection_dim=hidden, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407)


def sd_vae(scaling_factor: float, force_upcast: bool):
    from diffusers import AutoencoderKL

    return AutoencoderKL(  # stable-diffusion-v1-5 / sdxl-base vae/config.json
        in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), scaling_factor=scaling_factor, force_upcast=force_upcast)


def build_sd15(out_dir: Path) -> None:
    """SD1.5's real UNet, VAE and CLIP ViT-L/14 text encoder configs, random weights, saved as a pipeline."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from diffalign.offline.models import build_clip_tokenizer, sd15_scheduler_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)
    StableDiffusionPipeline(
        vae=sd_vae(0.18215, True), text_encoder=CLIPTextModel(clip_text_config(768, 12, 12, 3072)),
        tokenizer=build_clip_tokenizer(), unet=unet, scheduler=DDIMScheduler(**sd15_scheduler_config()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(dtype=torch.float16).save_pretrained(str(out_dir))  # half the bytes to write and read; trained in bf16


def build_sdxl(out_dir: Path) -> None:
    """SDXL base 1.0's real UNet and text encoder configs (CLIP ViT-L and OpenCLIP bigG), random weights, plus an
    fp16-safe VAE folder (``vae-fp16``) for ``model.vae``."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from diffalign.offline.models import build_clip_tokenizer, sd15_scheduler_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    tokenizer = build_clip_tokenizer()
    StableDiffusionXLPipeline(
        vae=sd_vae(0.13025, True), text_encoder=CLIPTextModel(clip_text_config(768, 12, 12, 3072)),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(1280, 32, 20, 5120, "gelu")),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=DDIMScheduler(**sd15_scheduler_config()),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    ).to(dtype=torch.float16).save_pretrained(str(out_dir))
    sd_vae(0.13025, False).to(dtype=torch.float16).save_pretrained(str(out_dir / "vae-fp16"))


def checkpoint(name: str) -> str:
    """The folder of a benchmark checkpoint, built on first use under $DIFFALIGN_CACHE/bench/."""
    from diffalign.paths import build_atomically, cache_root

    build = {"sd15": build_sd15, "sdxl": build_sdxl}[name]
    return str(build_atomically(cache_root() / "bench" / f"gpu-suite-{name}", build))


# ---------------------------------------------------------------------------------------------- training runs
def train_run(workdir: Path, name: str, steps: int, batch: int, overrides: list[str]) -> dict:
    """One ``train_throughput.py`` child (a real ``train()`` in a fresh process): seconds per step, peak memory."""
    result = workdir / f"{name}.json"
    mode = "uncached" if "data.cache=false" in overrides else "cached"
    command = [sys.executable, str(BENCH / "train_throughput.py"), "--child", "--mode", mode,
               "--out", str(workdir / name), "--result", str(result), "--cache-dir", str(workdir / "cache"),
               "--steps", str(steps), "--batch-size", str(batch), *overrides]
    started = time.time()
    completed = subprocess.run(command, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True,
                               text=True)
    if completed.returncode:
        return {"error": (completed.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return {**json.loads(result.read_text()), "wall_s": time.time() - started}


def forward_tflop(base: str, resolution: int) -> float:
    """TFLOP of one UNet forward of ``base`` at ``resolution`` px, counted on the meta device (no memory)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    import diffalign.offline  # noqa: F401  (registers tiny:)
    from diffalign.families import resolve_pretrained

    config = UNet2DConditionModel.load_config(resolve_pretrained(base), subfolder="unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        side = resolution // 8 if resolution >= 256 else unet.config.sample_size
        inputs = (torch.randn(1, 4, side, side), torch.tensor([500]))
        text = torch.randn(1, 77, unet.config.cross_attention_dim)
        with FlopCounterMode(display=False) as counter:
            unet(*inputs, encoder_hidden_states=text)
    return counter.get_total_flops() / 1e12


def ceiling(args, forward: float, cuda: bool) -> tuple[float | None, str]:
    """(pairs/s at the GPU's dense bf16 peak, how it was found); None without a known peak."""
    import torch

    peak = args.peak_tflops
    if peak is None and cuda:
        name = torch.cuda.get_device_name(0)
        peak = next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)
    if peak is None:
        return None, "no bf16 peak known for this device (--peak-tflops)"
    per_pair = FORWARDS_PER_PAIR * forward
    return peak / per_pair, f"{peak:.0f} TFLOP/s / ({FORWARDS_PER_PAIR} x {forward:.3f} TFLOP per forward)"


def throughput_section(args, workdir: Path, cuda: bool) -> list[str]:
    base = "tiny:sd15" if args.quick else checkpoint("sd15")
    common = [f"model.pretrained={base}", "lora.rank=8", "lora.alpha=8",
              f"train.mixed_precision={'bf16' if cuda else 'no'}", "data.num_workers=0",
              *([] if args.quick else ["model.resolution=512"])]
    steps, batch = (3, 2) if args.quick else (args.steps, 8)
    limit, how = ceiling(args, forward_tflop(base, 32 if args.quick else 512), cuda)
    train_run(workdir, "warm-cache", 1, batch, common)  # builds the feature cache once, outside the timings
    modes = {"uncached (the reference's per-step work)": ["data.cache=false"], "cached": []}
    if not args.quick:
        modes["cached + compile"] = ["train.compile=blocks"]
        if cuda and importlib.util.find_spec("xformers") is not None:
            modes["cached + compile + xformers"] = ["train.compile=blocks", "train.attention=xformers"]
    rows = {label: train_run(workdir, f"sd15-{i}", steps, batch, common + extra)
            for i, (label, extra) in enumerate(modes.items())}
    baseline = rows[next(iter(rows))]
    lines = [f"### 1. SD1.5 LoRA DPO throughput ({base if args.quick else 'SD1.5 configs, random weights'}, "
             f"{'native size, fp32' if args.quick else '512 px, bf16'}, {batch} pairs per step, {steps} steps)", "",
             f"ceiling: {f'{limit:.0f} pairs/s' if limit else 'n/a'} ({how})", "",
             "| mode | pairs/s | vs uncached | share of the ceiling | compiled graphs | peak memory (MiB) |",
             "|---|---|---|---|---|---|"]
    for label, row in rows.items():
        if "error" in row:
            lines.append(f"| {label} | failed: {row['error']} | | | | |")
            continue
        rate = row["batch_size"] / row["seconds_per_step"]
        base_rate = baseline["batch_size"] / baseline["seconds_per_step"] if "error" not in baseline else float("nan")
        share = f"{100 * rate / limit:.1f}%" if limit else "n/a"
        graphs = row.get("compile_graphs")
        lines.append(f"| {label} | {rate:.2f} | {rate / base_rate:.2f}x | {share} | "
                     f"{'' if graphs is None else int(graphs)} | {row['peak_bytes'] / 2**20:.0f} |")
    if not args.quick and "cached + compile + xformers" not in rows:
        lines.append("| cached + compile + xformers | n/a: xformers not installed or no CUDA | | | | |")
    return lines


def memory_section(args, workdir: Path, cuda: bool) -> list[str]:
    if args.quick:
        base, vae, extra = "tiny:sdxl", [], []
    else:
        folder = checkpoint("sdxl")
        base, vae, extra = folder, [f"model.vae={folder}/vae-fp16"], ["model.resolution=1024"]
    precision = "bf16" if cuda else "no"
    common = [f"model.pretrained={base}", *vae, *extra, "train.gradient_checkpointing=true", "lora.rank=8",
              f"train.mixed_precision={precision}", "data.num_workers=0"]
    plain = "bf16 base" if cuda else "fp32 base"
    modes = {plain: [], "int8 base (torchao)": ["model.quantize=int8"]}
    if cuda and importlib.util.find_spec("bitsandbytes") is not None:
        modes["nf4 base (bitsandbytes)"] = ["model.quantize=nf4"]
    train_run(workdir, "sdxl-warm", 1, 1, common)
    rows = {label: train_run(workdir, f"sdxl-{i}", 2, 1, common + flags) for i, (label, flags) in enumerate(modes.items())}
    baseline = rows[plain]
    kind = "CUDA allocated / reserved" if cuda else "RSS"
    lines = [f"### 2. SDXL LoRA DPO memory ({'tiny:sdxl' if args.quick else 'SDXL configs, random weights, 1024 px'}, "
             "1 pair, gradient checkpointing)", "", f"| frozen base | peak {kind} (MiB) | vs {plain} | s/step |",
             "|---|---|---|---|"]
    for label, row in rows.items():
        if "error" in row:
            lines.append(f"| {label} | failed: {row['error']} | | |")
            continue
        share = row["peak_bytes"] / baseline["peak_bytes"] if "error" not in baseline else float("nan")
        peak = f"{row['peak_bytes'] / 2**20:.0f}"
        if cuda:
            peak += f" / {row['peak_reserved_bytes'] / 2**20:.0f}"
        lines.append(f"| {label} | {peak} | {share:.2f}x | {row['seconds_per_step']:.2f} |")
    return lines


def script_section(title: str, command: list[str]) -> list[str]:
    completed = subprocess.run([sys.executable, *command], capture_output=True, text=True,
                               env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    table = [line for line in completed.stdout.splitlines() if line.startswith("|")]
    if completed.returncode or not table:
        return [title, "", f"failed: {(completed.stderr.strip().splitlines() or ['no table'])[-1][:160]}"]
    return [title, "", *table]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke test on the tiny models")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per SD1.5 mode")
    parser.add_argument("--sections", default="1,2,3,4", help="which sections to run, e.g. 2,3")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 TFLOP/s, for the ceiling (default: known H100 / H200 / A100)")
    parser.add_argument("--score-weights", action="append", default=[], metavar="NAME=PATH",
                        help="real reward weights for section 4 (else tiny random-weight rewards)")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    started = time.time()
    print(f"diffalign GPU suite{' (--quick)' if args.quick else ''}, machine: {machine()}\n")
    wanted = {int(part) for part in args.sections.split(",") if part.strip()}
    sections = []

    def emit(lines: list[str]) -> None:  # printed as it finishes: a run cut short still shows what it measured
        sections.append(lines)
        print("\n".join(lines), end="\n\n", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if 1 in wanted:
            emit(throughput_section(args, workdir, cuda))
        if 2 in wanted:
            emit(memory_section(args, workdir, cuda))
    if 3 in wanted:
        npo = ["--size", "tiny", "--steps", "2"] if args.quick else ["--size", "sd15", "--resolution", "512",
                                                                     "--steps", "25"]
        emit(script_section("### 3. NPO-guided sampling (one model + adapter switching vs two models)",
                            [str(BENCH / "npo_guidance_memory.py"), *npo]))
    if 4 in wanted:
        score = ["--images", "8", "--batch-size", "4"] if args.quick else ["--images", "256", "--image-size", "512"]
        for weights in args.score_weights:
            score += ["--weights", weights]
        emit(script_section("### 4. Reward scoring (batched vs one image per call)",
                            [str(BENCH / "score_throughput.py"), *score]))
    print(f"total {time.time() - started:.0f} s")
    failed = any("failed" in line for lines in sections for line in lines)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
