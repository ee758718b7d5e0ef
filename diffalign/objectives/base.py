"""The objective seam: what an objective receives, what it returns, and the ``OBJECTIVES`` registry.

Shape conventions (every objective, every training step; B records per process, K images per record):

    latents      (B, K, C, h, w)   the VAE latents of each record's images; for pairs column 0 is the preferred image
    errors       (B, K)            per-sample denoising errors mean((pred - target)^2) over (C, h, w), times the
                                   timestep weight of ``train.timesteps.weighting``
    labels       (B, K)            1 = desirable, 0 = undesirable (data kind ``labelled``)
    scores       (B, K)            reward scores, higher is better (``scored_pair``, ``ranked``)
    residuals    (B, K, C, h, w)   policy pred - target, detached (objectives with ``needs_residuals``)
    loss         ()                the scalar to backpropagate; metrics are detached scalars for logging

An objective is one of two things, named by ``Objective.step``:

- ``"errors"`` (almost all): a pure function ``loss_fn(ObjectiveInputs, params) -> ObjectiveOutput`` of the
  policy's and the reference's per-sample errors; the trainer's default step computes the errors.
- the name of a registered step procedure (``diffalign.training.steps.STEPS``) that supplies the whole training
  step, when the loss is not a function of per-sample errors (``"self_npo"``: teacher sampling, re-noising, a loss
  in x0 space). Such an objective has no ``loss_fn``.

Adding an objective is one module with a params dataclass, a loss function and a ``register_objective`` call,
plus an import line in ``diffalign/objectives/__init__.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from diffalign.config_io import dataclass_from_dict
from diffalign.errors import ConfigError
from diffalign.registry import Registry


class ObjectiveInputError(TypeError, ValueError):
    """An objective (or one of its loss functions) called without an input it needs, or with a wrong one.

    A bug in the caller, not a user error: the trainer supplies what an objective declares (``needs_reference``,
    ``needs_residuals``, ``data_kind``), and hyperparameters are checked when the config is read. Not a ``DiffalignError``, so the CLI shows its traceback; also a
    ``ValueError``, as these checks always raised."""


def check_positive(params: object, *names: str) -> None:
    """A params dataclass's range check (``__post_init__``): each named field is > 0. Raises ``ValueError``,
    which ``Objective.parse_params`` reports as a ``ConfigError`` naming ``objective.<name>``."""
    for name in names:
        if getattr(params, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(params, name)}")


def local_mean(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.mean()


@dataclass
class ObjectiveInputs:
    """Per-sample denoising errors for a batch of B records with K images each (shapes: module docstring).

    ``policy_err[b, k]`` is mean((pred - target)^2) over (C, h, w) for image k of record b, with the trainable
    model; ``ref_err`` is the same for the reference model (no grad), or None for reference-free objectives.
    For pairs (K = 2), column 0 is the preferred image and column 1 the dispreferred one.
    """

    policy_err: torch.Tensor  # (B, K)
    ref_err: torch.Tensor | None = None  # (B, K), no grad
    labels: torch.Tensor | None = None  # (B, K), 1 = desirable, 0 = undesirable (KTO)
    scores: torch.Tensor | None = None  # (B, K), reward scores, higher is better (SmPO, RankDPO)
    residuals: torch.Tensor | None = None  # (B, K, C, h, w) policy pred - target, detached (SDPO)
    # Mean over the *global* batch (all processes). The trainer passes accelerate's all-reduce; the default is
    # the local mean, which is the same thing in a single process. Keeps objectives free of accelerate.
    global_mean: Callable[[torch.Tensor], torch.Tensor] = local_mean


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar to backpropagate
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars for logging


@dataclass(frozen=True)
class Objective:
    """A registered objective: its name, its hyperparameter dataclass and how its loss is computed.

    Args:
        name: ``objective.name``; its hyperparameters live under ``objective.<name>.``.
        params_cls: the hyperparameter dataclass (range checks in ``__post_init__`` raise ``ValueError``,
            which ``parse_params`` reports as a ``ConfigError``).
        loss_fn: ``(ObjectiveInputs, params) -> ObjectiveOutput``; required when ``step == "errors"``, None
            for an objective whose step procedure computes the loss itself.
        step: the training step procedure, by name in ``diffalign.training.steps.STEPS``: ``"errors"``
            (``denoising_errors`` then ``loss_fn``) or one of its own (``"self_npo"``).
        needs_reference: whether a reference model is used (``objective.reference`` cannot be ``none``).
        optional_reference: the reference is used only when asked for (GRPO's KL term): ``auto`` resolves to
            none, and ``lora_disabled`` or ``frozen_copy`` may be set explicitly.
        images_per_record: K; None keeps every image of the record (rankings).
        data_kind: what each record must carry: pair | scored_pair | labelled | ranked | images.
        needs_residuals: the "errors" step also passes the detached residuals (B, K, C, h, w).
        description, source: one line each, for ``diffalign list`` and the README table.
        default_reference: what ``objective.reference=auto`` resolves to (None: lora_disabled / frozen_copy).
        reference_overrides: params -> ObjectiveConfig fields the reference takes from this objective's own
            hyperparameters, e.g. Self-NPO's teacher ``{"ema_decay": params.ema_decay, "ema_update_every": 1}``.
    """

    name: str
    params_cls: type
    loss_fn: Callable[[ObjectiveInputs, object], ObjectiveOutput] | None = None
    step: str = "errors"
    needs_reference: bool = True
    optional_reference: bool = False
    images_per_record: int | None = 2
    data_kind: str = "pair"
    needs_residuals: bool = False
    description: str = ""
    source: str = ""
    default_reference: str | None = None
    reference_overrides: Callable[[object], dict] | None = None

    def __post_init__(self):
        if self.step == "errors" and self.loss_fn is None:
            raise TypeError(f"objective '{self.name}': the 'errors' step needs a loss_fn")

    def parse_params(self, raw: dict, prefix: str | None = None) -> object:
        """``raw`` (from YAML or overrides) -> ``params_cls``, with the same typed reading as every config section:
        an unknown key, a wrong type or a value out of range is a ``ConfigError`` naming ``objective.<name>.<key>``."""
        prefix = prefix or f"objective.{self.name}"
        if not dataclasses.fields(self.params_cls) and raw:
            raise ConfigError(f"unknown config key '{prefix}.{next(iter(raw))}'. It takes no hyperparameters.")
        try:
            return dataclass_from_dict(self.params_cls, raw, prefix)
        except ConfigError:
            raise
        except (TypeError, ValueError) as error:  # the params' own range checks (__post_init__)
            raise ConfigError(f"{prefix}: {error}") from error

    def reference_settings(self, params: object) -> dict:
        """The ObjectiveConfig fields this objective sets for its reference (empty for most)."""
        return self.reference_overrides(params) if self.reference_overrides else {}

    def __call__(self, inputs: ObjectiveInputs, params: object) -> ObjectiveOutput:
        if self.loss_fn is None:
            raise TypeError(f"objective '{self.name}' is a training step procedure ('{self.step}' in "
                            "diffalign.training.steps.STEPS), not a function of per-sample errors")
        return self.loss_fn(inputs, params)


OBJECTIVES: Registry[Objective] = Registry("objective", "objective.name")


def register_objective(objective: Objective) -> Objective:
    """Add ``objective`` to ``OBJECTIVES`` under its name, with its description and source."""
    # Registering a name again replaces it (a notebook cell or a test run twice).
    return OBJECTIVES.register(objective.name, objective, description=objective.description,
                               source=objective.source, replace=True)


def get_objective(name: str) -> Objective:
    """The registered objective. Raises ``ConfigError`` for an unknown name, naming the closest one."""
    return OBJECTIVES.get(name)


def available_objectives() -> list[str]:
    return sorted(OBJECTIVES.names())
