"""The ``diffalign`` argument parser: one builder per command, shared flag groups from ``cli.options``.

Every command's parser carries an epilog of working examples (``cli.examples``) and its handler
(``set_defaults(handler=...)``); the choices come from the registries.
"""

from __future__ import annotations

import argparse

from diffalign.cli import commands, examples
from diffalign.cli.listing import KINDS, run_list
from diffalign.cli.options import (
    add_adapter_options,
    add_device_options,
    add_model_option,
    add_prompt_source,
    add_reward_options,
    add_sampling_options,
    add_scheduler_option,
    add_speed_options,
    pixel_limit,
)
from diffalign.evaluation.pair_selection import SELECTIONS, VIEWS
from diffalign.images import PILLOW_MAX_PIXELS
from diffalign.offline import TINY_MODELS
from diffalign.rewards.tiny import TINY_REWARDS

FORMATTER = argparse.RawDescriptionHelpFormatter
DEBUG_HELP = "on an error, show its traceback too (or set DIFFALIGN_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffalign", description="Align text-to-image diffusion models with human "
                                     "preferences.", epilog=examples.MAIN_EXAMPLES, formatter_class=FORMATTER)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (add_train, add_tiny, add_sample, add_score, add_pairs, add_eval, add_export, add_list):
        add(subcommands)
    return parser


def command(subcommands, name: str, handler, help: str, epilog: str, description: str | None = None):
    """A subcommand's parser, with its examples, its handler and ``--debug`` (also taken after the command)."""
    parser = subcommands.add_parser(name, help=help, description=description or help[:1].upper() + help[1:] + ".",
                                    epilog=epilog, formatter_class=FORMATTER)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    parser.set_defaults(handler=handler)
    return parser


def add_train(subcommands) -> None:
    train = command(subcommands, "train", commands.train_command, "train a LoRA with a preference objective",
                    examples.TRAIN_EXAMPLES, description="Train with a YAML config.")
    train.add_argument("config", help="YAML config, e.g. configs/tiny_dpo.yaml")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def add_tiny(subcommands) -> None:
    tiny = command(subcommands, "tiny", None, "build offline tiny models and data", examples.TINY_EXAMPLES,
                   description="Build tiny random-weight models and synthetic data, offline.")
    builders = tiny.add_subparsers(dest="tiny_command", metavar="WHAT", required=True)
    model = command(builders, "model", commands.tiny_model_command, "a tiny diffusers checkpoint",
                    examples.TINY_EXAMPLES)
    model.add_argument("dir")
    model.add_argument("--model", "--family", dest="model", default="sd15", choices=TINY_MODELS.names(),
                       metavar="NAME", help=f"{', '.join(TINY_MODELS)}: see diffalign tiny --help")
    data = command(builders, "data", commands.tiny_data_command, "a synthetic preference set (parquet + jsonl)",
                   examples.TINY_EXAMPLES)
    data.add_argument("dir")
    data.add_argument("--num-pairs", type=int, default=64)
    reward = command(builders, "reward", commands.tiny_reward_command,
                     "a tiny random-weight reward model in its real format", examples.TINY_EXAMPLES)
    reward.add_argument("dir")
    reward.add_argument("--reward", required=True, choices=TINY_REWARDS, metavar="NAME", help=", ".join(TINY_REWARDS))
    lora = command(builders, "lora", commands.tiny_lora_command, "a random LoRA for a tiny base",
                   examples.TINY_EXAMPLES)
    lora.add_argument("dir")
    lora.add_argument("--base", default="tiny:sd15")
    for builder in (model, data, reward, lora):
        builder.add_argument("--seed", type=int, default=0)


def add_sample(subcommands) -> None:
    sample = command(subcommands, "sample", commands.sample_command,
                     "generate images, with LoRA, NPO guidance or timestep segments", examples.SAMPLE_EXAMPLES,
                     description="Generate images for prompts with any guidance mode.")
    add_model_option(sample)
    add_prompt_source(sample, "file: one prompt per line, or jsonl with a 'prompt' key")
    add_adapter_options(sample)
    sample.add_argument("--lora-scale", type=float, default=1.0, help="weight of the positive LoRA")
    sample.add_argument("--npo-scale", type=float, default=1.0, help="weight of the NPO LoRA")
    sample.add_argument("--num-images", type=int, default=1, help="images per prompt")
    add_sampling_options(sample, steps=25, batch_size=4)
    add_speed_options(sample)
    sample.add_argument("--height", type=int, default=None)
    sample.add_argument("--width", type=int, default=None)
    sample.add_argument("--out", default="samples", help="output folder")


def add_score(subcommands) -> None:
    score = command(subcommands, "score", commands.score_command,
                    "rate images with reward models (CLIP, HPSv2, PickScore, aesthetic)", examples.SCORE_EXAMPLES,
                    description="Score images against their prompts.")
    score.add_argument("--images", required=True, help="folder or glob of images")
    score.add_argument("--prompts", default=None, help="txt (one per line) or jsonl with file_name + prompt")
    add_reward_options(score, ensemble_help="NAME=W,... for the ensemble_z column")
    score.add_argument("--batch-size", type=int, default=16)
    add_device_options(score, dtype=False)
    score.add_argument("--out", default="scores.csv", help="scores.csv or scores.jsonl")
    score.add_argument("--max-image-pixels", type=pixel_limit, default=PILLOW_MAX_PIXELS, metavar="N",
                       help="images with more pixels are error rows (default: Pillow's %(default)s; none = no limit)")
    score.add_argument("--follow-symlinks", action="store_true",
                       help="also score symlinks that resolve outside the --images folder (default: error rows)")


def add_pairs(subcommands) -> None:
    pairs = command(subcommands, "pairs", commands.pairs_command,
                    "generate preference data: k images per prompt ranked by rewards", examples.PAIRS_EXAMPLES,
                    description="Synthetic preference pairs (AI feedback) in every format train reads.")
    add_model_option(pairs)
    add_prompt_source(pairs, "a prompts file, or any prompt set diffalign eval takes (parti, ...)")
    pairs.add_argument("--prompts-source", default=None, help="local copy of parti / hpsv2 (see diffalign eval -h)")
    pairs.add_argument("--limit", type=int, default=None, help="keep the first N prompts")
    pairs.add_argument("--repeat", type=int, default=1, help="use the prompt list N times (one group per entry)")
    add_reward_options(pairs, ensemble_help="NAME=W,... weights of the per-group z-scores")
    add_adapter_options(pairs)
    pairs.add_argument("--images-per-prompt", type=int, default=4, help="k images per group")
    pairs.add_argument("--selection", choices=SELECTIONS, default="best_worst",
                       help="best_worst: one pair per group; all: every pair whose gap exceeds --margin")
    pairs.add_argument("--margin", type=float, default=0.0, help="pairs (and groups) with a score gap <= this are dropped")
    pairs.add_argument("--kto-fraction", type=float, default=0.25, help="top / bottom fraction labelled 1 / 0")
    pairs.add_argument("--format", choices=VIEWS, default="pairs", help="the view written as DIR/metadata.jsonl")
    add_sampling_options(pairs, steps=25, batch_size=8)
    pairs.add_argument("--out", required=True, help="output folder (rerun to resume)")
    pairs.add_argument("--overwrite", action="store_true", help="replace an earlier run with another config")


def add_eval(subcommands) -> None:
    evaluate = command(subcommands, "eval", commands.eval_command,
                       "compare setups with the base: rewards, win rates, grids, plots", examples.EVAL_EXAMPLES,
                       description="Sample every setup with the same prompts and seeds and report win rates against "
                                   "the base.")
    add_model_option(evaluate, help_prefix="base: ")
    evaluate.add_argument("--prompts", required=True,
                          help="a prompt set (diffalign list prompt-sets; hub sets take :<option>) or .txt/.jsonl file")
    evaluate.add_argument("--prompts-source", default=None,
                          help="local copy of parti (PartiPrompts.tsv) or hpsv2 (folder)")
    evaluate.add_argument("--limit", type=int, default=None, help="keep the first N prompts")
    evaluate.add_argument("--setup", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                          help="a setup to compare with base; repeat for several")
    add_reward_options(evaluate)
    evaluate.add_argument("--num-images", type=int, default=1, help="images per prompt")
    add_sampling_options(evaluate, steps=25, batch_size=4)
    add_scheduler_option(evaluate, help_prefix="for every setup without its own: ")
    add_speed_options(evaluate)
    evaluate.add_argument("--confidence", type=float, default=0.95, help="level of the bootstrap interval")
    evaluate.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    evaluate.add_argument("--out", default="eval", help="output folder")


def add_export(subcommands) -> None:
    export = command(subcommands, "export", commands.export_command, "convert a trained LoRA to another format",
                     examples.EXPORT_EXAMPLES, description="Write a run's LoRA in another key format.")
    export.add_argument("run_dir", help="run folder or checkpoint folder holding pytorch_lora_weights.safetensors")
    export.add_argument("--format", choices=["kohya"], default="kohya")
    export.add_argument("--out", default=None, help="output file (default: next to the input)")


def add_list(subcommands) -> None:
    listing = command(subcommands, "list", run_list, "list what each registry holds: names, descriptions, sources",
                      examples.LIST_EXAMPLES)
    listing.add_argument("kind", nargs="?", choices=list(KINDS), metavar="KIND",
                         help=f"one of {', '.join(KINDS)} (default: all)")
