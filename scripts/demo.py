"""`make demo`: Diffusion-DPO LoRA on the tiny offline model, end to end, in a few minutes on 2 CPU cores.

It builds the tiny SD1.5-shaped model and the synthetic red-vs-blue preference pairs on first use, trains,
and prints where the LoRA, the model card and the sample grid are.
"""

import sys
import time
from pathlib import Path

from diffalign.config import load_config
from diffalign.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    cfg = load_config(ROOT / "configs" / "tiny_dpo.yaml", ["train.output_dir=runs/demo", *sys.argv[1:]])
    started = time.time()
    result = train(cfg)
    metrics = result.metrics
    print()
    print(f"trained {result.global_step} DPO steps in {time.time() - started:.0f} s "
          f"(final loss {metrics.get('loss', float('nan')):.4f}, implicit accuracy {metrics.get('implicit_acc', 0):.2f})")
    print("(the tiny model has random weights, so its samples are noise: the demo shows the whole pipeline,\n"
          " not image quality; point model.pretrained and data.source at real ones for that)")
    print(f"LoRA:        {result.lora_path}")
    print(f"model card:  {result.output_dir / 'README.md'}")
    print(f"sample grid: {result.grid_path}")
    print(f"tensorboard: tensorboard --logdir {result.output_dir / 'logs'}")
    print("load it:     StableDiffusionPipeline.from_pretrained(BASE).load_lora_weights"
          f"('{result.output_dir}')  (BASE is in the model card)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
