"""Entry point for `accelerate launch`:

    accelerate launch scripts/train.py --config configs/tiny_dpo.yaml [key=value ...]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/train.py --config configs/tiny_dpo.yaml
"""

import argparse
import sys

from diffalign.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    args, overrides = parser.parse_known_args()
    sys.exit(main(["train", args.config, *overrides]))
