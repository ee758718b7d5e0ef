"""The toy world, end to end: does each objective move a model towards what a reward prefers?

    python benchmarks/toy_alignment.py                         # every objective (+ NPO guidance, segments)
    python benchmarks/toy_alignment.py --objectives dpo        # DPO only (with the cached base: a few minutes)
    python benchmarks/toy_alignment.py --out runs/toy --rebuild   # retrain every LoRA (the base stays cached)

Steps (``diffalign.offline.toy_loop``): the toy base ``tiny:toy`` (pre-trained here on red or blue shapes, cached
under $DIFFALIGN_CACHE) -> ``diffalign pairs`` with the ``toy_redness`` reward -> ``diffalign train`` with
``configs/toy/<objective>.yaml`` -> ``diffalign eval`` of every setup against the base on held-out seeds.
The baseline is the base model, sampled in the same run with the same seeds. Prints a table (win rate vs base
with its 95% bootstrap interval, mean reward, share of red images, training time) and the wall time of each
stage, with the machine named.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from diffalign.offline.toy_loop import (
    OBJECTIVES,
    ToySettings,
    best_online,
    format_table,
    head_to_head,
    run_toy_alignment,
)


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {device}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/toy", help="run folder (pairs/, one folder per objective, eval/)")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES),
                        help=f"comma-separated subset of {','.join(OBJECTIVES)}")
    parser.add_argument("--groups", type=int, default=ToySettings.groups, help="prompt groups for pairs")
    parser.add_argument("--eval-images", type=int, default=ToySettings.eval_images, help="held-out images per setup")
    parser.add_argument("--rebuild", action="store_true", help="delete the run folder first (not the cached base)")
    parser.add_argument("overrides", nargs="*", help="dotted train overrides for every objective, e.g. train.max_steps=100")
    args = parser.parse_args(argv)

    out = Path(args.out)
    if args.rebuild and out.exists():
        shutil.rmtree(out)
    objectives = [name.strip() for name in args.objectives.split(",") if name.strip()]
    settings = ToySettings(groups=args.groups, eval_images=args.eval_images, train_overrides=args.overrides)
    started = time.time()
    rows, timings = run_toy_alignment(out, objectives, settings)
    total = time.time() - started

    print(f"\ntoy world on {machine()}")
    print(f"{args.eval_images} held-out images per setup, paired by seed with the base (same run)\n")
    print(format_table(rows))
    if any(row.setup == "dpo+npo-guided" for row in rows):
        versus = head_to_head(out / "eval", "dpo+npo-guided", "dpo")
        print(f"\nNPO guidance on top of DPO vs DPO alone (same seeds): win rate {versus.rate:.3f} "
              f"[{versus.low:.3f}, {versus.high:.3f}], mean reward {versus.mean_aligned:+.4f} vs {versus.mean_base:+.4f}")
    best = best_online(rows)
    if best is not None and any(row.setup == "dpo" for row in rows):
        versus = head_to_head(out / "eval", best, "dpo")
        print(f"\nbest online method ({best}) vs DPO (same seeds): win rate {versus.rate:.3f} "
              f"[{versus.low:.3f}, {versus.high:.3f}], mean reward {versus.mean_aligned:+.4f} vs {versus.mean_base:+.4f}")
    print("\n| stage | seconds |\n|---|---|")
    for stage, seconds in timings.items():
        print(f"| {stage} | {seconds:.0f} |")
    print(f"| total | {total:.0f} |")
    print(f"\nreport: {out / 'eval' / 'report.md'}\nwin-rate chart: {out / 'eval' / 'winrate.png'}\n"
          f"side-by-side grid: {out / 'eval' / 'grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
