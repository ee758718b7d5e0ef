"""Online RL throughput: images per second and where the time goes (sampling, reward, update), per method.

    python benchmarks/online_throughput.py                       # grpo, pref_grpo, nft on tiny:sd15 and tiny:toy
    python benchmarks/online_throughput.py --models tiny:sd3 --methods grpo --rounds 4

Each (model, method) runs ``configs/tiny_grpo.yaml`` (or ``configs/toy/<method>.yaml`` for ``tiny:toy``) for a few
rounds in its own fresh process, and reads ``online_rounds.jsonl``: each round's seconds sampling (the sampler's
denoiser calls, with CFG), scoring (decoding and every reward) and training (the update's forward and backward
passes over the trained steps). The first round is left out (warm-up). Images/s counts the round's images over
the whole round. The shares are of the round's time; the ratio column compares each method's images/s with the
first method's on the same model, measured in the same run. Set ``OMP_WAIT_POLICY=PASSIVE`` when other work
shares the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOY_CONFIGS = {"grpo": "toy/grpo.yaml", "pref_grpo": "toy/pref_grpo.yaml", "nft": "toy/nft.yaml"}


def config_for(model: str, method: str) -> tuple[Path, list[str]]:
    if model == "tiny:toy":
        return ROOT / "configs" / TOY_CONFIGS[method], []
    extra = {"nft": ["online.guidance_scale=1.0", "online.eta=0.0"]}.get(method, [])
    return ROOT / "configs" / "tiny_grpo.yaml", [f"objective.name={method}", f"model.pretrained={model}", *extra]


def child(args) -> None:
    from diffalign.config import load_config
    from diffalign.online.settings import round_layout
    from diffalign.training.trainer import train

    config, extra = config_for(args.model, args.method)
    cfg = load_config(config, [*extra, f"train.output_dir={args.out}", "log.validation_every_n_steps=0",
                               "log.report_to=none", f"train.checkpointing_steps={10 ** 6}", *args.overrides])
    steps_per_round = round_layout(cfg.online, cfg.train.batch_size, cfg.train.gradient_accumulation_steps, 1)[2]
    cfg.train.max_steps = steps_per_round * args.rounds
    train(cfg)


def measure(model: str, method: str, args, workdir: Path) -> dict:
    out = workdir / f"{model.replace(':', '-')}-{method}"
    command = [sys.executable, __file__, "--child", "--model", model, "--method", method, "--out", str(out),
               "--rounds", str(args.rounds), *args.overrides]
    subprocess.run(command, check=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
                   stdout=subprocess.DEVNULL)
    rounds = [json.loads(line) for line in (out / "online_rounds.jsonl").read_text().splitlines()]
    info = json.loads((out / "run_info.json").read_text())
    images = info["online"]["images_per_round"]
    # round r's training seconds are logged with round r + 1: pair them up, leaving out round 0 (warm-up)
    parts = [(r["seconds_sampling"], r["seconds_scoring"], nxt["seconds_training"])
             for r, nxt in zip(rounds[1:], rounds[2:])]
    if not parts:
        raise SystemExit("--rounds must be at least 3 (the first is warm-up, the last has no training time logged)")
    sampling, scoring, training = (sum(p[i] for p in parts) / len(parts) for i in range(3))
    total = sampling + scoring + training
    return {"model": model, "method": method, "images_per_round": images, "images_per_s": images / total,
            "sampling": sampling / total, "scoring": scoring / total, "training": training / total,
            "round_s": total}


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU only ({os.cpu_count()} cores)"
    return f"{cpu}, {device}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny:sd15,tiny:toy")
    parser.add_argument("--methods", default="grpo,pref_grpo,nft")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run (the first is left out)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = parser.parse_args()
    if args.child:
        import diffalign.offline  # noqa: F401  (registers tiny:)

        child(args)
        return
    print(f"Online RL throughput, machine: {machine()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            baseline = None
            for method in args.methods.split(","):
                row = measure(model, method, args, Path(tmp))
                baseline = baseline or row["images_per_s"]
                row["ratio"] = row["images_per_s"] / baseline
                rows.append(row)
                print(f"  {model} {method}: {row['images_per_s']:.2f} images/s", flush=True)
    print("\n| model | method | images/round | images/s | vs first | sampling | reward | update | s/round |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['method']} | {row['images_per_round']} | {row['images_per_s']:.2f} | "
              f"{row['ratio']:.2f}x | {row['sampling']:.0%} | {row['scoring']:.0%} | {row['training']:.0%} | "
              f"{row['round_s']:.1f} |")


if __name__ == "__main__":
    main()
