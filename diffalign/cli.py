"""`diffalign` command line: thin argument parsing over library functions."""

from __future__ import annotations

import argparse
import sys

MAIN_EXAMPLES = """examples:
  diffalign train configs/tiny_dpo.yaml                     # DPO LoRA on a tiny offline model, a few minutes on CPU
  diffalign train configs/sd15_dpo.yaml train.max_steps=500 # the real SD1.5 recipe, with an override
  diffalign tiny model /tmp/tiny-sd15 --family sd15         # a tiny random-weight diffusers checkpoint
  diffalign tiny data /tmp/tiny-pairs                       # a small synthetic preference set (parquet + jsonl)
  diffalign export runs/tiny_dpo --format kohya             # LoRA for ComfyUI / A1111
"""

TRAIN_EXAMPLES = """examples:
  diffalign train configs/tiny_dpo.yaml
  diffalign train configs/tiny_dpo.yaml train.max_steps=20 objective.dpo.beta=2500 train.output_dir=runs/try
  diffalign train configs/sd15_dpo.yaml train.resume=latest
  accelerate launch --num_processes 2 scripts/train.py --config configs/sd15_dpo.yaml

Overrides are dotted keys with YAML values; unknown keys are errors that name the closest valid key.
The run folder gets config.yaml, pytorch_lora_weights.safetensors, README.md, samples/, logs/, checkpoint-N/.
"""

TINY_EXAMPLES = """examples:
  diffalign tiny model /tmp/tiny-sd15 --family sd15 --seed 0
  diffalign tiny data /tmp/tiny-pairs --num-pairs 64
Configs can name them without building by hand: model.pretrained=tiny:sd15, data.source=tiny:pairs.
"""

EXPORT_EXAMPLES = """examples:
  diffalign export runs/tiny_dpo --format kohya
  diffalign export runs/tiny_dpo/checkpoint-500 --format kohya --out my_lora.safetensors
"""


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="diffalign", description="Align text-to-image diffusion models with human preferences.",
        epilog=MAIN_EXAMPLES, formatter_class=formatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser("train", help="train a LoRA with a preference objective",
                                description="Train with a YAML config.", epilog=TRAIN_EXAMPLES, formatter_class=formatter)
    train.add_argument("config", help="YAML config, e.g. configs/tiny_dpo.yaml")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides")

    tiny = commands.add_parser("tiny", help="build offline tiny models and data",
                               description="Build tiny random-weight models and synthetic data, offline.",
                               epilog=TINY_EXAMPLES, formatter_class=formatter)
    tiny_commands = tiny.add_subparsers(dest="tiny_command", metavar="WHAT", required=True)
    tiny_model = tiny_commands.add_parser("model", help="a tiny diffusers checkpoint", epilog=TINY_EXAMPLES,
                                          formatter_class=formatter)
    tiny_model.add_argument("dir")
    tiny_model.add_argument("--family", default="sd15")
    tiny_model.add_argument("--seed", type=int, default=0)
    tiny_data = tiny_commands.add_parser("data", help="a synthetic preference set (parquet + jsonl)",
                                         epilog=TINY_EXAMPLES, formatter_class=formatter)
    tiny_data.add_argument("dir")
    tiny_data.add_argument("--num-pairs", type=int, default=64)
    tiny_data.add_argument("--seed", type=int, default=0)

    export = commands.add_parser("export", help="convert a trained LoRA to another format",
                                 description="Write a run's LoRA in another key format.", epilog=EXPORT_EXAMPLES,
                                 formatter_class=formatter)
    export.add_argument("run_dir", help="run folder or checkpoint folder holding pytorch_lora_weights.safetensors")
    export.add_argument("--format", choices=["kohya"], default="kohya")
    export.add_argument("--out", default=None, help="output file (default: next to the input)")
    return parser


def run_train(args) -> int:
    from diffalign.config import load_config
    from diffalign.training.trainer import train

    result = train(load_config(args.config, args.overrides))
    print(f"{'LoRA:' if result.lora_path and result.lora_path.is_file() else 'weights:':<13}{result.lora_path}")
    print(f"model card:  {result.output_dir / 'README.md'}")
    if result.grid_path:
        print(f"sample grid: {result.grid_path}")
    return 0


def run_tiny(args) -> int:
    from diffalign import tiny

    if args.tiny_command == "model":
        path = tiny.build_tiny_model(args.dir, family=args.family, seed=args.seed)
        print(f"tiny {args.family} model written to {path}; load it with DiffusionPipeline.from_pretrained('{path}')")
    else:
        path = tiny.build_tiny_pairs(args.dir, num_pairs=args.num_pairs, seed=args.seed)
        print(f"tiny preference data written to {path}/pairs.parquet (Pick-a-Pic schema) and {path}/jsonl/")
    return 0


def run_export(args) -> int:
    from diffalign.training.lora import export_kohya

    print(f"kohya LoRA written to {export_kohya(args.run_dir, args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from diffalign.config import ConfigError
    from diffalign.data.records import DataError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    handlers = {"train": run_train, "tiny": run_tiny, "export": run_export}
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as error:
        print(f"diffalign {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        from diffalign.training.trainer import TrainingStopped

        if isinstance(error, TrainingStopped):
            print(f"diffalign {args.command}: stopped: {error}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
