"""Charts for reports: a win-rate bar chart (matplotlib, no GUI backend). Image grids: ``diffalign.images``."""

from __future__ import annotations

from pathlib import Path


def winrate_chart(table: dict[str, dict[str, dict]], path: str | Path, confidence: float = 0.95,
                  title: str = "win rate vs base") -> Path:
    """Horizontal bars: one row per compared setup (named on the axis, so a dozen setups stay readable), one bar
    per reward within it (coloured, with a legend when there are several), error bars = the interval, the rate
    printed at each bar, and a dashed line at 0.5.

    ``table[reward][setup]`` is a ``WinRate.as_dict()`` (rate, low, high, ...). Saved as a 700 px wide PNG.
    """
    # matplotlib is heavy: imported only when a chart is drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rewards = list(table)
    setups = list(dict.fromkeys(setup for reward in rewards for setup in table[reward]))
    figure = Figure(figsize=(7, 1.5 + 0.45 * max(len(setups), 1) * max(len(rewards), 1) ** 0.5), dpi=100)
    FigureCanvasAgg(figure)  # draw off-screen, whatever backend pyplot uses elsewhere
    axes = figure.add_subplot()
    height = 0.8 / max(len(rewards), 1)
    for index, reward in enumerate(rewards):
        ys, rates, below, above = [], [], [], []
        for position, setup in enumerate(setups):
            if setup in table[reward]:
                result = table[reward][setup]
                ys.append(position - 0.4 + height * (index + 0.5))
                rates.append(result["rate"])
                below.append(max(result["rate"] - result["low"], 0.0))
                above.append(max(result["high"] - result["rate"], 0.0))
        axes.barh(ys, rates, height=height, xerr=[below, above], capsize=3, label=reward)
        for y, rate, extra in zip(ys, rates, above):
            axes.text(min(rate + extra + 0.01, 0.9), y, f"{rate:.2f}", va="center", fontsize="small")
    axes.axvline(0.5, linestyle="--", color="grey", linewidth=1)
    axes.set_xlim(0.0, 1.0)
    axes.set_yticks(range(len(setups)), setups)
    axes.invert_yaxis()  # first setup on top, as in the report table
    axes.set_xlabel(f"win rate vs base ({confidence:.0%} interval)")
    axes.set_title(title if len(rewards) > 1 else f"{title}: {rewards[0]}" if rewards else title)
    if len(rewards) > 1:
        axes.legend(fontsize="small")
    if not setups:
        axes.text(0.5, 0.5, "no setups to compare with base", ha="center", transform=axes.transAxes)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path
