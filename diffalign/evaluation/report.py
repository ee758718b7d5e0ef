"""``diffalign eval``: sample every setup with the same prompts and seeds, score every image, report win rates.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from diffalign.guidance.sample import SampleSettings
    >>> from diffalign.offline.lora import build_tiny_lora
    >>> from diffalign.rewards import build_reward
    >>> lora = build_tiny_lora(Path(tempfile.mkdtemp()) / "lora")
    >>> report = run_eval("tiny:sd15", {"lora": {"lora": str(lora)}}, ["a red square", "a blue circle"],
    ...                   {"toy_redness": build_reward("toy_redness")}, SampleSettings(num_images=2, steps=2),
    ...                   tempfile.mkdtemp(), resamples=100)
    eval: setup 'base' (no adapters)
    eval: setup 'lora' {'lora': '...'}
    >>> sorted(report.paths)
    ['grid', 'markdown', 'report', 'scores', 'winrate']

With a real model: ``run_eval("stable-diffusion-v1-5/stable-diffusion-v1-5", {"dpo": {"lora": "runs/dpo"},
"guided": {"lora": "runs/dpo", "npo": "runs/npo"}}, load_prompts("parti", limit=200), {"hpsv21": reward}, ...)``.

A setup is a set of ``load_pipeline`` arguments; "base" (no adapters unless given) is the baseline and comes
first. Protocol: image j of prompt i has seed ``seed + i * num_images + j`` in every setup, so every setup starts
from the same noise for the same (prompt, image) pair; a setup wins an image when its score beats the base's score
of that pair, ties count half, and the interval is a bootstrap over the pairs (``diffalign.evaluation.winrate``).

Outputs in ``out_dir``: ``samples/<setup>/`` (images, samples.jsonl, overview), ``scores.jsonl`` (a row per setup x
image with every reward's score), ``report.json``, ``report.md`` (a table per reward), ``grid.png`` (rows = the first
images, columns = setups) and ``winrate.png`` (win rate per reward and setup with its interval).
"""

from __future__ import annotations

import gc
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from diffalign.errors import ConfigError, DataError
from diffalign.evaluation.plots import winrate_chart
from diffalign.evaluation.winrate import compare
from diffalign.families import detect_family, resolve_pretrained
from diffalign.guidance.pipeline import load_pipeline
from diffalign.guidance.sample import SampleSettings, check_true_cfg, sample_to_folder
from diffalign.guidance.samplers import SAMPLERS as SCHEDULERS
from diffalign.images import labelled_grid, load_image
from diffalign.logs import get_logger
from diffalign.rewards.base import require_scalar
from diffalign.rewards.scoring import ScoreRow, score_rows
from diffalign.text import write_jsonl
from diffalign.training.speed import check_speed_settings

logger = get_logger(__name__)

SETUP_KEYS = {"lora": str, "npo": str, "npo_merge_weight": float, "segments": str, "lora_scale": float,
              "npo_scale": float, "scheduler": str, "compile": str, "attention": str}
SETUP_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
GRID_ROWS = 8


@dataclass
class EvalReport:
    out_dir: Path
    setups: dict[str, dict]
    table: dict[str, dict[str, dict]]  # reward -> setup -> {mean, std, n, win_rate (vs base) or None}
    markdown: str
    paths: dict[str, Path] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- setups
def parse_setup(text: str) -> tuple[str, dict]:
    """``NAME:key=value,key=value`` -> (name, load_pipeline kwargs); ``NAME`` or ``NAME:`` is the plain base."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not SETUP_NAME.match(name):
        raise ConfigError(f"setup '{text}': the name before ':' must be letters, digits, '_', '-', '+' or '.' (it "
                         "names a folder), e.g. --setup dpo:lora=runs/dpo")
    kwargs = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not value.strip():
            raise ConfigError(f"setup '{text}': '{item}' is not key=value; valid keys: {', '.join(SETUP_KEYS)}")
        kwargs[key] = value.strip()
    return name, check_setup(name, kwargs)


def parse_setups(texts: list[str], scheduler: str | None = None, compile: str | None = None,
                 attention: str | None = None) -> dict[str, dict]:
    """Repeated ``--setup`` values -> {name: kwargs}; ``scheduler``, ``compile`` and ``attention`` apply to every
    setup (base included) that names none."""
    setups = {}
    for text in texts:
        name, kwargs = parse_setup(text)
        if name in setups:
            raise ConfigError(f"setup '{name}' is given twice; give each setup a distinct name")
        setups[name] = kwargs
    shared = {key: value for key, value in (("scheduler", scheduler), ("compile", compile),
                                            ("attention", attention)) if value}
    if shared:
        setups = {name: {**shared, **kwargs} for name, kwargs in {"base": {}, **setups}.items()}
    return setups


def check_setup(name: str, kwargs: dict) -> dict:
    """Known keys only, values of the right type (numbers converted), schedulers by name."""
    checked = {}
    for key, value in kwargs.items():
        if key not in SETUP_KEYS:
            raise ConfigError(f"setup '{name}': unknown key '{key}'; valid keys: {', '.join(SETUP_KEYS)}")
        try:
            checked[key] = SETUP_KEYS[key](value)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"setup '{name}': {key}={value!r} is not a {SETUP_KEYS[key].__name__}") from error
    if "scheduler" in checked and checked["scheduler"] not in SCHEDULERS:
        raise ConfigError(f"setup '{name}': unknown scheduler '{checked['scheduler']}'; choose one of "
                         f"{', '.join(SCHEDULERS)}")
    return checked


def with_base(setups: dict[str, dict]) -> dict[str, dict]:
    """Checked setups with "base" first (an empty one is added when missing)."""
    for name in setups:
        if not SETUP_NAME.match(name):
            raise ConfigError(f"setup name '{name}' must be letters, digits, '_', '-', '+' or '.' (it names a folder)")
    ordered = {"base": setups.get("base", {})}
    ordered.update({name: kwargs for name, kwargs in setups.items() if name != "base"})
    return {name: check_setup(name, kwargs) for name, kwargs in ordered.items()}


# ---------------------------------------------------------------------------------------------- sampling and scoring
def sample_setup(base: str, name: str, kwargs: dict, prompts: list[str], settings: SampleSettings, out_dir: Path,
                 device=None, torch_dtype=None) -> list[dict]:
    """Sample one setup into samples/<name>/ and return its samples.jsonl records; the pipeline is freed after."""
    pipe = load_pipeline(base, **kwargs, torch_dtype=torch_dtype, device=device)
    try:
        log = sample_to_folder(pipe, prompts, settings, out_dir / "samples" / name, {"setup": name, **kwargs})
    finally:
        del pipe
        gc.collect()  # one pipeline at a time: big models do not fit twice
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def score_setup(name: str, records: list[dict], rewards: dict, out_dir: Path, batch_size: int) -> list[dict]:
    """One scores.jsonl row per image of a setup: setup, file (relative to out_dir), prompt, seed, indices, scores."""
    folder = out_dir / "samples" / name
    rows = score_rows([ScoreRow(str(folder / r["file_name"]), r["prompt"]) for r in records], rewards, batch_size)
    failed = [row for row in rows if row.error]
    if failed:
        raise RuntimeError(f"could not score {len(failed)} images of setup '{name}': {failed[0].error}")
    return [{"setup": name, "file": f"samples/{name}/{record['file_name']}", "prompt": record["prompt"],
             "seed": record["seed"], "prompt_index": record["prompt_index"], "image_index": record["image_index"],
             **row.scores} for record, row in zip(records, rows)]


# ---------------------------------------------------------------------------------------------- statistics
def summarise(rows: list[dict], setups: list[str], rewards: list[str], confidence: float = 0.95,
              resamples: int = 10_000) -> dict[str, dict[str, dict]]:
    """reward -> setup -> {mean, std (population), n, win_rate}: win_rate compares each non-base setup with base,
    paired by (prompt_index, image_index), as ``winrate.compare`` does."""
    by_setup = {name: {(r["prompt_index"], r["image_index"]): r for r in rows if r["setup"] == name} for name in setups}
    keys = sorted(by_setup[setups[0]])
    for name in setups[1:]:
        if sorted(by_setup[name]) != keys:
            raise RuntimeError(f"setup '{name}' and base did not sample the same (prompt, image) pairs")
    table: dict[str, dict[str, dict]] = {}
    for reward in rewards:
        base = torch.tensor([by_setup[setups[0]][key][reward] for key in keys], dtype=torch.float64)
        table[reward] = {}
        for name in setups:
            values = torch.tensor([by_setup[name][key][reward] for key in keys], dtype=torch.float64)
            win = None
            if name != setups[0]:
                win = compare(values, base, confidence=confidence, resamples=resamples).as_dict()
            table[reward][name] = {"mean": float(values.mean()), "std": float(values.std(unbiased=False)),
                                   "n": len(keys), "win_rate": win}
    return table


def markdown(table: dict[str, dict[str, dict]], confidence: float) -> str:
    """A table per reward: setup | mean | win rate vs base | interval | wins/ties/n."""
    level = f"{confidence:.0%}"
    parts = []
    for reward, setups in table.items():
        lines = [f"### {reward}", "", f"| setup | mean | win rate vs base | {level} interval | wins/ties/n |",
                 "|---|---|---|---|---|"]
        for name, stats in setups.items():
            win = stats["win_rate"]
            if win is None:
                lines.append(f"| {name} | {stats['mean']:.4f} ± {stats['std']:.4f} | (baseline) | | |")
            else:
                lines.append(f"| {name} | {stats['mean']:.4f} ± {stats['std']:.4f} | {win['rate']:.3f} | "
                             f"[{win['low']:.3f}, {win['high']:.3f}] | {win['wins']}/{win['ties']}/{win['n']} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------- the run
def run_eval(base: str, setups: dict[str, dict], prompts: list[str], rewards: dict, settings: SampleSettings,
             out_dir: str | Path, confidence: float = 0.95, resamples: int = 10_000, device=None,
             torch_dtype: torch.dtype | None = None) -> EvalReport:
    """Sample and score every setup, compare each with base; writes the files listed in the module docstring.

    Args:
        base: hub id, diffusers folder or tiny:<family>, shared by every setup.
        setups: name -> ``load_pipeline`` kwargs (lora, npo, npo_merge_weight, segments, lora_scale, npo_scale,
            scheduler); "base" is the baseline and is added (with no adapters) when missing.
        settings: a ``guidance.sample.SampleSettings`` (images per prompt, seed, steps, guidance, ...).
        confidence, resamples: the bootstrap interval of each win rate (``winrate.compare``).

    Returns:
        An ``EvalReport``: ``table[reward][setup]`` = {mean, std, n, win_rate (None for base)}, the markdown, and
        the paths of scores.jsonl, report.json, report.md, grid.png and winrate.png.

    Raises:
        ConfigError: no reward, a pairwise reward, a bad confidence or setup. DataError: no prompts.
    """
    if not prompts:
        raise DataError("no prompts to evaluate on")
    if not rewards:
        raise ConfigError("give at least one reward to compare the setups with")
    require_scalar(rewards, "diffalign eval (run_eval)")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    setups = with_base(setups)
    family = detect_family(resolve_pretrained(base))
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for name, kwargs in setups.items():  # before any setup is sampled
        check_true_cfg(family, settings.true_cfg_scale, bool(kwargs.get("npo")), f"setup '{name}': ")
        try:
            check_speed_settings(kwargs.get("attention", "sdpa"), kwargs.get("compile", "off"), target)
        except ConfigError as error:
            raise ConfigError(f"setup '{name}': {error}") from error
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, kwargs in setups.items():
        logger.info(f"eval: setup '{name}' {kwargs or '(no adapters)'}")
        records = sample_setup(base, name, kwargs, prompts, settings, out_dir, device, torch_dtype)
        rows += score_setup(name, records, rewards, out_dir, settings.batch_size)
    paths = {"scores": out_dir / "scores.jsonl"}
    write_jsonl(paths["scores"], rows)
    table = summarise(rows, list(setups), list(rewards), confidence, resamples)
    text = markdown(table, confidence)
    report = {"base": base, "settings": asdict(settings), "prompts": len(prompts),
              "images_per_setup": len(prompts) * settings.num_images, "confidence": confidence,
              "resamples": resamples, "setups": setups, "rewards": table}
    paths["report"] = out_dir / "report.json"
    paths["report"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"] = out_dir / "report.md"
    paths["markdown"].write_text(f"# Evaluation of {base}\n\n{len(prompts)} prompts x {settings.num_images} images, "
                                 f"seed {settings.seed}, {settings.steps} steps, guidance {settings.guidance_scale}\n\n"
                                 + text)
    paths["grid"] = write_setup_grid(rows, list(setups), next(iter(rewards)), out_dir)
    wins = {reward: {name: stats["win_rate"] for name, stats in by_setup.items() if stats["win_rate"]}
            for reward, by_setup in table.items()}
    paths["winrate"] = winrate_chart(wins, out_dir / "winrate.png", confidence)
    return EvalReport(out_dir=out_dir, setups=setups, table=table, markdown=text, paths=paths)


def write_setup_grid(rows: list[dict], setups: list[str], reward: str, out_dir: Path) -> Path:
    """Rows = one image per prompt, round-robin over prompts (one prompt and seed per row), columns = setups, each
    captioned with ``reward``."""
    def spread(row: dict) -> tuple[int, int]:  # first image of every prompt, then the second, ...
        return row["image_index"], row["prompt_index"]

    def read(row: dict):  # an image this command wrote: no pixel limit
        return load_image(out_dir / row["file"], max_pixels=None)

    by_setup = {name: sorted((row for row in rows if row["setup"] == name), key=spread)[:GRID_ROWS] for name in setups}
    firsts = by_setup[setups[0]]
    grid = labelled_grid([[read(by_setup[name][i]) for name in setups] for i in range(len(firsts))],
                         row_labels=[f"{row['prompt']} (seed {row['seed']})" for row in firsts],
                         cell_labels=[[f"{reward} {by_setup[name][i][reward]:.4g}" for name in setups]
                                      for i in range(len(firsts))],
                         column_labels=setups)
    path = out_dir / "grid.png"
    grid.save(path)
    return path
