"""Prompt sets for evaluation: shipped lists, local files, PartiPrompts and the HPSv2 benchmark.

    load_prompts("shapes")                      # assets/prompts/shapes.txt
    load_prompts("my_prompts.txt")              # one per line, or .jsonl with a "prompt" key
    load_prompts("parti:Animals", limit=100)    # PartiPrompts (hub dataset nateraw/parti-prompts), one category
    load_prompts("hpsv2:photo")                 # HPSv2 benchmark (hub dataset zhwang/HPDv2, benchmark/photo.json)
    load_prompts("hpsv2", source="/data/HPDv2") # a local copy: a folder holding benchmark/<style>.json

Formats, as published:
- PartiPrompts: ``PartiPrompts.tsv`` with columns ``Prompt``, ``Category``, ``Challenge``, ``Note`` (1,632 rows, one
  split ``train``). A local copy is that file (or a csv / parquet / json(l) with the same columns), or a folder
  holding one; it is read with ``datasets`` exactly as the hub copy is.
- HPSv2 benchmark: ``benchmark/{anime,concept-art,paintings,photo}.json``, each a JSON list of prompt strings (800
  each). ``hpsv2`` without a style is all four, in that order.

Text: .txt / .jsonl files are read by ``diffalign.guidance.sample.read_prompts`` (line by line, strictly UTF-8; bad
lines are skipped and reported in one printed line). A benchmark file that is not UTF-8 or not JSON is a one-line
``ValueError`` naming the file and line (a JSON document cannot be half read); entries of its list that are not
usable text (a number, null, a NUL or undecodable character) are skipped and reported like bad lines.

``limit`` keeps the first N prompts (after any category / style filter), so a limited set is deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffalign.text import LineSkips, describe_value, json_problem, read_text, text_lines, text_problem

PARTI_REPO = "nateraw/parti-prompts"
HPSV2_REPO = "zhwang/HPDv2"
HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")
PARTI_SUFFIXES = {".tsv": "csv", ".csv": "csv", ".parquet": "parquet", ".jsonl": "json", ".json": "json"}


class PromptSetUnavailable(ValueError):
    """A hub prompt set could not be fetched; the message says how to pass a local copy."""


def load_prompts(spec: str, limit: int | None = None, source: str | Path | None = None) -> list[str]:
    """Prompts named by ``spec``: a shipped set name, a .txt / .jsonl file, ``parti[:Category]`` or
    ``hpsv2[:style]``. ``source`` is a local copy of the hub set (parti / hpsv2 only)."""
    from diffalign.guidance.sample import prompt_sets, read_prompts

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of prompts, got {limit}")
    name, _, option = spec.partition(":")
    if source is not None and name not in ("parti", "hpsv2"):
        raise ValueError(f"a prompts source (--prompts-source) is a local copy of parti or hpsv2, not of '{spec}'")
    if Path(spec).is_file():
        prompts = read_prompts(prompts_file=spec)
    elif name == "parti":
        prompts = parti_prompts(option or None, source)
    elif name == "hpsv2":
        prompts = hpsv2_prompts(option or None, source)
    elif spec in prompt_sets():
        prompts = read_prompts(prompt_set=spec)
    elif spec.endswith((".txt", ".jsonl")):
        raise FileNotFoundError(f"prompts file {spec} not found")
    else:
        raise ValueError(f"unknown prompts '{spec}': give a shipped set ({', '.join(prompt_sets())}), a .txt or .jsonl "
                         f"file, parti, parti:<Category>, hpsv2 or hpsv2:<style> ({', '.join(HPSV2_STYLES)})")
    return prompts[:limit] if limit is not None else prompts


# ---------------------------------------------------------------------------------------------- PartiPrompts
def parti_prompts(category: str | None = None, source: str | Path | None = None) -> list[str]:
    """PartiPrompts (``Prompt`` column), optionally one ``Category`` (case, spaces and dashes do not matter)."""
    table = load_parti_table(source)
    missing = [column for column in ("Prompt", "Category") if column not in table.column_names]
    if missing:
        raise ValueError(f"the PartiPrompts table from {source or PARTI_REPO} lacks the column(s) {missing}; it has "
                         f"{table.column_names}. Expected the published columns Prompt, Category, Challenge, Note")
    prompts, categories = table["Prompt"], table["Category"]
    wanted = None
    if category is not None:
        wanted = normalise(category)
        available = sorted({str(c) for c in categories if c})
        if wanted not in {normalise(c) for c in available}:
            raise ValueError(f"no PartiPrompts category '{category}'; categories: {', '.join(available)}")
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
        print(summary)
    if not prompts:
        raise ValueError(f"the PartiPrompts table from {source or PARTI_REPO} holds no prompts")
    return prompts


def normalise(name: str) -> str:
    return " ".join(str(name).lower().replace("-", " ").replace("_", " ").split())


def load_parti_table(source: str | Path | None):
    """A ``datasets.Dataset`` of PartiPrompts from the hub, or from a local file or folder in the same format."""
    import datasets

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
            raise FileNotFoundError(f"PartiPrompts source {path} holds no {', '.join(PARTI_SUFFIXES)} file")
        path = next((p for p in files if p.suffix == ".tsv"), files[0])  # the published file is a .tsv
    if not path.is_file():
        raise FileNotFoundError(f"PartiPrompts source {path} not found: give PartiPrompts.tsv (or a csv, parquet or "
                                "jsonl with columns Prompt and Category), or a folder holding it")
    if path.suffix not in PARTI_SUFFIXES:
        raise ValueError(f"PartiPrompts source {path}: expected one of {', '.join(PARTI_SUFFIXES)}")
    if path.suffix != ".parquet":  # text tables: name the first line that is not UTF-8 before datasets reads it
        for line in text_lines(path):
            if line.problem is not None:
                raise ValueError(f"PartiPrompts source {line.problem}; save it as UTF-8 text")
    options = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
    return datasets.load_dataset(PARTI_SUFFIXES[path.suffix], data_files=str(path), split="train", **options)


# ---------------------------------------------------------------------------------------------- HPSv2 benchmark
def hpsv2_prompts(style: str | None = None, source: str | Path | None = None) -> list[str]:
    """The HPSv2 benchmark prompts of one style, or of all four styles in the published order."""
    if style is not None and style not in HPSV2_STYLES:
        raise ValueError(f"unknown HPSv2 style '{style}'; styles: {', '.join(HPSV2_STYLES)}")
    prompts = []
    for name in [style] if style else HPSV2_STYLES:
        path = hpsv2_file(name, source)
        try:
            values = json.loads(read_text(path))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({json_problem(error)}); expected a JSON list of prompt "
                             "strings (the HPSv2 benchmark format)") from None
        if not isinstance(values, list):
            raise ValueError(f"{path}: expected a JSON list of prompt strings (the HPSv2 benchmark format), found "
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
            print(summary)
    return prompts


def hpsv2_file(style: str, source: str | Path | None) -> Path:
    """``benchmark/<style>.json`` from the hub, or from a local folder (holding ``benchmark/`` or the files)."""
    filename = f"benchmark/{style}.json"
    if source is None:
        from huggingface_hub import hf_hub_download

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
    raise FileNotFoundError(f"HPSv2 source {folder} has no {filename}: give a folder holding benchmark/<style>.json "
                            f"for the styles {', '.join(HPSV2_STYLES)}")


def first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"
