"""Evaluation: win rates against a base with bootstrap intervals (pair generation and reports come next)."""

from diffalign.evaluation.winrate import WinRate, bootstrap_interval, compare

__all__ = ["WinRate", "bootstrap_interval", "compare"]
