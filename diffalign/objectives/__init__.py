"""Preference objectives: pure functions of per-sample denoising errors, registered by name.

Adding one is one module with a params dataclass, a loss function and a ``register_objective`` call,
plus an import line here.
"""

from diffalign.objectives import dpo, kto, mapo, npo, rank_dpo, sdpo, self_npo, sft, smpo  # noqa: F401  (registers them)
from diffalign.objectives.base import (
    Objective,
    ObjectiveInputs,
    ObjectiveOutput,
    available_objectives,
    get_objective,
    register_objective,
)

__all__ = [
    "Objective",
    "ObjectiveInputs",
    "ObjectiveOutput",
    "available_objectives",
    "get_objective",
    "register_objective",
]
