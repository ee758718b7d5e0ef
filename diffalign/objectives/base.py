"""The objective seam: inputs every objective receives, the output it returns, and how it is registered."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from diffalign.config_io import dataclass_from_dict
from diffalign.errors import ConfigError, closest


def local_mean(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.mean()


@dataclass
class ObjectiveInputs:
    """Per-sample denoising errors for a batch of B records with K images each.

    ``policy_err[b, k]`` is mean((pred - target)^2) over (C, H, W) for image k of record b, with the trainable
    model; ``ref_err`` is the same for the reference model (no grad), or None for reference-free objectives.
    For pairs (K = 2), column 0 is the preferred image and column 1 the dispreferred one.
    """

    policy_err: torch.Tensor
    ref_err: torch.Tensor | None = None
    labels: torch.Tensor | None = None  # (B, K), 1 = desirable, 0 = undesirable (KTO)
    scores: torch.Tensor | None = None  # (B, K), reward scores, higher is better (SmPO, RankDPO)
    residuals: torch.Tensor | None = None  # (B, K, C, H, W) policy pred - target, detached (SDPO)
    # Mean over the *global* batch (all processes). The trainer passes accelerate's all-reduce; the default is
    # the local mean, which is the same thing in a single process. Keeps objectives free of accelerate.
    global_mean: Callable[[torch.Tensor], torch.Tensor] = local_mean


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar to backpropagate
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars for logging


@dataclass(frozen=True)
class Objective:
    """A registered objective: its name, its hyperparameter dataclass and the pure loss function."""

    name: str
    params_cls: type
    loss_fn: Callable[[ObjectiveInputs, object], ObjectiveOutput]
    needs_reference: bool = True
    images_per_record: int | None = 2  # None: every image of the record (rankings)
    data_kind: str = "pair"  # pair | scored_pair | labelled | ranked | images: what each record must carry
    needs_residuals: bool = False
    description: str = ""
    source: str = ""  # paper / repository, for the README table
    # Objectives that are a procedure rather than a function of per-sample errors (Self-NPO: teacher sampling,
    # re-noising, a loss in x0 space) supply the whole training step. When set, the trainer calls it instead of
    # ``denoising_errors`` + ``loss_fn``, with keyword arguments family, components, model (the student, possibly
    # DDP-wrapped), reference (the strategy from ``training.reference``: the teacher), latents (B, K, C, h, w),
    # cond, empty_cond (the empty-prompt conditioning, batch of one), generator (CPU, seeded per micro-step),
    # device and params; it returns an ``ObjectiveOutput``.
    custom_step: Callable[..., ObjectiveOutput] | None = None
    # The reference strategy ``objective.reference=auto`` resolves to (None: lora_disabled / frozen_copy by mode).
    default_reference: str | None = None
    # Reference settings an objective takes from its own hyperparameters: params -> ObjectiveConfig overrides,
    # e.g. Self-NPO's teacher decay ``{"ema_decay": params.ema_decay, "ema_update_every": 1}``.
    reference_overrides: Callable[[object], dict] | None = None

    def parse_params(self, raw: dict, prefix: str | None = None) -> object:
        """``raw`` (from YAML or overrides) -> ``params_cls``, with the same typed reading as every config section:
        an unknown key or a wrong type is a ``ConfigError`` naming ``objective.<name>.<key>``."""
        prefix = prefix or f"objective.{self.name}"
        if not dataclasses.fields(self.params_cls) and raw:
            raise ConfigError(f"unknown config key '{prefix}.{next(iter(raw))}'. It takes no hyperparameters.")
        try:
            return dataclass_from_dict(self.params_cls, raw, prefix)
        except ConfigError:
            raise
        except (TypeError, ValueError) as error:  # the params' own range checks (__post_init__)
            raise ConfigError(f"{prefix}: {error}") from error

    def __call__(self, inputs: ObjectiveInputs, params: object) -> ObjectiveOutput:
        return self.loss_fn(inputs, params)


_REGISTRY: dict[str, Objective] = {}


def register_objective(objective: Objective) -> Objective:
    _REGISTRY[objective.name] = objective
    return objective


def get_objective(name: str) -> Objective:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown objective '{name}'.{closest(name, _REGISTRY)} Available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available_objectives() -> list[str]:
    return sorted(_REGISTRY)
