"""The toy world's product loop: pairs on the toy base -> train each objective -> eval against the base.

``run_toy_alignment(out_dir, objectives)`` returns the table's rows and the stage timings;
``benchmarks/toy_alignment.py`` prints them (minutes on CPU, so there is no runnable example here).

Every step goes through the same code a user runs: ``diffalign pairs`` (``generate_pairs``) with the registered
``toy_redness`` reward, ``diffalign train`` (``train`` on ``configs/toy/<objective>.yaml``) and ``diffalign eval``
(``run_eval``) on held-out seeds. Objectives that write a *negative* LoRA (npo, self_npo) are evaluated as
NPO-guided sampling (their LoRA on the unconditional branch of CFG), and NPO also on top of the DPO LoRA. The
online objectives (grpo, pref_grpo, nft) read no pairs: each samples its own rounds from the model it trains,
scored by the same reward; the best of them is also compared head to head with DPO on the same seeds.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from diffalign.config import load_config
from diffalign.errors import ConfigError
from diffalign.evaluation.pairs import PairSettings, generate_pairs
from diffalign.evaluation.report import run_eval
from diffalign.evaluation.winrate import compare
from diffalign.guidance.pipeline import load_pipeline
from diffalign.guidance.sample import SampleSettings
from diffalign.offline.specs import resolve_model_spec
from diffalign.offline.toy_base import toy_prompts
from diffalign.rewards import build_reward
from diffalign.training.segments import train_segments
from diffalign.training.trainer import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "toy"  # the repository's configs/toy
OBJECTIVES = ("dpo", "sft", "npo", "sdpo", "mapo", "kto", "smpo", "rank_dpo", "self_npo", "dpo_segments", "grpo",
              "pref_grpo", "nft")
ONLINE = ("grpo", "pref_grpo", "nft")  # sample their own images from the model being trained: no pairs
NEGATIVE = ("npo", "self_npo")  # write a negative LoRA for the unconditional branch
PAIRS_VIEW = {"smpo": "scored", "rank_dpo": "ranked", "kto": "kto"}  # everything else trains on pairs
HELD_OUT_SEED = 1_000_000  # eval seeds start here; pair generation uses seeds below groups * k


@dataclass
class ToySettings:
    """The loop's sizes: pair groups, eval images, sampling steps and CFG, and overrides for every training run."""

    groups: int = 384  # prompt groups for pairs (the 3 toy prompts, repeated)
    images_per_group: int = 4
    eval_images: int = 200  # held-out images per setup, paired by seed with the base
    steps: int = 20  # DDIM steps for pairs and eval
    guidance_scale: float = 4.0
    batch_size: int = 48
    train_overrides: list[str] = field(default_factory=list)  # dotted overrides for every objective


@dataclass
class ToyRow:
    """One setup's line of the table: win rate vs the base with its 95% interval, mean reward, red share."""

    setup: str
    win_rate: float
    low: float
    high: float
    mean_reward: float
    red_share: float
    seconds: float  # training time of the LoRA(s) this setup uses (0 for the base)


def toy_config(objective: str, out_dir: Path, pairs_dir: Path, overrides: list[str], base: str | None = None):
    """``configs/toy/<objective>.yaml`` pointed at the pairs view it needs, its run folder and (when given) the base
    folder that made the pairs, so training never resolves ``tiny:toy`` in another cache."""
    path = CONFIGS / f"{objective}.yaml"
    if not path.is_file():
        raise ConfigError(f"no toy config for '{objective}' at {path}; available: {', '.join(OBJECTIVES)}")
    data = pairs_dir / PAIRS_VIEW.get(objective, "pairs")
    model = [f"model.pretrained={base}"] if base else []
    return load_config(path, [f"data.source={data}", f"train.output_dir={out_dir / objective}", *model, *overrides])


def train_objective(objective: str, out_dir: Path, pairs_dir: Path, overrides: list[str],
                    base: str | None = None) -> float:
    """Train one toy objective (skipped when its run folder already holds a finished LoRA); returns seconds."""
    cfg = toy_config(objective, out_dir, pairs_dir, overrides, base)
    timing = out_dir / objective / "toy_seconds.json"
    if timing.is_file():
        return json.loads(timing.read_text())["seconds"]
    started = time.time()
    if cfg.segments:
        train_segments(cfg)
    else:
        train(cfg)
    seconds = time.time() - started
    timing.write_text(json.dumps({"seconds": seconds}))
    return seconds


def eval_setups(objectives: list[str], out_dir: Path) -> dict[str, dict]:
    """Sampling setups for the trained objectives, each as ``load_pipeline`` keyword arguments."""
    setups: dict[str, dict] = {"base": {}}
    for objective in objectives:
        run = str(out_dir / objective)
        if objective in NEGATIVE:
            setups[f"{objective}-guided"] = {"npo": run}
        elif objective == "dpo_segments":
            setups[objective] = {"segments": str(out_dir / objective / "segments.yaml")}
        else:
            setups[objective] = {"lora": run}
    if "dpo" in objectives and "npo" in objectives:
        setups["dpo+npo-guided"] = {"lora": str(out_dir / "dpo"), "npo": str(out_dir / "npo")}
    return setups


def setup_seconds(setup: dict, seconds: dict[str, float]) -> float:
    """Training seconds of the runs a setup's LoRAs come from (a segments file names its run by its folder)."""
    paths = [setup.get("lora"), setup.get("npo"), setup.get("segments")]
    names = {Path(p).name if not p.endswith(".yaml") else Path(p).parent.name for p in paths if p}
    return sum(seconds.get(name, 0.0) for name in names)


def run_toy_alignment(out_dir: str | Path, objectives: list[str] | tuple[str, ...] = OBJECTIVES,
                      settings: ToySettings | None = None, seed: int = 0,
                      base: str | None = None) -> tuple[list[ToyRow], dict]:
    """The whole loop; returns the table rows and a timing dict (base, pairs, each objective, eval).

    ``base`` is a toy base folder; None resolves ``tiny:toy`` (pre-trained on first use, then cached)."""
    settings = settings or ToySettings()
    unknown = [name for name in objectives if name not in OBJECTIVES]
    if unknown:
        raise ConfigError(f"unknown toy objective(s) {unknown}; choose from {', '.join(OBJECTIVES)}")
    out_dir = Path(out_dir)
    timings: dict[str, float] = {}
    started = time.time()
    base = base or resolve_model_spec("tiny:toy", seed=seed)
    timings["base"] = time.time() - started
    rewards = {"toy_redness": build_reward("toy_redness")}
    prompts = toy_prompts()

    started = time.time()
    pairs_dir = out_dir / "pairs"
    pair_settings = PairSettings(images_per_prompt=settings.images_per_group, seed=seed, steps=settings.steps,
                                 guidance_scale=settings.guidance_scale, batch_size=settings.batch_size)
    group_prompts = [prompts[i % len(prompts)] for i in range(settings.groups)]
    if any(objective not in ONLINE for objective in objectives):  # online objectives sample their own
        generate_pairs(load_pipeline(base), group_prompts, rewards, pair_settings, pairs_dir)
        timings["pairs"] = time.time() - started

    seconds = {}
    for objective in objectives:
        seconds[objective] = train_objective(objective, out_dir, pairs_dir, settings.train_overrides, base)
        timings[objective] = seconds[objective]

    started = time.time()
    setups = eval_setups(list(objectives), out_dir)
    sample_settings = SampleSettings(num_images=math.ceil(settings.eval_images / len(prompts)), seed=HELD_OUT_SEED,
                                     steps=settings.steps, guidance_scale=settings.guidance_scale,
                                     batch_size=settings.batch_size)
    report = run_eval(base, setups, prompts, rewards, sample_settings, out_dir / "eval")
    timings["eval"] = time.time() - started
    rows = toy_rows(out_dir / "eval", setups, seconds)
    summary = {"rows": [asdict(row) for row in rows], "timings": timings, "report": str(report.paths["markdown"])}
    if "dpo+npo-guided" in setups:
        summary["dpo+npo-guided vs dpo"] = head_to_head(out_dir / "eval", "dpo+npo-guided", "dpo").as_dict()
    best = best_online(rows)
    if best is not None and "dpo" in setups:
        summary[f"{best} vs dpo"] = head_to_head(out_dir / "eval", best, "dpo").as_dict()
    (out_dir / "toy_alignment.json").write_text(json.dumps(summary, indent=2) + "\n")
    return rows, timings


def best_online(rows: list[ToyRow]) -> str | None:
    """The online setup with the highest win rate against the base, or None when none was trained."""
    online = [row for row in rows if row.setup in ONLINE]
    return max(online, key=lambda row: row.win_rate).setup if online else None


def toy_rows(eval_dir: Path, setups: dict[str, dict], seconds: dict[str, float]) -> list[ToyRow]:
    """Table rows from the eval folder: win rate and mean from report.json, red share from scores.jsonl."""
    report = json.loads((eval_dir / "report.json").read_text())
    table = report["rewards"]["toy_redness"]
    red: dict[str, list[bool]] = {}
    for line in (eval_dir / "scores.jsonl").read_text().splitlines():
        entry = json.loads(line)
        red.setdefault(entry["setup"], []).append(entry["toy_redness"] > 0)
    rows = []
    for name, setup in setups.items():
        entry = table[name]
        win = entry.get("win_rate") or {"rate": 0.5, "low": 0.5, "high": 0.5}
        rows.append(ToyRow(name, win["rate"], win["low"], win["high"], entry["mean"],
                           sum(red[name]) / len(red[name]), setup_seconds(setup, seconds)))
    return rows


def head_to_head(eval_dir: Path, setup: str, other: str, reward: str = "toy_redness"):
    """Win rate of ``setup`` against ``other`` (not the base), paired by prompt and seed, from scores.jsonl."""
    scores: dict[str, dict] = {setup: {}, other: {}}
    for line in (eval_dir / "scores.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry["setup"] in scores:
            scores[entry["setup"]][(entry["prompt_index"], entry["image_index"])] = entry[reward]
    keys = sorted(scores[other])
    return compare(torch.tensor([scores[setup][key] for key in keys], dtype=torch.float64),
                   torch.tensor([scores[other][key] for key in keys], dtype=torch.float64))


def format_table(rows: list[ToyRow]) -> str:
    """The rows as a markdown table (the README's toy-world table)."""
    lines = ["| setup | win rate vs base | 95% interval | mean reward | red share | train s |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        interval = "-" if row.setup == "base" else f"[{row.low:.3f}, {row.high:.3f}]"
        rate = "-" if row.setup == "base" else f"{row.win_rate:.3f}"
        lines.append(f"| {row.setup} | {rate} | {interval} | {row.mean_reward:+.4f} | {row.red_share:.2f} | "
                     f"{row.seconds:.0f} |")
    return "\n".join(lines)
