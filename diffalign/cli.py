"""`diffalign` command line: thin argument parsing over library functions."""

from __future__ import annotations

import argparse
import math
import sys
from decimal import Decimal, InvalidOperation

from diffalign.cli_help import (
    EVAL_EXAMPLES,
    EXPORT_EXAMPLES,
    MAIN_EXAMPLES,
    PAIRS_EXAMPLES,
    SAMPLE_EXAMPLES,
    SCORE_EXAMPLES,
    TINY_EXAMPLES,
    TRAIN_EXAMPLES,
)
from diffalign.images import PILLOW_MAX_PIXELS


def add_prompt_source(parser, prompts_help: str) -> None:
    """Exactly one of --prompt, --prompts FILE or --prompt-set NAME (sample and pairs)."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="one prompt")
    group.add_argument("--prompts", help=prompts_help)
    group.add_argument("--prompt-set", help="a shipped prompt set (assets/prompts): shapes, everyday")


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
    tiny_model.add_argument("--family", default="sd15", choices=["sd15", "sd2v", "sdxl", "sd3"],
                            help="sd15 (epsilon), sd2v (SD2.x v-prediction), sdxl (two text encoders, time ids) "
                                 "or sd3 (flow-matching MMDiT, three text encoders)")
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
    add_prompt_source(sample, "file: one prompt per line, or jsonl with a 'prompt' key")
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
    sample.add_argument("--scheduler", default=None, help="ddim, dpm, euler, euler_a, pndm, ddpm, unipc; flow_euler for SD3")
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
    score.add_argument("--max-image-pixels", type=pixel_limit, default=PILLOW_MAX_PIXELS, metavar="N",
                       help="images with more pixels are error rows (default: Pillow's %(default)s; none = no limit)")
    score.add_argument("--follow-symlinks", action="store_true",
                       help="also score symlinks that resolve outside the --images folder (default: error rows)")

    pairs = commands.add_parser("pairs", help="generate preference data: k images per prompt ranked by rewards",
                                description="Synthetic preference pairs (AI feedback) in every format train reads.",
                                epilog=PAIRS_EXAMPLES, formatter_class=formatter)
    pairs.add_argument("--model", default="tiny:sd15", help="hub id, diffusers folder or tiny:sd15")
    add_prompt_source(pairs, "a prompts file, or any prompt set diffalign eval takes (parti, ...)")
    pairs.add_argument("--prompts-source", default=None, help="local copy of parti / hpsv2 (see diffalign eval -h)")
    pairs.add_argument("--limit", type=int, default=None, help="keep the first N prompts")
    pairs.add_argument("--repeat", type=int, default=1, help="use the prompt list N times (one group per entry)")
    add_reward_arguments(pairs)
    pairs.add_argument("--ensemble-weights", default=None, help="NAME=W,... weights of the per-group z-scores")
    add_adapter_arguments(pairs)
    pairs.add_argument("--images-per-prompt", type=int, default=4, help="k images per group")
    pairs.add_argument("--selection", choices=["best_worst", "all"], default="best_worst",
                       help="best_worst: one pair per group; all: every pair whose gap exceeds --margin")
    pairs.add_argument("--margin", type=float, default=0.0, help="pairs (and groups) with a score gap <= this are dropped")
    pairs.add_argument("--kto-fraction", type=float, default=0.25, help="top / bottom fraction labelled 1 / 0")
    pairs.add_argument("--format", choices=["pairs", "scored", "ranked", "kto"], default="pairs",
                       help="the view written as DIR/metadata.jsonl")
    add_sampling_arguments(pairs, steps=25, guidance=7.5, batch_size=8)
    pairs.add_argument("--out", required=True, help="output folder (rerun to resume)")
    pairs.add_argument("--overwrite", action="store_true", help="replace an earlier run with another config")

    evaluate = commands.add_parser("eval", help="compare setups with the base: rewards, win rates, grids, plots",
                                   description="Sample every setup with the same prompts and seeds and report win "
                                   "rates against the base.", epilog=EVAL_EXAMPLES, formatter_class=formatter)
    evaluate.add_argument("--model", default="tiny:sd15", help="base: hub id, diffusers folder or tiny:sd15")
    evaluate.add_argument("--prompts", required=True, help="shipped set, .txt/.jsonl file, parti[:Category], hpsv2[:style]")
    evaluate.add_argument("--prompts-source", default=None, help="local copy of parti (PartiPrompts.tsv) or hpsv2 (folder)")
    evaluate.add_argument("--limit", type=int, default=None, help="keep the first N prompts")
    evaluate.add_argument("--setup", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                          help="a setup to compare with base; repeat for several")
    add_reward_arguments(evaluate)
    evaluate.add_argument("--num-images", type=int, default=1, help="images per prompt")
    add_sampling_arguments(evaluate, steps=25, guidance=7.5, batch_size=4)
    evaluate.add_argument("--scheduler", default=None, help="for every setup without its own: ddim, dpm, euler, ...")
    evaluate.add_argument("--confidence", type=float, default=0.95, help="level of the bootstrap interval")
    evaluate.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    evaluate.add_argument("--out", default="eval", help="output folder")

    export = commands.add_parser("export", help="convert a trained LoRA to another format",
                                 description="Write a run's LoRA in another key format.", epilog=EXPORT_EXAMPLES,
                                 formatter_class=formatter)
    export.add_argument("run_dir", help="run folder or checkpoint folder holding pytorch_lora_weights.safetensors")
    export.add_argument("--format", choices=["kohya"], default="kohya")
    export.add_argument("--out", default=None, help="output file (default: next to the input)")
    return parser


def add_reward_arguments(parser) -> None:
    parser.add_argument("--reward", default="clip", help="comma-separated reward names")
    parser.add_argument("--weights", action="append", default=[],
                        help="local reward weights: PATH (one reward) or NAME=PATH; repeat for several")


def add_adapter_arguments(parser) -> None:
    parser.add_argument("--lora", help="positive LoRA: run folder or .safetensors")
    parser.add_argument("--npo", help="negative LoRA (npo / self_npo run) for the unconditional branch")
    parser.add_argument("--npo-merge-weight", type=float, default=0.0, help="m in base + npo + (1-m) * lora")
    parser.add_argument("--segments", help="segments.yaml from a timestep-segment run")
    parser.add_argument("--scheduler", default=None, help="ddim, dpm, euler, euler_a, pndm, ddpm, unipc; flow_euler for SD3")


def add_sampling_arguments(parser, steps: int, guidance: float, batch_size: int) -> None:
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--guidance", type=float, default=guidance, help="classifier-free guidance scale")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--batch-size", type=int, default=batch_size, help="images per pipeline call")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)


def pick_device(args):
    """(device, torch dtype or None) from --device / --dtype."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "float16" and device == "cpu":
        raise ValueError("--dtype float16 needs a GPU; use float32 or bfloat16 on CPU")
    return device, getattr(torch, args.dtype) if args.dtype else None


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


def pixel_limit(text: str) -> int | None:
    """--max-image-pixels: a whole number of pixels, at least 1, written as 89478485, 2_000_000 or 1e9 (as
    data.max_image_pixels takes it in a config); or none / null (no limit)."""
    cleaned = text.strip().lower()
    if cleaned in ("none", "null"):
        return None
    try:  # exact, never rounded through a float; underscores only as Python allows them in ints (2_000_000)
        number = Decimal(int(cleaned) if "_" in cleaned else cleaned)
    except (InvalidOperation, ValueError):
        number = None
    if number is None or not number.is_finite() or number != number.to_integral_value() or number < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a pixel count: give a whole number of at least 1 "
                                         "(e.g. 100000000, 1e9 or 2_000_000), or none for no limit")
    return int(number)


def reward_names(reward: str) -> list[str]:
    names = [name.strip() for name in reward.split(",") if name.strip()]
    if not names:
        raise ValueError("--reward needs at least one reward name, e.g. --reward clip")
    return names


def ensemble_weights(text: str | None, names: list[str]) -> dict[str, float] | None:
    """--ensemble-weights NAME=W,... -> {name: weight}, or None. Each W is a finite number >= 0 (rewards not named
    weigh 1), NAME one of ``names``; a bare W is taken for the reward when there is only one. Raises ValueError
    with a one-line message naming the flag, the bad entry and what to give."""
    if not text:
        return None
    weights = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        name, sep, value = (part.strip() for part in entry.partition("="))
        if not sep and len(names) == 1:
            name, value = names[0], entry
        elif not sep or name not in names:
            unknown = f"'{name}' is not one of the rewards" if sep else "no reward name"
            raise ValueError(f"--ensemble-weights '{entry}': {unknown}; use NAME=W with NAME one of {names}, "
                             f"e.g. {names[0]}=2")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"--ensemble-weights '{entry}': the weight '{value}' is not a finite number >= 0; "
                             f"use NAME=W with W such as 2 or 0.5, e.g. {name}=2")
        weights[name] = weight
    if weights and sum(weights.get(name, 1.0) for name in names) <= 0:
        raise ValueError(f"--ensemble-weights '{text}': the weights sum to 0; give at least one of {names} a "
                         "weight above 0")
    return weights or None


def build_rewards(reward: str, weights: list[str], device) -> dict:
    """--reward NAME[,NAME] and --weights [NAME=]PATH -> {name: RewardModel}, with a one-line error when one
    cannot load."""
    from diffalign.rewards import build_reward

    names = reward_names(reward)
    paths = parse_named(weights, names, "--weights")
    rewards = {}
    for name in names:
        try:
            rewards[name] = build_reward(name, weights=paths.get(name), device=device)
        except (OSError, RuntimeError) as error:  # offline, gated, missing file: say how to use local weights
            raise ValueError(f"could not load reward '{name}': {str(error).splitlines()[0][:300]}. Give local weights "
                             f"with --weights {name}=PATH (or try the tiny one: diffalign tiny reward DIR --reward "
                             f"{name})") from error
    return rewards


def run_score(args) -> int:
    import torch

    from diffalign.rewards.scoring import add_ensemble, collect_rows, score_rows, summary, write_rows

    names = reward_names(args.reward)
    weights = ensemble_weights(args.ensemble_weights, names)
    rows = collect_rows(args.images, args.prompts, follow_symlinks=args.follow_symlinks)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rewards = build_rewards(args.reward, args.weights, device)
    score_rows(rows, rewards, args.batch_size, max_pixels=args.max_image_pixels)
    left_out = add_ensemble(rows, names, weights)
    if left_out:
        print(left_out)
    columns = names + (["ensemble_z"] if any("ensemble_z" in row.scores for row in rows) else [])
    out = write_rows(rows, columns, args.out)
    print(summary(rows, columns))
    print(f"scores written to {out}")
    scored = sum(row.error is None for row in rows)
    if scored == 0:
        print("diffalign score: error: nothing could be scored; see the error column", file=sys.stderr)
        return 1
    return 0


def run_pairs(args) -> int:
    from diffalign.evaluation.pairs import PairSettings, describe, generate_pairs
    from diffalign.evaluation.prompts import load_prompts
    from diffalign.guidance import load_pipeline
    from diffalign.guidance.sample import read_prompts

    if args.repeat < 1:
        raise ValueError(f"--repeat must be at least 1, got {args.repeat}")
    if args.prompts is not None:  # a file, or any prompt set eval takes
        prompts = load_prompts(args.prompts, limit=args.limit, source=args.prompts_source)
    else:
        prompts = read_prompts(args.prompt, None, args.prompt_set)[: args.limit]
    settings = PairSettings(images_per_prompt=args.images_per_prompt, seed=args.seed, steps=args.steps,
                            guidance_scale=args.guidance, negative_prompt=args.negative_prompt,
                            batch_size=args.batch_size, selection=args.selection, margin=args.margin,
                            kto_fraction=args.kto_fraction, format=args.format).validate()
    names = reward_names(args.reward)
    weights = ensemble_weights(args.ensemble_weights, names)
    device, dtype = pick_device(args)
    rewards = build_rewards(args.reward, args.weights, device)
    pipe = load_pipeline(args.model, lora=args.lora, npo=args.npo, npo_merge_weight=args.npo_merge_weight,
                         segments=args.segments, scheduler=args.scheduler, torch_dtype=dtype, device=device)
    setup = {"model": args.model, "lora": args.lora, "npo": args.npo, "npo_merge_weight": args.npo_merge_weight,
             "segments": args.segments, "scheduler": args.scheduler or type(pipe.scheduler).__name__}
    result = generate_pairs(pipe, prompts * args.repeat, rewards, settings, args.out, weights=weights, setup=setup,
                            overwrite=args.overwrite)
    print(describe(result))
    return 0


def run_eval(args) -> int:
    from diffalign.evaluation.prompts import load_prompts
    from diffalign.evaluation.report import parse_setups, run_eval
    from diffalign.guidance.sample import SampleSettings

    setups = parse_setups(args.setup, scheduler=args.scheduler)
    prompts = load_prompts(args.prompts, limit=args.limit, source=args.prompts_source)
    device, dtype = pick_device(args)
    rewards = build_rewards(args.reward, args.weights, device)
    settings = SampleSettings(num_images=args.num_images, seed=args.seed, steps=args.steps,
                              guidance_scale=args.guidance, negative_prompt=args.negative_prompt,
                              batch_size=args.batch_size)
    report = run_eval(args.model, setups, prompts, rewards, settings, args.out, confidence=args.confidence,
                      resamples=args.resamples, device=device, torch_dtype=dtype)
    print(report.markdown)
    for key in ("report", "markdown", "scores", "grid", "winrate"):
        print(f"{key + ':':<10}{report.paths[key]}")
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
    handlers = {"train": run_train, "tiny": run_tiny, "sample": run_sample, "score": run_score, "pairs": run_pairs,
                "eval": run_eval, "export": run_export}
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
    except KeyboardInterrupt:  # Ctrl-C: the run's finally blocks (lock, progress bars) have run; no traceback
        print(f"diffalign {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
