"""``reward_curve.png``: what an online run did, from ``online_rounds.jsonl`` alone.

Top panel: every reward's round mean against the optimizer step, the trained ones solid and the monitors
(``online.monitor_rewards``, never trained on) dashed, each as its change since the first round, so rewards on
different scales share one axis. Reward hacking reads as a trained reward that keeps rising while the monitors
fall or stay flat. Bottom panel: the spread of the trained reward (std over the round) and the share of groups
with no spread at all, and the mean |advantage| (NFT: the std of its optimality r). When every group's images
score alike, the advantages vanish and learning stops; a spread collapsing while the reward still rises is the
other face of reward hacking (every image driven to the same reward-maximising picture).
"""

from __future__ import annotations

import json
from pathlib import Path


def reward_curve(rounds_file: str | Path, path: str | Path) -> Path:
    """Draw the chart for the rounds in ``rounds_file`` (one JSON object per line) into ``path`` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rounds = [json.loads(line) for line in Path(rounds_file).read_text().splitlines() if line.strip()]
    figure = Figure(figsize=(7, 5.5), dpi=100)
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    steps = [r["step"] for r in rounds]
    names = [k for k in (rounds[0] if rounds else {}) if k.startswith("reward_") and k != "reward_std"]
    monitors = set(rounds[0].get("monitors", [])) if rounds else set()
    if len([n for n in names if n.removeprefix("reward_") not in monitors]) > 1 and "reward" in rounds[0]:
        names.insert(0, "reward")  # several trained rewards: their weighted sum too
    for name in names:
        values = [r.get(name, float("nan")) for r in rounds]
        label = name.removeprefix("reward_") if name != "reward" else "weighted sum"
        top.plot(steps, [v - values[0] for v in values], marker="o", markersize=3,
                 linestyle="--" if label in monitors else "-", label=f"{label}{' (monitor)' if label in monitors else ''}")
    top.axhline(0.0, color="grey", linewidth=0.8)
    top.set_ylabel("change since round 0")
    top.set_title("rewards per round (mean over the round's images)")
    if names:
        top.legend(fontsize="small")
    if rounds and "reward_std" in rounds[0]:
        bottom.plot(steps, [r["reward_std"] for r in rounds], label="reward std (round)")
        bottom.plot(steps, [r["zero_std_groups"] for r in rounds], label="groups with no spread (share)")
    if rounds and "optimality_std" in rounds[0]:  # NFT: the spread of the optimality probabilities r
        bottom.plot(steps, [r["optimality_std"] for r in rounds], label="std of NFT's r")
    else:
        bottom.plot(steps, [r.get("advantage_abs_mean", float("nan")) for r in rounds], label="mean |advantage|")
    bottom.set_xlabel("optimizer step")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole, even over a few rounds
    for axes in (top, bottom):
        axes.ticklabel_format(axis="y", useOffset=False)
    bottom.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)
