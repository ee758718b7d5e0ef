"""The settings of ``diffalign pairs`` and its pure part: which images of a scored group become preference pairs,
rankings and KTO labels, and the views (``metadata.jsonl`` entries) they make. No I/O here; ``pairs`` samples,
scores and writes.

A group is one prompt's k images with their scores (``Group``, one line of ``groups.jsonl``). ``select_pairs`` picks
(chosen, rejected) pairs, ``kto_labels`` labels the top and bottom of a group, and ``build_views`` turns finished
groups into the four views ``pairs``, ``scored``, ``ranked`` and ``kto`` (see ``diffalign.evaluation.pairs``).
"""

from __future__ import annotations

from dataclasses import dataclass

from diffalign.errors import ConfigError

VIEWS = ("pairs", "scored", "ranked", "kto")
SELECTIONS = ("best_worst", "all")
FILE_KEYS = ("chosen_file_name", "rejected_file_name", "file_name")


@dataclass
class PairSettings:
    images_per_prompt: int = 4  # k images per group
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 4.0
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None  # FLUX: true CFG's scale (a negative branch; NPO guidance there needs it)
    batch_size: int = 8  # images per pipeline call, across groups
    selection: str = "best_worst"  # best_worst: one pair per group; all: every pair whose gap exceeds margin
    margin: float = 0.0  # a pair (or group spread) with gap <= margin is not a preference
    kto_fraction: float = 0.25  # top fraction of a group labelled 1, bottom fraction 0 (at least one each)
    format: str = "pairs"  # the view written as the folder's own metadata.jsonl

    def validate(self) -> PairSettings:
        if self.images_per_prompt < 2:
            raise ConfigError(f"images_per_prompt must be at least 2 to compare images, got {self.images_per_prompt}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"unknown selection '{self.selection}'; choose {' or '.join(SELECTIONS)}")
        if self.format not in VIEWS:
            raise ConfigError(f"unknown format '{self.format}'; choose one of {', '.join(VIEWS)}")
        if self.margin < 0:
            raise ConfigError(f"margin must be >= 0, got {self.margin}")
        if not 0 < self.kto_fraction <= 0.5:
            raise ConfigError(f"kto_fraction must be in (0, 0.5], got {self.kto_fraction}")
        if self.batch_size < 1 or self.steps < 1:
            raise ConfigError("batch_size and steps must be at least 1")
        return self


@dataclass
class Group:
    """One line of groups.jsonl: a prompt's k images, their scores per reward and their combined scores."""

    prompt_index: int
    prompt: str
    seeds: list[int]
    file_names: list[str]  # relative to the output folder
    scores: dict[str, list[float]]
    combined: list[float]


# ---------------------------------------------------------------------------------------------- selection
def spread(scores: list[float]) -> float:
    return max(scores) - min(scores)


def select_pairs(scores: list[float], selection: str = "best_worst", margin: float = 0.0) -> list[tuple[int, int]]:
    """(chosen, rejected) image indices of one group. best_worst: the first best and first worst image, when
    their gap exceeds ``margin``; all: every i < j whose gap exceeds ``margin``, the higher score chosen."""
    if selection == "best_worst":
        best, worst = scores.index(max(scores)), scores.index(min(scores))
        return [(best, worst)] if scores[best] - scores[worst] > margin else []
    if selection != "all":
        raise ConfigError(f"unknown selection '{selection}'; choose {' or '.join(SELECTIONS)}")
    return [(i, j) if scores[i] > scores[j] else (j, i)
            for i in range(len(scores)) for j in range(i + 1, len(scores)) if abs(scores[i] - scores[j]) > margin]


def kto_labels(scores: list[float], fraction: float = 0.25, margin: float = 0.0) -> list[tuple[int, int]]:
    """(image index, label) of one group: the top ``fraction`` by score 1, the bottom fraction 0, the middle none.

    n = floor(fraction * k), at least 1 and at most k // 2 per side. Images tied with the n-th best share its label
    (likewise at the bottom); where equal scores straddle both cuts, the cuts move off the tie, so equal scores
    never get opposite labels. A group whose spread is <= ``margin`` gets no labels.
    """
    if len(scores) < 2 or spread(scores) <= margin:
        return []
    n = min(max(int(fraction * len(scores)), 1), len(scores) // 2)
    ordered = sorted(scores, reverse=True)
    high, low = ordered[n - 1], ordered[-n]
    if high == low:  # the tie spans both cuts: label only what lies strictly above / below it
        above, below = [s for s in scores if s > high], [s for s in scores if s < low]
        high = min(above) if above else high  # nothing above: the tied top is the desirable side
        low = max(below) if below else low
    return [(i, 1) if s >= high else (i, 0) for i, s in enumerate(scores) if s >= high or s <= low]


def build_views(groups: list[Group], settings: PairSettings) -> tuple[dict[str, list[dict]], dict]:
    """Every view's entries (file names relative to the output folder) and counts, from the finished groups."""
    views: dict[str, list[dict]] = {view: [] for view in VIEWS}
    flat, skipped_pairs = 0, 0
    for group in groups:
        values, names = group.combined, group.file_names
        pairs = select_pairs(values, settings.selection, settings.margin)
        candidates = 1 if settings.selection == "best_worst" else len(values) * (len(values) - 1) // 2
        skipped_pairs += candidates - len(pairs)
        for chosen, rejected in pairs:
            pair = {"prompt": group.prompt, "chosen_file_name": names[chosen], "rejected_file_name": names[rejected]}
            views["pairs"].append(pair)
            views["scored"].append({**pair, "chosen_score": values[chosen], "rejected_score": values[rejected]})
        if spread(values) <= settings.margin:
            flat += 1
            continue
        views["ranked"].append({"prompt": group.prompt, "file_names": list(names), "scores": list(values)})
        views["kto"] += [{"prompt": group.prompt, "file_name": names[i], "label": label}
                         for i, label in kto_labels(values, settings.kto_fraction, settings.margin)]
    counts = {view: len(entries) for view, entries in views.items()}
    labels = [entry["label"] for entry in views["kto"]]
    stats = {"views": counts, "kto_labels": {"1": labels.count(1), "0": labels.count(0)},
             "flat_groups": flat, "pairs_skipped_for_margin": skipped_pairs}
    return views, stats


def relocated(entry: dict, prefix: str) -> dict:
    """``entry`` with its file names seen from a subfolder (prefix "../")."""
    moved = {key: prefix + value if key in FILE_KEYS else value for key, value in entry.items()}
    if "file_names" in moved:
        moved["file_names"] = [prefix + name for name in moved["file_names"]]
    return moved
