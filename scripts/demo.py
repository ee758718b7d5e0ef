"""`make demo`: the toy world's DPO path, end to end, on 2 CPU cores.

1. ``tiny:toy``: a tiny text-to-image model pre-trained here on red or blue shapes (first run only: a few minutes,
   then cached under $DIFFALIGN_CACHE or ~/.cache/diffalign);
2. ``diffalign pairs``: 4 samples per prompt group, scored by the ``toy_redness`` reward, best vs worst;
3. ``diffalign train configs/toy/dpo.yaml``: a Diffusion-DPO LoRA on those pairs;
4. ``diffalign eval``: base vs DPO on held-out seeds; win rate with its 95% interval, report and PNGs.

    python scripts/demo.py [--out runs/demo] [train overrides, e.g. train.max_steps=100]
"""

import argparse
import sys
import time
from pathlib import Path

from diffalign.offline.toy_loop import ToySettings, format_table, run_toy_alignment


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # component-loading bars would drown the table; work bars stay
    started = time.time()
    rows, timings = run_toy_alignment(out, ["dpo"], ToySettings(train_overrides=args.overrides))
    dpo = next(row for row in rows if row.setup == "dpo")
    print()
    print(format_table(rows))
    print(f"\nDPO wins {dpo.win_rate:.1%} of held-out images against the base (95% interval "
          f"[{dpo.low:.3f}, {dpo.high:.3f}]) under toy_redness; red share {rows[0].red_share:.0%} -> {dpo.red_share:.0%}")
    print(f"done in {time.time() - started:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")")
    print(f"report:         {out / 'eval' / 'report.md'}  (and report.json, scores.jsonl)")
    print(f"win-rate chart: {out / 'eval' / 'winrate.png'}")
    print(f"side by side:   {out / 'eval' / 'grid.png'}")
    print(f"pairs:          {out / 'pairs' / 'overview' / 'grid.png'}  (data.source={out / 'pairs' / 'pairs'})")
    print(f"LoRA:           {out / 'dpo'}  (pipe.load_lora_weights('{out / 'dpo'}'))")
    print("every objective: python benchmarks/toy_alignment.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
