"""Reward scoring throughput: batched scoring against the reference way of scoring one image at a time.

    python benchmarks/score_throughput.py                       # tiny random-weight rewards (offline)
    python benchmarks/score_throughput.py --rewards hpsv21 --weights hpsv21=/models/HPS_v2.1_compressed.pt

For each reward the same images and prompts are scored in one process, first one image per call (how the
reference hpsv2 / PickScore snippets score), then in batches of 32; the speed-up is the ratio of the two,
measured in the same run. Scores of both passes are compared so a fast but wrong path cannot pass unnoticed.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def make_images(count: int, size: int) -> tuple[list[Image.Image], list[str]]:
    generator = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(size, size, 3, generator=generator) * 255).byte().numpy()) for _ in range(count)]
    prompts = [f"a photo of object number {i % 7}" for i in range(count)]
    return images, prompts


def timed(reward, images, prompts, batch_size: int) -> tuple[float, torch.Tensor]:
    reward.score(images[:batch_size], prompts[:batch_size])  # warm-up
    started = time.perf_counter()
    scores = torch.cat([reward.score(images[i : i + batch_size], prompts[i : i + batch_size])
                        for i in range(0, len(images), batch_size)])
    return len(images) / (time.perf_counter() - started), scores


def main() -> None:
    from diffalign.rewards import build_reward
    from diffalign.rewards.tiny import TINY_REWARDS, build_tiny_reward

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the scalar rewards with a tiny version (pairwise judges compare images, they do not score them)
    parser.add_argument("--rewards", default=",".join(TINY_REWARDS))
    parser.add_argument("--weights", action="append", default=[], help="NAME=PATH for real weights (else tiny)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    weights = dict(entry.split("=", 1) for entry in args.weights)
    images, prompts = make_images(args.images, args.image_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.rewards.split(","):
            path = weights.get(name) or str(build_tiny_reward(Path(tmp) / name, name))
            reward = build_reward(name, weights=path, device=args.device)
            single, single_scores = timed(reward, images, prompts, 1)
            batched, batched_scores = timed(reward, images, prompts, args.batch_size)
            drift = (single_scores - batched_scores).abs().max().item()
            rows.append((name, "real" if name in weights else "tiny", single, batched, drift))
    print(f"\nreward scoring throughput, {args.images} images of {args.image_size}px, machine: {machine()}\n")
    print(f"| reward | weights | images/s, batch 1 (reference) | images/s, batch {args.batch_size} | speed-up | max |score diff| |")
    print("|---|---|---|---|---|---|")
    for name, kind, single, batched, drift in rows:
        print(f"| {name} | {kind} | {single:.1f} | {batched:.1f} | {batched / single:.2f}x | {drift:.1e} |")


if __name__ == "__main__":
    main()
