"""`diffalign` command line: thin argument parsing over library functions."""

from __future__ import annotations

import argparse
import sys

MAIN_EXAMPLES = """examples:
  diffalign train configs/tiny_dpo.yaml                     # DPO LoRA on a tiny offline model, a few minutes on CPU
  diffalign train configs/sd15_dpo.yaml train.max_steps=500 # the real SD1.5 recipe, with an override
  diffalign tiny model /tmp/tiny-sd15 --family sd15         # a tiny random-weight diffusers checkpoint
  diffalign tiny data /tmp/tiny-pairs                       # a small synthetic preference set (parquet + jsonl)
  diffalign sample --prompt-set shapes --lora runs/tiny_dpo --npo runs/tiny_npo   # NPO-guided sampling
  diffalign score --images samples/npo --reward clip --out scores.csv             # reward models
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
  diffalign tiny reward /tmp/tiny-hps --reward hpsv21
  diffalign tiny lora /tmp/tiny-lora --base tiny:sd15
Configs can name them without building by hand: model.pretrained=tiny:sd15, data.source=tiny:pairs.
"""

SAMPLE_EXAMPLES = """examples:
  diffalign sample --model tiny:sd15 --prompt-set shapes --lora runs/tiny_dpo --out samples/dpo
  diffalign sample --model tiny:sd15 --prompt "a square" --lora runs/tiny_dpo --npo runs/tiny_npo --num-images 4
  diffalign sample --model tiny:sd15 --prompts prompts.txt --segments runs/tiny_dpo_segments/segments.yaml
  diffalign sample --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt-set everyday \\
      --npo runs/sd15_npo --scheduler dpm --steps 25 --guidance 7.5
Writes one PNG per image, samples.jsonl (prompt, seed and settings of each image) and overview/grid.png.
Image j of prompt i uses seed SEED + i * NUM_IMAGES + j, so setups sampled with one seed compare image by image.
"""

SCORE_EXAMPLES = """examples:
  diffalign score --images samples/dpo --reward clip --out scores.csv            # folder from diffalign sample
  diffalign score --images 'photos/*.jpg' --prompts prompts.jsonl --reward hpsv21,pickscore --out scores.jsonl
  diffalign score --images samples/dpo --reward hpsv21 --weights /models/HPS_v2.1_compressed.pt --device cuda
  diffalign score --images samples/dpo --reward clip,aesthetic --weights clip=/m/clip --weights aesthetic=/m/aes
Prompts: --prompts FILE (one per line, matched to the sorted images; or jsonl with file_name, prompt), else the
folder's samples.jsonl. Unreadable images and missing prompts become rows with an error; the exit code is
non-zero only when nothing could be scored. With several rewards an ensemble_z column (mean per-prompt z-score)
is added.
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
    tiny_reward = tiny_commands.add_parser("reward", help="a tiny random-weight reward model in its real format",
                                           epilog=TINY_EXAMPLES, formatter_class=formatter)
    tiny_reward.add_argument("dir")
    tiny_reward.add_argument("--reward", required=True, help="clip, hpsv2, hpsv21, pickscore or aesthetic")
    tiny_reward.add_argument("--seed", type=int, default=0)
    tiny_lora = tiny_commands.add_parser("lora", help="a random LoRA for a tiny base", epilog=TINY_EXAMPLES,
                                         formatter_class=formatter)
    tiny_lora.add_argument("dir")
    tiny_lora.add_argument("--base", default="tiny:sd15")
    tiny_lora.add_argument("--seed", type=int, default=0)

    sample = commands.add_parser("sample", help="generate images, with LoRA, NPO guidance or timestep segments",
                                 description="Generate images for prompts with any guidance mode.",
                                 epilog=SAMPLE_EXAMPLES, formatter_class=formatter)
    sample.add_argument("--model", default="tiny:sd15", help="hub id, diffusers folder or tiny:sd15")
    prompts = sample.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument("--prompts", help="file: one prompt per line, or jsonl with a 'prompt' key")
    prompts.add_argument("--prompt-set", help="a shipped prompt set (assets/prompts): shapes, everyday")
    sample.add_argument("--lora", help="positive LoRA: run folder or .safetensors")
    sample.add_argument("--npo", help="negative LoRA (npo / self_npo run) for the unconditional branch")
    sample.add_argument("--npo-merge-weight", type=float, default=0.0, help="m in base + npo + (1-m) * lora")
    sample.add_argument("--segments", help="segments.yaml from a timestep-segment run")
    sample.add_argument("--lora-scale", type=float, default=1.0)
    sample.add_argument("--npo-scale", type=float, default=1.0)
    sample.add_argument("--out", default="samples", help="output folder")
    sample.add_argument("--num-images", type=int, default=1, help="images per prompt")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--steps", type=int, default=25)
    sample.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    sample.add_argument("--negative-prompt", default=None)
    sample.add_argument("--scheduler", default=None, help="ddim, dpm, euler, euler_a, pndm, ddpm, unipc")
    sample.add_argument("--height", type=int, default=None)
    sample.add_argument("--width", type=int, default=None)
    sample.add_argument("--batch-size", type=int, default=4)
    sample.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    sample.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)

    score = commands.add_parser("score", help="rate images with reward models (CLIP, HPSv2, PickScore, aesthetic)",
                                description="Score images against their prompts.", epilog=SCORE_EXAMPLES,
                                formatter_class=formatter)
    score.add_argument("--images", required=True, help="folder or glob of images")
    score.add_argument("--prompts", default=None, help="txt (one per line) or jsonl with file_name + prompt")
    score.add_argument("--reward", default="clip", help="comma-separated reward names")
    score.add_argument("--weights", action="append", default=[],
                       help="local weights: PATH (one reward) or NAME=PATH; repeat for several. No network is used")
    score.add_argument("--ensemble-weights", default=None, help="NAME=W,... for the ensemble_z column")
    score.add_argument("--batch-size", type=int, default=16)
    score.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    score.add_argument("--out", default="scores.csv", help="scores.csv or scores.jsonl")

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

    cfg = load_config(args.config, args.overrides)
    if cfg.segments:
        from diffalign.training.segments import train_segments

        results = train_segments(cfg)
        for segment, result in zip(cfg.segments, results):
            print(f"segment {list(segment.interval)}: {result.lora_path}")
        print(f"segments file: {result.output_dir.parent / 'segments.yaml'}  (diffalign sample --segments ...)")
        return 0
    result = train(cfg)
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
    elif args.tiny_command == "data":
        path = tiny.build_tiny_pairs(args.dir, num_pairs=args.num_pairs, seed=args.seed)
        print(f"tiny preference data written to {path}/pairs.parquet (Pick-a-Pic schema) and {path}/jsonl/")
    elif args.tiny_command == "lora":
        path = tiny.build_tiny_lora(args.dir, base=args.base, seed=args.seed)
        print(f"random LoRA for {args.base} written to {path}")
    else:
        from diffalign.rewards.tiny import build_tiny_reward

        path = build_tiny_reward(args.dir, args.reward, seed=args.seed)
        print(f"tiny {args.reward} reward written to {path}; use it with --reward {args.reward} --weights {path}")
    return 0


def run_sample(args) -> int:
    import torch

    from diffalign.guidance import load_pipeline
    from diffalign.guidance.sample import SampleSettings, read_prompts, sample_to_folder

    prompts = read_prompts(args.prompt, args.prompts, args.prompt_set)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "float16" and device == "cpu":
        raise ValueError("--dtype float16 needs a GPU; use float32 or bfloat16 on CPU")
    pipe = load_pipeline(args.model, lora=args.lora, npo=args.npo, npo_merge_weight=args.npo_merge_weight,
                         segments=args.segments, lora_scale=args.lora_scale, npo_scale=args.npo_scale,
                         scheduler=args.scheduler, torch_dtype=getattr(torch, args.dtype) if args.dtype else None,
                         device=device)
    settings = SampleSettings(num_images=args.num_images, seed=args.seed, steps=args.steps,
                              guidance_scale=args.guidance, negative_prompt=args.negative_prompt,
                              height=args.height, width=args.width, batch_size=args.batch_size)
    setup = {"model": args.model, "lora": args.lora, "npo": args.npo, "npo_merge_weight": args.npo_merge_weight,
             "segments": args.segments, "lora_scale": args.lora_scale, "npo_scale": args.npo_scale,
             "scheduler": args.scheduler or type(pipe.scheduler).__name__}
    log = sample_to_folder(pipe, prompts, settings, args.out, setup)
    print(f"{len(prompts) * args.num_images} images in {args.out}; per-image settings in {log}; "
          f"overview in {log.parent / 'overview' / 'grid.png'}")
    return 0


def parse_named(values: list[str], names: list[str], what: str) -> dict[str, str]:
    """``PATH`` (only with one name) or ``NAME=PATH`` entries -> {name: value}."""
    mapping = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if sep and name in names:
            mapping[name] = rest
        elif len(names) == 1:
            mapping[names[0]] = value
        else:
            raise ValueError(f"{what} '{value}': with several rewards use NAME=PATH, NAME one of {names}")
    return mapping


def run_score(args) -> int:
    import torch

    from diffalign.rewards import build_reward
    from diffalign.rewards.scoring import add_ensemble, collect_rows, score_rows, summary, write_rows

    names = [name.strip() for name in args.reward.split(",") if name.strip()]
    weights = parse_named(args.weights, names, "--weights")
    ensemble_weights = {k: float(v) for k, v in parse_named((args.ensemble_weights or "").split(",") if
                                                            args.ensemble_weights else [], names, "--ensemble-weights").items()}
    rows = collect_rows(args.images, args.prompts)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rewards = {}
    for name in names:
        try:
            rewards[name] = build_reward(name, weights=weights.get(name), device=device)
        except (OSError, RuntimeError) as error:  # offline, gated, missing file: say how to use local weights
            raise ValueError(f"could not load reward '{name}': {str(error).splitlines()[0][:300]}. Give local weights "
                             f"with --weights {name}=PATH (or try the tiny one: diffalign tiny reward DIR --reward "
                             f"{name})") from error
    score_rows(rows, rewards, args.batch_size)
    add_ensemble(rows, names, ensemble_weights or None)
    columns = names + (["ensemble_z"] if any("ensemble_z" in row.scores for row in rows) else [])
    out = write_rows(rows, columns, args.out)
    print(summary(rows, columns))
    print(f"scores written to {out}")
    scored = sum(row.error is None for row in rows)
    if scored == 0:
        print("diffalign score: error: nothing could be scored; see the error column", file=sys.stderr)
        return 1
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
    handlers = {"train": run_train, "tiny": run_tiny, "sample": run_sample, "score": run_score, "export": run_export}
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
