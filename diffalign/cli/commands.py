"""The handlers of ``diffalign`` commands: flags in, one library call, result lines out.

Each handler takes the parsed ``argparse.Namespace`` and returns the exit code. Result lines go through ``echo``,
which prints on the main process only, so a run under ``accelerate launch`` reports once. Problems a user can fix
are raised as ``DiffalignError``s and printed as one line by ``diffalign.cli.main``.
"""

from __future__ import annotations

import argparse
import sys

from accelerate.state import PartialState

from diffalign.cli.options import pick_device, reward_flags
from diffalign.config import load_config
from diffalign.errors import ConfigError, ModelError
from diffalign.evaluation.pair_selection import PairSettings
from diffalign.evaluation.pairs import generate_pairs, pairs_summary
from diffalign.evaluation.prompts import load_prompts, read_prompts
from diffalign.evaluation.report import parse_setups, run_eval
from diffalign.families import detect_family, resolve_pretrained
from diffalign.guidance import load_pipeline
from diffalign.guidance.sample import SampleSettings, check_true_cfg, sample_to_folder
from diffalign.offline.data import build_tiny_pairs
from diffalign.offline.lora import build_tiny_lora
from diffalign.offline.specs import build_tiny_model
from diffalign.rewards import build_reward
from diffalign.rewards.scoring import add_ensemble, collect_rows, score_rows, summary, write_rows
from diffalign.rewards.tiny import build_tiny_reward
from diffalign.training.lora import export_kohya
from diffalign.training.segments import train_segments
from diffalign.training.trainer import train

RESULT_KEYS = ("report", "markdown", "scores", "grid", "winrate")  # the eval outputs printed, in order


def echo(*lines: str) -> None:
    """Print result lines on the main process only (every process runs the command under ``accelerate launch``)."""
    if PartialState().is_main_process:
        for line in lines:
            print(line)


def build_rewards(names: list[str], paths: dict[str, str], device) -> dict:
    """Reward names and their local weights (``reward_flags``) -> {name: RewardModel}; a reward that cannot load
    is a ``ModelError`` saying how to give local weights."""
    rewards = {}
    for name in names:
        try:
            rewards[name] = build_reward(name, weights=paths.get(name), device=device)
        except (OSError, RuntimeError) as error:  # offline, gated, missing file: say how to use local weights
            raise ModelError(f"could not load reward '{name}': {str(error).splitlines()[0][:300]}. Give local weights "
                             f"with --weights {name}=PATH (or try the tiny one: diffalign tiny reward DIR --reward "
                             f"{name})") from error
    return rewards


def sampling_family(args: argparse.Namespace):
    """The family of ``--model``, after refusing a --true-cfg / --npo combination it cannot sample (before any
    model loads); its default fills ``--guidance`` when none is given."""
    family = detect_family(resolve_pretrained(args.model))
    check_true_cfg(family, args.true_cfg, bool(getattr(args, "npo", None)))
    if args.guidance is None:
        args.guidance = family.default_guidance_scale
    return family


def open_pipeline(args: argparse.Namespace, device: str, dtype) -> tuple[object, dict]:
    """``load_pipeline`` with the adapter flags; (pipeline, the setup recorded next to its images)."""
    adapters = {"lora": args.lora, "npo": args.npo, "npo_merge_weight": args.npo_merge_weight,
                "segments": args.segments}
    adapters.update({key: getattr(args, key) for key in ("lora_scale", "npo_scale") if hasattr(args, key)})
    speed = {key: getattr(args, key) for key in ("compile", "attention") if getattr(args, key, None)}
    pipe = load_pipeline(args.model, **adapters, **speed, scheduler=args.scheduler, torch_dtype=dtype, device=device)
    setup = {"model": args.model, **adapters, "scheduler": args.scheduler or type(pipe.scheduler).__name__}
    return pipe, setup


# ---------------------------------------------------------------------------------------------- train, tiny, export
def train_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if cfg.segments:
        results = train_segments(cfg)
        echo(*(f"segment {list(segment.interval)}: {result.lora_path}" for segment, result in zip(cfg.segments, results)),
             f"segments file: {results[-1].output_dir.parent / 'segments.yaml'}  (diffalign sample --segments ...)")
        return 0
    result = train(cfg)
    echo(f"{'LoRA:' if result.lora_path and result.lora_path.is_file() else 'weights:':<13}{result.lora_path}",
         f"model card:  {result.output_dir / 'README.md'}",
         *([f"sample grid: {result.grid_path}"] if result.grid_path else []))
    return 0


def tiny_model_command(args: argparse.Namespace) -> int:
    path = build_tiny_model(args.dir, name=args.model, seed=args.seed)
    echo(f"tiny {args.model} model written to {path}; load it with DiffusionPipeline.from_pretrained('{path}')")
    return 0


def tiny_data_command(args: argparse.Namespace) -> int:
    path = build_tiny_pairs(args.dir, num_pairs=args.num_pairs, seed=args.seed)
    echo(f"tiny preference data written to {path}/pairs.parquet (Pick-a-Pic schema) and {path}/jsonl/")
    return 0


def tiny_reward_command(args: argparse.Namespace) -> int:
    path = build_tiny_reward(args.dir, args.reward, seed=args.seed)
    echo(f"tiny {args.reward} reward written to {path}; use it with --reward {args.reward} --weights {path}")
    return 0


def tiny_lora_command(args: argparse.Namespace) -> int:
    path = build_tiny_lora(args.dir, base=args.base, seed=args.seed)
    echo(f"random LoRA for {args.base} written to {path}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    echo(f"kohya LoRA written to {export_kohya(args.run_dir, args.out)}")
    return 0


# ---------------------------------------------------------------------------------------------- sample, score
def sample_command(args: argparse.Namespace) -> int:
    prompts = read_prompts(args.prompt, args.prompts, args.prompt_set)
    device, dtype = pick_device(args)
    sampling_family(args)
    pipe, setup = open_pipeline(args, device, dtype)
    settings = SampleSettings(num_images=args.num_images, seed=args.seed, steps=args.steps,
                              guidance_scale=args.guidance, negative_prompt=args.negative_prompt,
                              height=args.height, width=args.width, batch_size=args.batch_size,
                              true_cfg_scale=args.true_cfg)
    log = sample_to_folder(pipe, prompts, settings, args.out, setup)
    echo(f"{len(prompts) * args.num_images} images in {args.out}; per-image settings in {log}; "
         f"overview in {log.parent / 'overview' / 'grid.png'}")
    return 0


def score_command(args: argparse.Namespace) -> int:
    names, paths, weights = reward_flags(args)
    rows = collect_rows(args.images, args.prompts, follow_symlinks=args.follow_symlinks)
    device, _ = pick_device(args)
    score_rows(rows, build_rewards(names, paths, device), args.batch_size, max_pixels=args.max_image_pixels)
    left_out = add_ensemble(rows, names, weights)
    columns = names + (["ensemble_z"] if any("ensemble_z" in row.scores for row in rows) else [])
    out = write_rows(rows, columns, args.out)
    echo(*([left_out] if left_out else []), summary(rows, columns), f"scores written to {out}")
    if not any(row.error is None for row in rows):
        print("diffalign score: error: nothing could be scored; see the error column", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------- pairs, eval
def pairs_command(args: argparse.Namespace) -> int:
    if args.repeat < 1:
        raise ConfigError(f"--repeat must be at least 1, got {args.repeat}")
    names, paths, weights = reward_flags(args)
    sampling_family(args)
    settings = PairSettings(images_per_prompt=args.images_per_prompt, seed=args.seed, steps=args.steps,
                            guidance_scale=args.guidance, negative_prompt=args.negative_prompt,
                            true_cfg_scale=args.true_cfg, batch_size=args.batch_size, selection=args.selection,
                            margin=args.margin, kto_fraction=args.kto_fraction, format=args.format).validate()
    device, dtype = pick_device(args)
    if args.prompts is not None:  # a file, or any prompt set eval takes
        prompts = load_prompts(args.prompts, limit=args.limit, source=args.prompts_source)
    else:
        prompts = read_prompts(args.prompt, None, args.prompt_set)[: args.limit]
    rewards = build_rewards(names, paths, device)
    pipe, setup = open_pipeline(args, device, dtype)
    result = generate_pairs(pipe, prompts * args.repeat, rewards, settings, args.out, weights=weights, setup=setup,
                            overwrite=args.overwrite)
    echo(pairs_summary(result))
    return 0


def eval_command(args: argparse.Namespace) -> int:
    setups = parse_setups(args.setup, scheduler=args.scheduler, compile=args.compile, attention=args.attention)
    names, paths, _ = reward_flags(args)
    prompts = load_prompts(args.prompts, limit=args.limit, source=args.prompts_source)
    if args.guidance is None:  # the model's own default (FLUX: 3.5); read after the cheaper checks
        args.guidance = detect_family(resolve_pretrained(args.model)).default_guidance_scale
    device, dtype = pick_device(args)
    rewards = build_rewards(names, paths, device)
    settings = SampleSettings(num_images=args.num_images, seed=args.seed, steps=args.steps,
                              guidance_scale=args.guidance, negative_prompt=args.negative_prompt,
                              batch_size=args.batch_size, true_cfg_scale=args.true_cfg)
    report = run_eval(args.model, setups, prompts, rewards, settings, args.out, confidence=args.confidence,
                      resamples=args.resamples, device=device, torch_dtype=dtype)
    echo(report.markdown, *(f"{key + ':':<10}{report.paths[key]}" for key in RESULT_KEYS))
    return 0
