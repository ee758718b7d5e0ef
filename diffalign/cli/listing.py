"""``diffalign list [KIND]``: every registry's entries, each with its one-line description and source.

Like torchtune's ``tune ls``: what a config key or flag accepts, read from the registries the library itself uses,
so the list is never out of date.
"""

from __future__ import annotations

import argparse
import textwrap

from diffalign.data import FORMATS
from diffalign.evaluation.prompts import PROMPT_SETS
from diffalign.families import FAMILIES
from diffalign.guidance import SAMPLERS
from diffalign.objectives import OBJECTIVES
from diffalign.registry import Registry
from diffalign.rewards import REWARDS

# `diffalign list KIND` -> the registry; in the order `diffalign list` prints them
KINDS: dict[str, Registry] = {
    "objectives": OBJECTIVES,
    "families": FAMILIES,
    "rewards": REWARDS,
    "formats": FORMATS,
    "prompt-sets": PROMPT_SETS,
    "samplers": SAMPLERS,
}
WIDTH = 110


def format_registry(kind: str, registry: Registry) -> str:
    """A titled block: one entry per name, its description wrapped beside the name, its source below."""
    names = registry.names()
    column = max(map(len, names), default=0) + 4
    lines = [f"{kind} ({len(names)}; chosen with {registry.option})"]
    for entry in registry.entries():
        wrapped = textwrap.wrap(entry.description, WIDTH - column, break_on_hyphens=False) or [""]
        lines.append(f"  {entry.name:<{column - 2}}{wrapped[0]}")
        lines += [" " * column + line for line in wrapped[1:]]
        if entry.source:
            lines += [" " * column + line for line in textwrap.wrap(f"source: {entry.source}", WIDTH - column,
                                                                     break_on_hyphens=False)]
    return "\n".join(lines)


def run_list(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else list(KINDS)
    print("\n\n".join(format_registry(kind, KINDS[kind]) for kind in kinds))
    return 0
