"""Prompt sets: shipped lists, local files, PartiPrompts and the HPSv2 benchmark; ``PROMPT_SETS`` names them.

    >>> load_prompts("shapes", limit=2)         # diffalign/assets/prompts/shapes.txt, shipped in the package
    ['a square on a grey background', 'a circle on a grey background']

``load_prompts`` also takes a file (``my_prompts.txt``, one per line, or ``.jsonl`` with a "prompt" key),
``parti:Animals`` (PartiPrompts, hub dataset nateraw/parti-prompts, one category), ``hpsv2:photo`` (the HPSv2
benchmark, hub dataset zhwang/HPDv2, ``benchmark/photo.json``), and ``source=/data/HPDv2`` for a local copy (a
folder holding ``benchmark/<style>.json``). ``read_prompts`` (for ``diffalign sample`` and ``pairs``) takes
exactly one of a prompt, a prompts file and a prompt set.

``PROMPT_SETS`` holds every named set: one entry per ``diffalign/assets/prompts/<name>.txt`` (read with
``importlib.resources``, so a wheel install has them too), then ``parti`` and ``hpsv2``. ``diffalign list`` prints
it, and the CLI takes its names.

Formats, as published:
- PartiPrompts: ``PartiPrompts.tsv`` with columns ``Prompt``, ``Category``, ``Challenge``, ``Note`` (1,632 rows, one
  split ``train``). A local copy is that file (or a csv / parquet / json(l) with the same columns), or a folder
  holding one; it is read with ``datasets`` exactly as the hub copy is.
- HPSv2 benchmark: ``benchmark/{anime,concept-art,paintings,photo}.json``, each a JSON list of prompt strings (800
  each). ``hpsv2`` without a style is all four, in that order.

Text: .txt / .jsonl files are read by ``read_prompt_file`` (line by line, strictly UTF-8; bad lines are skipped and
reported in one logged line). A benchmark file that is not UTF-8 or not JSON is a one-line ``DataError`` naming the
file and line (a JSON document cannot be half read); entries of its list that are not usable text (a number, null,
a NUL or undecodable character) are skipped and reported like bad lines.

``limit`` keeps the first N prompts (after any category / style filter), so a limited set is deterministic.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from huggingface_hub import hf_hub_download

from diffalign.errors import ConfigError, DataError, MissingFile
from diffalign.logs import get_logger
from diffalign.paths import shipped
from diffalign.registry import Registry
from diffalign.text import (
    LineSkips,
    describe_value,
    json_problem,
    read_text,
    text_lines,
    text_problem,
)

logger = get_logger(__name__)

PARTI_REPO = "nateraw/parti-prompts"
HPSV2_REPO = "zhwang/HPDv2"
HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")
PARTI_SUFFIXES = {".tsv": "csv", ".csv": "csv", ".parquet": "parquet", ".jsonl": "json", ".json": "json"}
SHIPPED_DESCRIPTIONS = {  # a shipped .txt not named here is listed as "a shipped prompt list"
    "animals": "45 common animal names: prompts for online RL with an aesthetic reward, in the manner of DDPO's",
    "everyday": "a dozen everyday scenes (photos, paintings): a first look at a real model",
    "shapes": "three shapes on a grey background: the prompts of the tiny preference data",
    "toy": "three bare shape names: the prompts of the toy alignment run (tiny:toy, toy_redness)",
}


class PromptSetUnavailable(DataError):
    """A hub prompt set could not be fetched; the message says how to pass a local copy."""


@dataclass(frozen=True)
class PromptSet:
    """A named prompt set.

    Args:
        load: ``(option, source) -> prompts``: ``option`` is what follows ``name:`` (a category, a style; None
            when absent), ``source`` a local copy of a hub set (None: the hub).
        shipped: a list inside the package: no option, no source, no network.
    """

    load: Callable[[str | None, str | Path | None], list[str]]
    shipped: bool = False


PROMPT_SETS: Registry[PromptSet] = Registry("prompt set", "--prompt-set")


def load_prompts(spec: str, limit: int | None = None, source: str | Path | None = None) -> list[str]:
    """Prompts named by ``spec``.

    Args:
        spec: a .txt / .jsonl file, or a ``PROMPT_SETS`` name: a shipped set, ``parti[:Category]``,
            ``hpsv2[:style]``.
        limit: keep the first ``limit`` prompts (after any category / style filter).
        source: a local copy of a hub set (parti / hpsv2 only); None downloads it.

    Returns:
        The prompts, stripped, in file order.

    Raises:
        ConfigError: a bad ``limit``, an unknown ``spec``, a ``source`` for a set that has none.
        MissingFile: a prompts file or local copy that is not there. DataError: a file with no usable prompt.
        PromptSetUnavailable: a hub set that could not be fetched.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of prompts, got {limit}")
    hub = hub_sets()
    if source is not None and spec.partition(":")[0] not in hub:
        raise ConfigError(f"a prompts source (--prompts-source) is a local copy of {' or '.join(hub)}, not of '{spec}'")
    if Path(spec).is_file():
        prompts = read_prompt_file(spec)
    elif named_set(spec) is not None:
        prompts = load_prompt_set(spec, source)
    elif spec.endswith((".txt", ".jsonl")):
        raise MissingFile(f"prompts file {spec} not found")
    else:
        raise ConfigError(f"unknown prompts '{spec}': give a shipped set ({', '.join(shipped_sets())}), a .txt or "
                          f".jsonl file, parti, parti:<Category>, hpsv2 or hpsv2:<style> ({', '.join(HPSV2_STYLES)})")
    return prompts[:limit] if limit is not None else prompts


def read_prompts(prompt: str | None = None, prompts_file: str | None = None, prompt_set: str | None = None) -> list[str]:
    """Prompts from a string, a file or a prompt set name (``--prompt``, ``--prompts FILE``, ``--prompt-set``).

    Raises:
        ConfigError: not exactly one of the three, or an unknown set. MissingFile: no such file. DataError: a
        file with no usable prompt (see ``read_prompt_file``).
    """
    if sum(x is not None for x in (prompt, prompts_file, prompt_set)) != 1:
        raise ConfigError("give exactly one of --prompt, --prompts FILE or --prompt-set NAME")
    if prompt is not None:
        return [prompt]
    if prompt_set is not None:
        if named_set(prompt_set) is None:
            raise ConfigError(f"unknown prompt set '{prompt_set}'; shipped sets: {', '.join(shipped_sets())}; "
                              f"hub sets: {', '.join(hub_sets())}")
        return load_prompt_set(prompt_set)
    if not Path(prompts_file).is_file():
        raise MissingFile(f"prompts file {prompts_file} not found")
    return read_prompt_file(prompts_file)


def named_set(spec: str) -> PromptSet | None:
    """The set ``spec`` names (``name`` or, for hub sets, ``name:option``); None when it names none."""
    name, colon, _ = spec.partition(":")
    if name not in PROMPT_SETS:
        return None
    entry = PROMPT_SETS.get(name)
    return None if colon and entry.shipped else entry


def load_prompt_set(spec: str, source: str | Path | None = None) -> list[str]:
    name, _, option = spec.partition(":")
    return PROMPT_SETS.get(name).load(option or None, source)


def shipped_sets() -> list[str]:
    return [entry.name for entry in PROMPT_SETS.entries() if entry.value.shipped]


def hub_sets() -> list[str]:
    return [entry.name for entry in PROMPT_SETS.entries() if not entry.value.shipped]


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a ``.txt`` (one per line) or ``.jsonl`` file (one JSON object with a ``"prompt"`` per line).

    Blank lines are ignored and spaces around a prompt stripped; other keys of a jsonl line are ignored. Each line is
    decoded strictly as UTF-8 (``diffalign.text.text_lines``; a byte-order mark is dropped). A line that cannot give a
    prompt (not UTF-8, a NUL byte, not JSON, not an object, no ``prompt``, a prompt that is not text) is skipped, and
    one logged line gives the counts per reason and the first example ("line 3 of p.txt is not UTF-8 (byte 0xff at
    column 12)"). Raises ``DataError`` when no line gives a prompt.
    """
    path = Path(path)
    prompts, skips = [], LineSkips()
    for number, text, problem in text_lines(path):
        if problem is not None:
            skips.add("bad_text", problem)
        elif text.strip() and path.suffix == ".jsonl":
            prompt, reason, detail = jsonl_prompt(text)
            if reason is not None:
                skips.add(reason, f"line {number} of {path}: {detail}")
            else:
                prompts.append(prompt)
        elif text.strip():
            prompts.append(text.strip())
    summary = skips.summary(f"prompts from {path}", len(prompts))
    if summary:
        logger.info(summary)
    if not prompts:
        raise DataError(f"{path} holds no prompts" + (f" ({summary})" if summary else ""))
    return prompts


def jsonl_prompt(text: str) -> tuple[str | None, str | None, str | None]:
    """One jsonl line -> (prompt, None, None), or (None, reason, detail) when it gives no prompt."""
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as error:
        return None, "bad_json", f"not JSON ({json_problem(error)})"
    if not isinstance(entry, dict):
        return None, "bad_json", f"{describe_value(entry)}, not a JSON object with a \"prompt\""
    if "prompt" not in entry:
        return None, "missing_field", f"no \"prompt\" key (keys: {sorted(entry)[:10]})"
    prompt = entry["prompt"]
    problem = text_problem(prompt)
    if problem is not None:
        return None, "bad_text", problem
    if not prompt.strip():
        return None, "empty_prompt", "the prompt is blank"
    return prompt.strip(), None, None


def shipped_set_loader(name: str) -> Callable[[str | None, str | Path | None], list[str]]:
    """The loader of ``diffalign/assets/prompts/<name>.txt`` (found through ``importlib.resources``)."""

    def load(option: str | None, source: str | Path | None) -> list[str]:
        with resources.as_file(shipped("prompts", f"{name}.txt")) as path:
            return read_prompt_file(path)

    return load


# ---------------------------------------------------------------------------------------------- PartiPrompts
def parti_prompts(category: str | None = None, source: str | Path | None = None) -> list[str]:
    """PartiPrompts (``Prompt`` column), optionally one ``Category`` (case, spaces and dashes do not matter)."""
    table = load_parti_table(source)
    missing = [column for column in ("Prompt", "Category") if column not in table.column_names]
    if missing:
        raise DataError(f"the PartiPrompts table from {source or PARTI_REPO} lacks the column(s) {missing}; it has "
                         f"{table.column_names}. Expected the published columns Prompt, Category, Challenge, Note")
    prompts, categories = table["Prompt"], table["Category"]
    wanted = None
    if category is not None:
        wanted = normalise(category)
        available = sorted({str(c) for c in categories if c})
        if wanted not in {normalise(c) for c in available}:
            raise ConfigError(f"no PartiPrompts category '{category}'; categories: {', '.join(available)}")
    kept, skips = [], LineSkips()
    for row, (prompt, row_category) in enumerate(zip(prompts, categories)):
        if wanted is not None and not (row_category and normalise(row_category) == wanted):
            continue
        problem = None if prompt is None else text_problem(prompt)
        if problem is not None:
            skips.add("bad_text", f"row {row} of {source or PARTI_REPO}: {problem}")
        elif prompt is None or not prompt.strip():
            skips.add("empty_prompt", f"row {row} of {source or PARTI_REPO}: the prompt is empty")
        else:
            kept.append(prompt.strip())
    prompts = kept
    if summary := skips.summary(f"PartiPrompts from {source or PARTI_REPO}", len(prompts)):
        logger.info(summary)
    if not prompts:
        raise DataError(f"the PartiPrompts table from {source or PARTI_REPO} holds no prompts")
    return prompts


def normalise(name: str) -> str:
    return " ".join(str(name).lower().replace("-", " ").replace("_", " ").split())


def load_parti_table(source: str | Path | None):
    """A ``datasets.Dataset`` of PartiPrompts from the hub, or from a local file or folder in the same format."""
    import datasets  # seconds to import: only when PartiPrompts are read

    if source is None:
        try:
            return datasets.load_dataset(PARTI_REPO, split="train")
        except Exception as error:  # offline, proxy, hub outage: say how to work without the hub
            raise PromptSetUnavailable(
                f"could not load PartiPrompts from the hub ({PARTI_REPO}): {first_line(error)}. Without network access, "
                f"download PartiPrompts.tsv from https://huggingface.co/datasets/{PARTI_REPO} and pass it with "
                "--prompts-source PATH (source=PATH): the .tsv file, or a folder holding it") from error
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in PARTI_SUFFIXES)
        if not files:
            raise MissingFile(f"PartiPrompts source {path} holds no {', '.join(PARTI_SUFFIXES)} file")
        path = next((p for p in files if p.suffix == ".tsv"), files[0])  # the published file is a .tsv
    if not path.is_file():
        raise MissingFile(f"PartiPrompts source {path} not found: give PartiPrompts.tsv (or a csv, parquet or "
                                "jsonl with columns Prompt and Category), or a folder holding it")
    if path.suffix not in PARTI_SUFFIXES:
        raise DataError(f"PartiPrompts source {path}: expected one of {', '.join(PARTI_SUFFIXES)}")
    if path.suffix != ".parquet":  # text tables: name the first line that is not UTF-8 before datasets reads it
        for line in text_lines(path):
            if line.problem is not None:
                raise DataError(f"PartiPrompts source {line.problem}; save it as UTF-8 text")
    options = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
    return datasets.load_dataset(PARTI_SUFFIXES[path.suffix], data_files=str(path), split="train", **options)


# ---------------------------------------------------------------------------------------------- HPSv2 benchmark
def hpsv2_prompts(style: str | None = None, source: str | Path | None = None) -> list[str]:
    """The HPSv2 benchmark prompts of one style, or of all four styles in the published order."""
    if style is not None and style not in HPSV2_STYLES:
        raise ConfigError(f"unknown HPSv2 style '{style}'; styles: {', '.join(HPSV2_STYLES)}")
    prompts = []
    for name in [style] if style else HPSV2_STYLES:
        path = hpsv2_file(name, source)
        try:
            values = json.loads(read_text(path))
        except json.JSONDecodeError as error:
            raise DataError(f"{path} is not valid JSON ({json_problem(error)}); expected a JSON list of prompt "
                             "strings (the HPSv2 benchmark format)") from None
        if not isinstance(values, list):
            raise DataError(f"{path}: expected a JSON list of prompt strings (the HPSv2 benchmark format), found "
                             f"{describe_value(values)}")
        skips, kept = LineSkips(), 0
        for position, value in enumerate(values):
            problem = text_problem(value)
            if problem is not None:
                skips.add("bad_text", f"entry {position} of {path}: {problem}")
            elif not value.strip():
                skips.add("empty_prompt", f"entry {position} of {path}: the prompt is blank")
            else:
                prompts.append(value.strip())
                kept += 1
        if summary := skips.summary(f"prompts from {path}", kept):
            logger.info(summary)
    return prompts


def hpsv2_file(style: str, source: str | Path | None) -> Path:
    """``benchmark/<style>.json`` from the hub, or from a local folder (holding ``benchmark/`` or the files)."""
    filename = f"benchmark/{style}.json"
    if source is None:
        try:
            return Path(hf_hub_download(HPSV2_REPO, filename, repo_type="dataset"))
        except Exception as error:  # offline, proxy, hub outage: say how to work without the hub
            raise PromptSetUnavailable(
                f"could not download {filename} of the HPSv2 benchmark ({HPSV2_REPO}): {first_line(error)}. Without "
                f"network access, download benchmark/*.json from https://huggingface.co/datasets/{HPSV2_REPO} and "
                "pass --prompts-source DIR (source=DIR): a folder holding benchmark/<style>.json") from error
    folder = Path(source).expanduser()
    for candidate in (folder / filename, folder / f"{style}.json"):
        if candidate.is_file():
            return candidate
    raise MissingFile(f"HPSv2 source {folder} has no {filename}: give a folder holding benchmark/<style>.json "
                            f"for the styles {', '.join(HPSV2_STYLES)}")


def first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


# ---------------------------------------------------------------------------------------------- the named sets
SHIPPED_NAMES = sorted(item.name.removesuffix(".txt") for item in shipped("prompts").iterdir()
                       if item.name.endswith(".txt"))
for name in SHIPPED_NAMES:
    PROMPT_SETS.register(name, PromptSet(shipped_set_loader(name), shipped=True),
                         description=SHIPPED_DESCRIPTIONS.get(name, "a shipped prompt list"),
                         source=f"diffalign/assets/prompts/{name}.txt")
PROMPT_SETS.register(
    "parti", PromptSet(parti_prompts),
    description="PartiPrompts, 1,632 prompts in 12 categories; parti:<Category> keeps one (e.g. parti:Animals)",
    source=f"Yu et al. 2022, Parti (arXiv 2206.10789); hub dataset {PARTI_REPO}")
PROMPT_SETS.register(
    "hpsv2", PromptSet(hpsv2_prompts),
    description=f"the HPSv2 benchmark, 800 prompts per style; hpsv2:<style> keeps one ({', '.join(HPSV2_STYLES)})",
    source=f"Wu et al. 2023, Human Preference Score v2 (arXiv 2306.09341); hub dataset {HPSV2_REPO}, benchmark/")
