"""Data at Pick-a-Pic scale: read, cache and train on Pick-a-Pic-schema sets of growing size, with 1 and 2 processes.

    python benchmarks/data_scale.py --out /tmp/data_scale                  # 1k, 4k and 16k rows; 1 and 2 processes
    python benchmarks/data_scale.py --out /tmp/ds --sizes 200,400 --processes 1   # a quick look

For each size it writes (once, offline) a parquet in the Pick-a-Pic schema: ``caption``, ``jpg_0``, ``jpg_1``
(512-px JPEG pairs), ``label_0`` (12% ties), ``label_1`` and ``are_different`` (1% identical). Then for each
process count it runs ``scripts/train.py`` (through ``accelerate launch`` for several processes) on ``tiny:sd15``
at ``model.resolution=512`` for 20 steps, with a fresh feature cache and ``datasets`` cache (so the parquet's
conversion to Arrow is part of the run, as it is for a user's first run), and reads back ``run_info.json``:

- time to first step (from the process's start: model, check pass, cache build, first step);
- images per second cached (all processes together), the check pass's seconds, the cache's bytes;
- peak RSS of each training process (its DataLoader workers are forked from it and share its pages, so their RSS
  counts those pages again: ``run_info.json`` has it as ``peak_rss_mb_workers``);
- each process's share of the images it encoded.

The VAE is swapped (``model.vae``) for a random-weight one with SD1.5's latent grid (factor 8, 4 channels) and
almost no width: ``tiny:sd15``'s own VAE has a factor of 4 and mid-block attention, which at 512 px costs about
2.7 s an image on a CPU core, so 16k rows would take two days. What this measures is the data path (reading,
decoding, cache writing, memory); the VAE's cost on a real model is the model's, and on a GPU it is small.

Last, it projects Pick-a-Pic v2 (959k rows) at 1, 8 and 64 processes from the measured per-image cost, marked as
a projection, with the cache bytes of SD1.5- and SDXL-size latents. Set ``OMP_WAIT_POLICY=PASSIVE`` when other
work shares the machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
PICKAPIC_V2_ROWS = 959_000
SIDE = 512


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"


def picture(rng: random.Random) -> bytes:
    """A 512-px JPEG of a colour gradient with shapes and grain: about the size of a Pick-a-Pic image."""
    top, bottom = [rng.randrange(256) for _ in range(3)], [rng.randrange(256) for _ in range(3)]
    ramp = np.linspace(0.0, 1.0, SIDE)[:, None, None]
    array = (np.array(top) * (1 - ramp) + np.array(bottom) * ramp).repeat(SIDE, axis=1)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 12, (SIDE, SIDE, 3))
    image = Image.fromarray(np.clip(array + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y, r = rng.randrange(SIDE), rng.randrange(SIDE), rng.randrange(20, 160)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_pickapic(path: Path, rows: int, seed: int = 0) -> Path:
    """A Pick-a-Pic-schema parquet of ``rows`` rows, written in row groups of 256 (memory stays flat)."""
    if path.is_file():
        return path
    rng = random.Random(seed)
    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64()), ("label_1", pa.float64()), ("are_different", pa.bool_())])
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, rows, 256):
            count = min(256, rows - start)
            labels = [0.5 if rng.random() < 0.12 else float(rng.random() < 0.5) for _ in range(count)]
            writer.write_table(pa.table({
                "caption": [f"a picture of scene {rng.randrange(max(rows // 4, 1))}" for _ in range(count)],
                "jpg_0": [picture(rng) for _ in range(count)], "jpg_1": [picture(rng) for _ in range(count)],
                "label_0": labels, "label_1": [1.0 - label for label in labels],
                "are_different": [rng.random() >= 0.01 for _ in range(count)]}, schema=schema))
            print(f"  {path.name}: {start + count}/{rows} rows", end="\r", flush=True)
    tmp.rename(path)
    print()
    return path


def light_vae(folder: Path) -> Path:
    """A random-weight AutoencoderKL with SD1.5's latent grid (factor 8, 4 channels) and almost no width."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(1, 1, 1, 4), layers_per_block=1, latent_channels=4, norm_num_groups=1,
                  sample_size=SIDE, mid_block_add_attention=False).save_pretrained(folder)
    return folder


def run(source: Path, vae: Path, out: Path, processes: int, steps: int) -> dict:
    """One training run with a fresh cache; returns its run_info.json."""
    overrides = [f"data.source={source}", "data.format=pickapic", f"model.vae={vae}", f"model.resolution={SIDE}",
                 f"train.max_steps={steps}", "train.batch_size=1", f"train.checkpointing_steps={steps + 1}",
                 f"train.output_dir={out / 'run'}", f"data.cache_dir={out / 'cache'}", "data.cache_dtype=float16",
                 "log.report_to=none", "log.validation_every_n_steps=0"]
    script = [str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "tiny_dpo.yaml"), *overrides]
    # A fresh datasets cache too: a first run converts the parquet to memory-mapped Arrow, and that is measured.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(out / "hf-datasets")}
    if processes == 1:
        command = [sys.executable, *script]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *script]
    started = time.time()
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.exit(f"the run failed ({' '.join(command)}):\n{completed.stderr[-3000:]}")
    info = json.loads((out / "run" / "run_info.json").read_text())
    info["launch_to_end_s"] = round(time.time() - started, 1)
    return info


def table_rows(results: list[tuple[int, int, dict]]) -> list[str]:
    header = ("| rows | processes | first step (s) | check (s) | cache (s) | images/s cached | peak RSS per process "
              "(MiB) | cache (MiB) | images encoded per process |")
    lines = [header, "|" + "---|" * 9]
    for rows, processes, info in results:
        build = info["data_build"]
        shares = build["images_per_process"]
        share_text = " / ".join(f"{n} ({100 * n / max(sum(shares), 1):.0f}%)" for n in shares)
        lines.append(
            f"| {rows} | {processes} | {info['time_to_first_step_s']:.1f} | {build['check_seconds']:.1f} | "
            f"{build['encode_seconds']:.1f} | {sum(shares) / max(build['encode_seconds'], 1e-9):.1f} | "
            f"{' / '.join(f'{m:.0f}' for m in info['peak_rss_mb'])} | {build['bytes'] / 2**20:.0f} | "
            f"{share_text} |")
    return lines


def projection(results: list[tuple[int, int, dict]]) -> list[str]:
    """Pick-a-Pic v2 from the largest single-process run's per-image cost (process-seconds per image)."""
    rows, _, info = max((r for r in results if r[1] == 1), key=lambda r: r[0], default=max(results, key=lambda r: r[0]))
    build = info["data_build"]
    per_image = build["encode_seconds"] * len(build["images_per_process"]) / max(sum(build["images_per_process"]), 1)
    check_per_row = build["check_seconds"] / rows
    images = PICKAPIC_V2_ROWS * 2
    sd15 = 2 * 4 * 64 * 64 * 2  # both orientations of a 4x64x64 fp16 latent
    sdxl = 2 * 4 * 128 * 128 * 2
    lines = [f"PROJECTION (not measured): Pick-a-Pic v2, {PICKAPIC_V2_ROWS} rows, {images} images, from the "
             f"{rows}-row run: {per_image * 1000:.1f} ms per image (decode, preprocess, this VAE, write) and "
             f"{check_per_row * 1e6:.0f} us per row checked, per process.",
             "| processes | check pass | cache build | latents SD1.5 (4x64x64 fp16, 2 flips) | "
             "latents SDXL (4x128x128 fp16, 2 flips) |", "|---|---|---|---|---|"]
    for processes in (1, 8, 64):
        lines.append(f"| {processes} | {PICKAPIC_V2_ROWS * check_per_row / 60:.0f} min | "
                     f"{images * per_image / processes / 3600:.1f} h | {images * sd15 / 2**30:.0f} GiB | "
                     f"{images * sdxl / 2**30:.0f} GiB |")
    lines.append("Prompt embeddings come on top: 118 KB (SD1.5, 77x768 fp16) or 318 KB (SDXL) per distinct prompt, "
                 "12 GB / 32 GB per 100k distinct prompts. Every process reads all rows in the check pass (text "
                 "only), so its time does not shrink with processes.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                     epilog="example:\n  python benchmarks/data_scale.py --out /tmp/data_scale")
    parser.add_argument("--out", type=Path, required=True, help="where the data, caches and runs go")
    parser.add_argument("--sizes", default="1000,4000,16000", help="rows per set, comma-separated")
    parser.add_argument("--processes", default="1,2", help="process counts, comma-separated")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    counts = [int(count) for count in args.processes.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"Pick-a-Pic-scale data benchmark, machine: {machine()}")
    vae = light_vae(args.out / "light-vae")
    results = []
    for rows in sizes:
        source = make_pickapic(args.out / "data" / f"pickapic-{rows}.parquet", rows)
        print(f"{source.name}: {source.stat().st_size / 2**20:.0f} MiB")
        for processes in counts:
            folder = args.out / f"rows{rows}-p{processes}"
            if folder.exists():
                import shutil

                shutil.rmtree(folder)
            info = run(source, vae, folder, processes, args.steps)
            results.append((rows, processes, info))
            print("\n".join(table_rows(results)[-1:]), flush=True)
    report = [f"machine: {machine()}", *table_rows(results), "", *projection(results)]
    print("\n" + "\n".join(report))
    (args.out / "results.md").write_text("\n".join(report) + "\n")
    (args.out / "results.json").write_text(json.dumps([{"rows": r, "processes": p, "run_info": i}
                                                       for r, p, i in results], indent=2))


if __name__ == "__main__":
    main()
