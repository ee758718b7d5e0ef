"""Preference objectives: pure functions of per-sample denoising errors, registered by name in ``OBJECTIVES``.

Adding one is one module with a params dataclass, a loss function and a ``register_objective`` call,
plus an import line here. Shapes and the two kinds of objective: ``diffalign.objectives.base``.
"""

from diffalign.objectives import dpo, kto, mapo, npo, online, rank_dpo, sdpo, self_npo, sft, smpo  # noqa: F401  (registers them)
from diffalign.objectives.base import (
    OBJECTIVES,
    Objective,
    ObjectiveInputError,
    ObjectiveInputs,
    ObjectiveOutput,
    available_objectives,
    get_objective,
    register_objective,
)

__all__ = [
    "OBJECTIVES",
    "Objective",
    "ObjectiveInputError",
    "ObjectiveInputs",
    "ObjectiveOutput",
    "available_objectives",
    "get_objective",
    "register_objective",
]
