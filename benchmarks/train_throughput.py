"""Training throughput with and without the latent / text-embedding cache, measured in the same run.

    python benchmarks/train_throughput.py                 # tiny model, CPU
    python benchmarks/train_throughput.py --steps 50 --batch-size 8 model.pretrained=<hub id or folder> ...

Each mode runs in its own fresh process (so peak memory is that mode's own), on the same model, data, seed and
steps. The uncached mode encodes every image with the VAE and every prompt with the text encoder at every step,
as the diffusers reference script does. Reported: pairs/s in steady state (first step left out), peak memory
(RSS on CPU, CUDA peak allocated on GPU), and the ratio against the uncached baseline. The one-time cost of
building the cache is reported separately.
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


def child(args) -> None:
    import torch

    from diffalign.config import load_config
    from diffalign.training.trainer import train

    overrides = [
        f"train.output_dir={args.out}", f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
        f"data.cache={args.mode == 'cached'}", f"data.cache_dir={args.cache_dir}", "log.validation_every_n_steps=0",
        "log.report_to=none", f"train.checkpointing_steps={10**9}", *args.overrides,
    ]
    cfg = load_config(ROOT / "configs" / "tiny_dpo.yaml", overrides)
    started = time.time()
    result = train(cfg)
    info = json.loads((result.output_dir / "run_info.json").read_text())
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reserved = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else peak  # what the card must hold
    json.dump({"seconds_per_step": info["seconds_per_step"], "wall_s": time.time() - started, "peak_bytes": peak,
               "peak_reserved_bytes": reserved, "batch_size": args.batch_size,
               "compile_graphs": (info.get("final_metrics") or {}).get("compile_graphs")}, open(args.result, "w"))


def run_mode(mode: str, args, workdir: Path) -> dict:
    result = workdir / f"{mode}.json"
    command = [sys.executable, __file__, "--child", "--mode", mode, "--out", str(workdir / mode),
               "--result", str(result), "--cache-dir", str(workdir / "cache"), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), *args.overrides]
    subprocess.run(command, check=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    return json.loads(result.read_text())


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="cached", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.pretrained=...")
    args = parser.parse_args()
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        build = run_mode("cached", args, workdir)  # first cached run pays for building the cache
        rows = {"uncached": run_mode("uncached", args, workdir), "cached": run_mode("cached", args, workdir)}
    baseline = rows["uncached"]
    print(f"\ntraining throughput, {args.steps} steps x {args.batch_size} pairs, machine: {machine()}\n")
    print("| mode | pairs/s | peak memory (MiB) | speed vs uncached | memory vs uncached |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        pairs_per_s = row["batch_size"] / row["seconds_per_step"]
        base_pairs_per_s = baseline["batch_size"] / baseline["seconds_per_step"]
        print(f"| {name} | {pairs_per_s:.2f} | {row['peak_bytes'] / 2**20:.0f} | {pairs_per_s / base_pairs_per_s:.2f}x "
              f"| {row['peak_bytes'] / baseline['peak_bytes']:.2f}x |")
    print(f"\none-time cache build + first cached run: {build['wall_s']:.1f} s wall "
          f"(the second cached run above found everything cached: {rows['cached']['wall_s']:.1f} s wall)")


if __name__ == "__main__":
    main()
