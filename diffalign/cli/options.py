"""Flag groups shared by several commands, each defined once, and the parsing of their values.

Choices and the names listed in help texts come from the registries (``REWARDS``, ``SAMPLERS``,
``PROMPT_SETS``), so a newly registered entry is accepted and shown without touching the CLI.
"""

from __future__ import annotations

import argparse
import math
from decimal import Decimal, InvalidOperation

import torch

from diffalign.errors import ConfigError
from diffalign.evaluation.prompts import PROMPT_SETS
from diffalign.guidance import SAMPLERS
from diffalign.rewards import REWARDS, require_scalar

DTYPES = ("float32", "float16", "bfloat16")
MODEL_HELP = "hub id, diffusers folder or tiny:<model> (diffalign tiny model --help)"


def add_model_option(parser: argparse.ArgumentParser, help_prefix: str = "") -> None:
    parser.add_argument("--model", default="tiny:sd15", help=help_prefix + MODEL_HELP)


def add_prompt_source(parser: argparse.ArgumentParser, prompts_help: str) -> None:
    """Exactly one of --prompt, --prompts FILE or --prompt-set NAME (sample and pairs)."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="one prompt")
    group.add_argument("--prompts", help=prompts_help)
    group.add_argument("--prompt-set", metavar="NAME",
                       help=f"a prompt set: {', '.join(PROMPT_SETS)} (diffalign list prompt-sets)")


def add_reward_options(parser: argparse.ArgumentParser, ensemble_help: str | None = None) -> None:
    """--reward and --weights; --ensemble-weights too when ``ensemble_help`` says what the weights combine."""
    parser.add_argument("--reward", default="clip",
                        help=f"comma-separated reward names: {', '.join(REWARDS)} (diffalign list rewards)")
    parser.add_argument("--weights", action="append", default=[], metavar="[NAME=]PATH",
                        help="local reward weights: PATH (one reward) or NAME=PATH, repeat for several; a reward "
                             "without local weights downloads its real ones once")
    if ensemble_help:
        parser.add_argument("--ensemble-weights", default=None, metavar="NAME=W,...", help=ensemble_help)


def add_scheduler_option(parser: argparse.ArgumentParser, help_prefix: str = "") -> None:
    parser.add_argument("--scheduler", default=None, choices=SAMPLERS.names(), metavar="NAME",
                        help=f"{help_prefix}{', '.join(SAMPLERS)} (diffalign list samplers); default: the model's own")


def add_speed_options(parser: argparse.ArgumentParser) -> None:
    """--compile and --attention: the training run's train.compile and train.attention, for sampling."""
    parser.add_argument("--compile", default=None, choices=["off", "denoiser", "blocks"],
                        help="torch.compile the denoiser's repeated blocks (blocks) or all of it (denoiser)")
    parser.add_argument("--attention", default=None, choices=["sdpa", "xformers"],
                        help="attention backend (default sdpa; xformers needs CUDA and the xformers extra)")


def add_adapter_options(parser: argparse.ArgumentParser) -> None:
    """The adapters of ``load_pipeline``: --lora, --npo, --npo-merge-weight, --segments, --scheduler."""
    parser.add_argument("--lora", help="positive LoRA: run folder or .safetensors")
    parser.add_argument("--npo", help="negative LoRA (npo / self_npo run) for the unconditional branch")
    parser.add_argument("--npo-merge-weight", type=float, default=0.0, help="m in base + npo + (1-m) * lora")
    parser.add_argument("--segments", help="segments.yaml from a timestep-segment run")
    add_scheduler_option(parser)


def add_sampling_options(parser: argparse.ArgumentParser, steps: int, batch_size: int) -> None:
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--guidance", type=float, default=None,
                        help="guidance scale: classifier-free on SD, SDXL and SD3; FLUX.1-dev's embedded value "
                             "(schnell has none); default: the model's (7.5; FLUX 3.5)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--true-cfg", type=float, default=None, metavar="SCALE",
                        help="FLUX: true classifier-free guidance with this scale (runs a negative branch; --npo on "
                             "FLUX needs it, e.g. 4.0; --guidance stays the embedded guidance value)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="images per pipeline call")
    add_device_options(parser)


def add_device_options(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    if dtype:
        parser.add_argument("--dtype", choices=DTYPES, default=None)


def pick_device(args: argparse.Namespace) -> tuple[str, torch.dtype | None]:
    """(device, torch dtype or None) from --device / --dtype."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(args, "dtype", None)
    if dtype == "float16" and device == "cpu":
        raise ConfigError("--dtype float16 needs a GPU; use float32 or bfloat16 on CPU")
    return device, getattr(torch, dtype) if dtype else None


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


def reward_flags(args: argparse.Namespace) -> tuple[list[str], dict[str, str], dict[str, float] | None]:
    """--reward, --weights and --ensemble-weights, checked before any work: (names, {name: weights path},
    {name: ensemble weight} or None)."""
    names = reward_names(args.reward)
    require_scalar(names, f"diffalign {getattr(args, 'command', '')}".strip())
    paths = parse_named(args.weights, names, "--weights")
    return names, paths, ensemble_weights(getattr(args, "ensemble_weights", None), names)


def reward_names(reward: str) -> list[str]:
    """--reward NAME[,NAME...] -> the names, each a registered reward (else a ConfigError naming the closest)."""
    names = [name.strip() for name in reward.split(",") if name.strip()]
    if not names:
        raise ConfigError("--reward needs at least one reward name, e.g. --reward clip")
    for name in names:
        REWARDS.get(name)
    return names


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
            raise ConfigError(f"{what} '{value}': with several rewards use NAME=PATH, NAME one of {names}")
    return mapping


def ensemble_weights(text: str | None, names: list[str]) -> dict[str, float] | None:
    """--ensemble-weights NAME=W,... -> {name: weight}, or None. Each W is a finite number >= 0 (rewards not named
    weigh 1), NAME one of ``names``; a bare W is taken for the reward when there is only one. Raises ConfigError
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
            raise ConfigError(f"--ensemble-weights '{entry}': {unknown}; use NAME=W with NAME one of {names}, "
                              f"e.g. {names[0]}=2")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"--ensemble-weights '{entry}': the weight '{value}' is not a finite number >= 0; "
                              f"use NAME=W with W such as 2 or 0.5, e.g. {name}=2")
        weights[name] = weight
    if weights and sum(weights.get(name, 1.0) for name in names) <= 0:
        raise ConfigError(f"--ensemble-weights '{text}': the weights sum to 0; give at least one of {names} a "
                          "weight above 0")
    return weights or None
