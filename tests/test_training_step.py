"""The training step seam (``training.steps``), the objective registry, and the loop's guards on their own."""

import math
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT, tiny_overrides

from diffalign.config import load_config
from diffalign.errors import TrainingStopped
from diffalign.objectives import (
    OBJECTIVES,
    Objective,
    available_objectives,
    get_objective,
    register_objective,
)
from diffalign.objectives.dpo import DPOParams, dpo_objective
from diffalign.objectives.sft import SFTParams
from diffalign.training.metrics import MetricWindow
from diffalign.training.nonfinite import NonFiniteGuard
from diffalign.training.steps import STEPS, StepContext, StepProcedure, errors_step
from diffalign.training.trainer import train


def test_every_objective_names_a_registered_step_and_errors_steps_have_a_loss():
    for name in available_objectives():
        objective = get_objective(name)
        assert objective.step in STEPS, name
        assert (objective.loss_fn is not None) == (objective.step == "errors"), name
        assert OBJECTIVES.entry(name).description == objective.description
    assert get_objective("self_npo").step == "self_npo" and STEPS.get("self_npo").needs_empty_cond
    assert not STEPS.get("errors").needs_empty_cond
    with pytest.raises(TypeError, match="needs a loss_fn"):
        Objective(name="broken", params_cls=SFTParams)


def test_register_objective_again_replaces_the_entry():
    first = register_objective(Objective(name="twice", params_cls=DPOParams, loss_fn=dpo_objective,
                                         description="first"))
    second = register_objective(Objective(name="twice", params_cls=DPOParams, loss_fn=dpo_objective,
                                          description="second"))
    assert get_objective("twice") is second is not first
    assert OBJECTIVES.entry("twice").description == "second" and OBJECTIVES.names().count("twice") == 1


def test_objectives_import_nothing_from_training():
    code = ("import sys, diffalign.objectives; "
            "print(sorted(m for m in sys.modules if m.startswith(('diffalign.training', 'diffalign.families'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


SEEN: list[dict] = []


def recording_step(context: StepContext):
    """The default step, recording what the loop handed over."""
    SEEN.append({"latents": tuple(context.latents.shape), "empty": context.empty_cond is not None,
                 "wrapped_model": context.model is not None, "reference": context.reference is not None})
    return errors_step(context)


if "recording" not in STEPS:
    STEPS.register("recording", StepProcedure(recording_step, needs_empty_cond=True),
                   description="the errors step, recording its context (tests)")


def test_a_registered_step_procedure_drives_training_through_the_one_interface(tmp_path):
    register_objective(Objective(name="recorded_dpo", params_cls=DPOParams, loss_fn=dpo_objective, step="recording"))
    SEEN.clear()
    cfg = load_config(ROOT / "configs/tiny_dpo.yaml", tiny_overrides(
        tmp_path / "run", **{"objective.name": "recorded_dpo", "train.max_steps": 2, "train.batch_size": 2}))
    result = train(cfg)
    assert result.global_step == 2 and math.isfinite(result.metrics["loss"])
    assert len(SEEN) == 2
    assert all(seen["latents"][:2] == (2, 2) and len(seen["latents"]) == 5 for seen in SEEN)  # (B, K, C, h, w)
    assert all(seen["empty"] and seen["reference"] for seen in SEEN)  # needs_empty_cond: encoded without dropout


def test_metric_window_means_over_the_window_and_starts_afresh():
    window = MetricWindow(Accelerator())
    window.add({"loss": torch.tensor(1.0), "acc": torch.tensor(0.5)})
    window.add({"loss": torch.tensor(3.0), "acc": torch.tensor(1.0)})
    assert window.reduce() == {"acc": 0.75, "loss": 2.0}
    assert window.reduce() == {}


def test_nonfinite_guard_skips_counts_and_stops(tmp_path):
    accelerator = Accelerator()
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train_cfg = load_config(None).train
    train_cfg.max_consecutive_nonfinite = 2
    guard = NonFiniteGuard(accelerator, list(layer.parameters()), train_cfg, tmp_path)
    before = layer.weight.detach().clone()

    assert not guard.backward(layer(torch.ones(1, 2)).sum() * float("nan"))
    assert not guard.apply_update(optimizer, scheduler, step=1)
    guard.end_step(1)
    assert (guard.skipped_steps, guard.consecutive_bad, guard.skip_reason) == (1, 1, "loss")
    torch.testing.assert_close(layer.weight, before)  # the skipped step left the weights alone

    optimizer.zero_grad()
    assert guard.backward(layer(torch.ones(1, 2)).sum())
    assert guard.apply_update(optimizer, scheduler, step=2)
    guard.end_step(2)
    assert guard.consecutive_bad == 0 and not torch.equal(layer.weight, before)

    for step in (3, 4):
        optimizer.zero_grad()
        guard.backward(torch.tensor(float("inf"), requires_grad=True))
        guard.apply_update(optimizer, scheduler, step)
        if step == 4:
            with pytest.raises(TrainingStopped, match="stopped at step 4: 2 steps in a row skipped"):
                guard.end_step(step)
        else:
            guard.end_step(step)
    assert guard.skipped_steps == 3
