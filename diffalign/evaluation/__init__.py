"""Evaluation: synthetic preference pairs from rewards, prompt sets, win rates against a base with bootstrap
intervals, and reports (tables, grids, plots).

    from diffalign.evaluation import PairSettings, generate_pairs, load_prompts, run_eval
"""

from diffalign.evaluation.pair_selection import PairSettings, kto_labels, select_pairs
from diffalign.evaluation.pairs import PairsResult, generate_pairs
from diffalign.evaluation.prompts import PROMPT_SETS, PromptSetUnavailable, load_prompts, read_prompts
from diffalign.evaluation.report import EvalReport, parse_setup, parse_setups, run_eval
from diffalign.evaluation.winrate import WinRate, bootstrap_interval, compare

__all__ = ["PROMPT_SETS", "EvalReport", "PairSettings", "PairsResult", "PromptSetUnavailable", "WinRate",
           "bootstrap_interval", "compare", "generate_pairs", "kto_labels", "load_prompts", "parse_setup",
           "parse_setups", "read_prompts", "run_eval", "select_pairs"]
