"""Training state that is never non-finite and never pickled: the guards on the update, checkpoints, retention
and resume (issue 12, faults 1 and 2)."""

import json
import math
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_overrides
from safetensors.torch import load_file, save_file
from test_training import flaky_objective

from diffalign.config import ConfigError, load_config
from diffalign.training.checkpoint import (
    STATE_FILE,
    TrainingStopped,
    list_checkpoints,
    prune_checkpoints,
    resolve_resume,
    rng_state,
    set_rng_state,
)
from diffalign.training.state_io import load_state, save_state
from diffalign.training.trainer import train

# The input: at step 2 the loss is finite but the gradient overflows.
BLOW_UP = {"train.batch_size": 2, "train.max_steps": 10, "train.learning_rate": 1e3, "train.lr_warmup_steps": 0,
           "train.checkpointing_steps": 1, "train.checkpoints_total_limit": 2, "log.validation_every_n_steps": 0}


def cfg_for(tmp_path, name="run", config="tiny_dpo.yaml", **extra):
    return load_config(ROOT / "configs" / config, tiny_overrides(tmp_path / name, **extra))


def all_finite(tensors: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def checkpoint_tensors(path: Path) -> dict:
    """Every floating tensor a checkpoint holds, keyed by file and name."""
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update({f"{file.name}:{key}": value for key, value in load_file(str(file)).items()})
    return tensors


def assert_only_safetensors_and_json(path: Path) -> None:
    suffixes = {file.suffix for file in path.rglob("*") if file.is_file()}
    assert suffixes <= {".safetensors", ".json"}, suffixes


# ---------------------------------------------------------------------------------------------- non-finite
def test_gradient_overflow_never_reaches_weights_checkpoints_or_resume(tmp_path, capsys):
    from diffalign.cli import main

    run = tmp_path / "run"
    overrides = [f"{k}={v}" for k, v in {**dict(o.split("=", 1) for o in tiny_overrides(run)), **BLOW_UP}.items()]
    assert main(["train", str(ROOT / "configs/tiny_dpo.yaml"), *overrides]) == 3
    captured = capsys.readouterr()
    assert "non-finite gradient norm, step skipped" in captured.out
    stopped = captured.err.strip().splitlines()[-1]
    checkpoints = list_checkpoints(run)
    assert checkpoints, "the good step before the overflow was checkpointed"
    assert f"The newest finite checkpoint, {checkpoints[-1][1]}, is kept" in stopped
    for _, path in checkpoints:  # every kept checkpoint is finite, weights, optimizer moments and all
        assert all_finite(checkpoint_tensors(path)), path
        assert json.loads((path / STATE_FILE).read_text())["finite"] is True
        assert_only_safetensors_and_json(path)
    assert not (run / "pytorch_lora_weights.safetensors").exists()  # no final output from a stopped run
    # checkpoints follow applied updates only: none was written for the skipped steps after the last good one
    state = json.loads((checkpoints[-1][1] / STATE_FILE).read_text())
    assert checkpoints[-1][0] == state["global_step"] and state["skipped_steps"] == 0
    # resume=latest picks a finite checkpoint and continues from it (and stops again the same way)
    resumed = cfg_for(tmp_path, **{**BLOW_UP, "train.resume": "latest"})
    assert resolve_resume(run, "latest") == checkpoints[-1][1]
    with pytest.raises(TrainingStopped, match="non-finite"):
        train(resumed)
    assert "resumed from" in capsys.readouterr().out


def test_short_blow_up_run_never_exits_0_with_nonfinite_weights(tmp_path, capsys):
    from diffalign.cli import main

    run = tmp_path / "run"
    values = {**dict(o.split("=", 1) for o in tiny_overrides(run)), **BLOW_UP, "train.max_steps": "6"}
    code = main(["train", str(ROOT / "configs/tiny_dpo.yaml"), *[f"{k}={v}" for k, v in values.items()]])
    final = run / "pytorch_lora_weights.safetensors"
    if code == 0:
        assert all_finite(load_file(str(final)))
    else:
        assert code == 3 and not final.exists()


def infinite_gradient(loss, inputs):
    """The loss unchanged, plus sqrt(x - x) at x = the summed errors: value 0, gradient 1 / (2 sqrt(0)) = inf."""
    total = inputs.policy_err.sum()
    poisoned = loss + torch.sqrt(total - total.detach())
    assert torch.isfinite(poisoned)
    return poisoned


def test_nonfinite_gradient_with_finite_loss_skips_the_step(tmp_path):
    flaky_objective({2}, name="grad_poisoned_dpo", corrupt=infinite_gradient)
    result = train(cfg_for(tmp_path, **{"objective.name": "grad_poisoned_dpo", "train.max_steps": 4,
                                        "objective.reference": "ema", "objective.ema_update_every": 1}))
    assert result.global_step == 4 and result.skipped_steps == 1
    assert all_finite(load_file(str(result.output_dir / "pytorch_lora_weights.safetensors")))
    assert all_finite(checkpoint_tensors(result.output_dir / "checkpoint-3"))  # EMA and optimizer state included


def test_checkpoint_due_on_a_skipped_step_waits_for_the_next_good_one(tmp_path):
    flaky_objective(nan_calls={3})
    result = train(cfg_for(tmp_path, **{"objective.name": "flaky_dpo", "train.checkpointing_steps": 3}))
    assert result.skipped_steps == 1
    assert [step for step, _ in list_checkpoints(result.output_dir)] == [4]


def fake_checkpoint(run: Path, step: int, finite: bool) -> Path:
    path = run / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / STATE_FILE).write_text(json.dumps({"global_step": step, "skipped_steps": 0, "finite": finite}))
    return path


def test_retention_and_latest_never_lose_the_newest_finite_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 1, True)
    fake_checkpoint(tmp_path, 2, False)  # e.g. copied in from elsewhere, or written by an older version
    fake_checkpoint(tmp_path, 3, False)
    prune_checkpoints(tmp_path, total_limit=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1, 2, 3]  # 1 is the newest finite: kept
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-1"
    fake_checkpoint(tmp_path, 4, True)
    prune_checkpoints(tmp_path, total_limit=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-4"


def test_resume_passes_over_or_refuses_a_checkpoint_whose_tensors_are_nonfinite(tmp_path, capsys):
    """A checkpoint saved finite whose file was damaged afterwards: latest passes over it to the one before, an
    explicit path is refused in one line."""
    first = train(cfg_for(tmp_path, "first", **{"train.max_steps": 5, "train.checkpointing_steps": 2}))
    copy = tmp_path / "copy"
    for step in (2, 4):
        shutil.copytree(first.output_dir / f"checkpoint-{step}", copy / f"checkpoint-{step}")
    damaged = copy / "checkpoint-4" / "lora_state.safetensors"
    save_file({k: v * float("nan") for k, v in load_file(str(damaged)).items()}, str(damaged))
    with pytest.raises(ConfigError, match=r"checkpoint-4 holds non-finite values \(weights\..*resume from an earlier"):
        train(cfg_for(tmp_path, "copy", **{"train.max_steps": 5, "train.resume": str(copy / "checkpoint-4")}))
    resumed = train(cfg_for(tmp_path, "copy", **{"train.max_steps": 5, "train.checkpointing_steps": 2,
                                                  "train.resume": "latest"}))
    out = capsys.readouterr().out
    assert "checkpoint-4 holds non-finite or unreadable tensors (lora_state.safetensors:" in out
    assert "resumed from" in out and "checkpoint-2 at step 2" in out and resumed.global_step == 5


@pytest.mark.parametrize("change, message", [
    ({"lora.rank": 4}, "was trained with lora.rank=8, this config has lora.rank=4"),
    ({"lora.alpha": 16}, "was trained with lora.alpha=8.0, this config has lora.alpha=16.0"),
    ({"model.pretrained": "tiny:sdxl"}, "was trained with model.pretrained='tiny:sd15'"),
    ({"objective.reference": "ema"}, "was trained with objective.reference='lora_disabled'"),
    ({"lora.enabled": False}, "was trained with lora.enabled=True"),
])
def test_resume_with_settings_the_state_depends_on_changed_is_one_line(tmp_path, capsys, change, message):
    from diffalign.cli import main

    first = train(cfg_for(tmp_path, "first", **{"train.max_steps": 4}))
    values = {**dict(o.split("=", 1) for o in tiny_overrides(first.output_dir)), "train.max_steps": 6,
              "train.resume": "latest", **change}
    assert main(["train", str(ROOT / "configs/tiny_dpo.yaml"), *[f"{k}={v}" for k, v in values.items()]]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars: the one error line
    assert last.startswith("diffalign train: error: ") and message in last and "start afresh" in last


@pytest.mark.parametrize("damage", ["optimizer.safetensors", "rng_state_0.json", "lora_state.safetensors",
                                    "lr_scheduler.json", "pickle_as_safetensors"])
def test_a_damaged_checkpoint_is_one_line(tmp_path, capsys, damage):
    from diffalign.cli import main

    first = train(cfg_for(tmp_path, "first", **{"train.max_steps": 4}))
    checkpoint = first.output_dir / "checkpoint-3"
    if damage == "pickle_as_safetensors":  # a pickle under a safetensors name is never unpickled either
        (checkpoint / "optimizer.safetensors").write_bytes(pickle.dumps(Payload(tmp_path / "pwned")))
    else:
        (checkpoint / damage).unlink()
    values = {**dict(o.split("=", 1) for o in tiny_overrides(first.output_dir)), "train.max_steps": 6,
              "train.resume": str(checkpoint)}
    assert main(["train", str(ROOT / "configs/tiny_dpo.yaml"), *[f"{k}={v}" for k, v in values.items()]]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars: the one error line
    assert last.startswith("diffalign train: error: ") and "is damaged or incomplete" in last
    assert "resume from an earlier checkpoint" in last
    assert not (tmp_path / "pwned").exists()


def test_resume_paths_and_a_new_learning_rate(tmp_path, capsys):
    train(cfg_for(tmp_path, "first", **{"train.max_steps": 4}))
    with pytest.raises(ConfigError, match="train.resume=checkpoint-9 does not exist"):
        train(cfg_for(tmp_path, "first", **{"train.max_steps": 6, "train.resume": "checkpoint-9"}))
    # a relative path names a checkpoint of the run folder; a new train.learning_rate applies from there on
    resumed = train(cfg_for(tmp_path, "first", **{"train.max_steps": 6, "train.resume": "checkpoint-3",
                                                   "train.learning_rate": 2e-3}))
    out = capsys.readouterr().out
    assert "learning rate changed on resume: base 0.001 -> 0.002" in out
    assert resumed.metrics["lr"] == pytest.approx(2e-3)
    train(cfg_for(tmp_path, "fresh", **{"train.max_steps": 1, "train.resume": "latest"}))
    assert "train.resume=latest: no usable checkpoint in" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- no pickles
class Payload:
    """Unpickling this writes a marker file: proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


@pytest.mark.parametrize("reference, lora", [("ema", True), ("ema", False)])
def test_checkpoints_hold_no_pickles_and_resume_refuses_one(tmp_path, reference, lora):
    extra = {"objective.reference": reference, "lora.enabled": lora, "train.max_steps": 4,
             "objective.ema_update_every": 1, "train.learning_rate": 1e-4 if not lora else 1e-3}
    first = train(cfg_for(tmp_path, "first", **extra))
    checkpoint = first.output_dir / "checkpoint-3"
    assert_only_safetensors_and_json(checkpoint)
    assert (checkpoint / "ema_reference.safetensors").is_file()
    marker = tmp_path / "pwned"
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin"):
        crafted = tmp_path / name.replace(".", "-")
        shutil.copytree(checkpoint, crafted / "checkpoint-3")
        (crafted / "checkpoint-3" / name).write_bytes(pickle.dumps(Payload(marker)))
        for resume in ("latest", str(crafted / "checkpoint-3")):
            with pytest.raises(ConfigError, match=f"holds pickled files \\({name}\\).*never unpickles"):
                train(cfg_for(tmp_path, name.replace(".", "-"), **{**extra, "train.resume": resume}))
    assert not marker.exists()


def test_ema_lora_resume_matches_the_uninterrupted_run(tmp_path):
    """The EMA reference is training state: resumed from safetensors, the run ends where an uninterrupted one
    does (the reference errors, and so the DPO gradients, depend on it)."""
    extra = {"objective.reference": "ema", "objective.ema_update_every": 1, "objective.ema_decay": 0.5,
             "train.lr_scheduler": "cosine", "train.lr_warmup_steps": 2}
    full = train(cfg_for(tmp_path, "full", **extra))
    shutil.copytree(full.output_dir / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = train(cfg_for(tmp_path, "resumed", **{**extra, "train.resume": "latest"}))
    a = load_file(str(full.output_dir / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed.output_dir / "pytorch_lora_weights.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-7, rtol=0)


def test_state_round_trips_through_safetensors_and_json(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "inf": math.inf, "tuple": (1, "a", None), 3: [torch.ones(2)]}
    save_state(state, tmp_path, "state")
    loaded = load_state(tmp_path, "state")
    assert loaded["inf"] == math.inf and loaded["tuple"] == (1, "a", None) and torch.equal(loaded[3][0], torch.ones(2))
    restored = torch.optim.AdamW(model.parameters(), lr=1e-3)
    restored.load_state_dict(loaded["optimizer"])
    for group_a, group_b in zip(optimizer.param_groups, restored.param_groups):
        assert {k: v for k, v in group_a.items() if k != "params"} == {k: v for k, v in group_b.items() if k != "params"}
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(value, restored.state_dict()["state"][0][key])
    with pytest.raises(TypeError, match="cannot store function at 'bad.fn' without pickle"):
        save_state({"fn": lambda: None}, tmp_path, "bad")


def test_rng_states_round_trip(tmp_path):
    save_state(rng_state(), tmp_path, "rng")
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)  # move every generator on
    set_rng_state(load_state(tmp_path, "rng"))
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_readme_promises_match_behaviour():
    readme = (ROOT / "README.md").read_text()
    assert "nothing pickled is executed" in readme
    assert "the newest finite checkpoint" in readme.lower()


def test_package_never_pickles_training_state():
    """accelerate's save_state / load_state / register_for_checkpointing pickle; nothing in diffalign calls them,
    torch.save only writes the published .pt reward formats for the tiny rewards (read back weights_only=True)."""
    for path in (ROOT / "diffalign").rglob("*.py"):
        text = path.read_text()
        assert "weights_only=False" not in text, path
        for call in ("accelerator.save_state(", "accelerator.load_state(", "register_for_checkpointing(", "torch.save("):
            if call == "torch.save(" and path.relative_to(ROOT).as_posix() == "diffalign/rewards/tiny.py":
                continue
            assert call not in text, (path, call)
