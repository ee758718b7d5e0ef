"""Online RL end to end on tiny models: every family, the ratio check, group statistics over 2 processes, exact
resume after kill -9, the run folder (rounds, reward curve, run_info), and the refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, kill_and_resume, tiny_overrides
from safetensors.torch import load_file

from diffalign.config import load_config
from diffalign.errors import ConfigError, DiffalignError
from diffalign.online.settings import check_online, check_round_layout
from diffalign.training.trainer import train

ONLINE = {"online.rewards": "{toy_redness: 1.0}", "online.prompts": "shapes", "online.prompts_per_round": 2,
          "online.group_size": 4, "online.sample_steps": 4, "train.batch_size": 4,
          "train.gradient_accumulation_steps": 2, "train.checkpointing_steps": 2}


def online_overrides(run: Path, objective: str, **extra) -> list[str]:
    values = {"objective.name": objective, "model.pretrained": "tiny:sd15", "train.max_steps": 2, **ONLINE,
              **({"online.guidance_scale": 1.0} if objective == "nft" else {}), **extra}
    return tiny_overrides(run, **values)


CONFIG = ROOT / "configs" / "tiny_grpo.yaml"


def online_cfg(tmp_path, objective="grpo", name="run", **extra):
    return load_config(CONFIG, online_overrides(tmp_path / name, objective, **extra))


def rounds(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "online_rounds.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["grpo", "pref_grpo", "nft"])
@pytest.mark.parametrize("model", ["tiny:sd15", "tiny:sd2v", "tiny:sdxl", "tiny:sd3", "tiny:sd35", "tiny:flux",
                                   "tiny:flux-schnell"])
def test_every_online_objective_trains_on_every_family(tmp_path, objective, model):
    extra = {"objective.grpo.kl_coef": 0.01} if objective == "grpo" else {}
    if model == "tiny:flux-schnell":  # sampled without guidance, as FluxPipeline samples it
        extra["online.guidance_scale"] = 1.0
    result = train(online_cfg(tmp_path, objective, **{"model.pretrained": model, **extra}))
    assert result.global_step == 2 and result.skipped_steps == 0
    lora = load_file(str(result.output_dir / "pytorch_lora_weights.safetensors"))
    assert any(value.abs().sum() > 0 for key, value in lora.items() if "lora_B" in key or "lora.up" in key)
    assert [r["round"] for r in rounds(result.output_dir)] == [0, 1]
    info = json.loads((result.output_dir / "run_info.json").read_text())
    assert info["online"]["rounds"] == 2 and info["online"]["images_per_round"] == 8
    if objective == "grpo":
        assert result.metrics["kl"] >= 0 and "ratio_max" in result.metrics
    if objective == "nft":
        assert "old_deviation" in result.metrics


def test_full_fine_tuning_saves_the_denoiser_and_takes_its_kl_base_from_a_frozen_copy(tmp_path):
    result = train(online_cfg(tmp_path, "grpo", **{"lora.enabled": "false", "train.max_steps": 1}))
    assert (result.output_dir / "unet" / "config.json").is_file()
    with pytest.raises(ConfigError, match="kl_coef=0.01 compares the policy with the base.*frozen_copy"):
        train(online_cfg(tmp_path, "grpo", "kl", **{"lora.enabled": "false", "objective.grpo.kl_coef": 0.01}))
    kl = train(online_cfg(tmp_path, "grpo", "copy", **{"lora.enabled": "false", "objective.grpo.kl_coef": 0.01,
                                                       "objective.reference": "frozen_copy", "train.max_steps": 2}))
    assert kl.metrics["kl"] > 0  # step 2 samples with updated weights: the policy has left the copy
    with pytest.raises(ConfigError, match="takes objective.reference=lora_disabled or frozen_copy"):
        online_cfg(tmp_path, "grpo", **{"objective.reference": "ema"})


def test_ratio_is_exactly_one_at_the_first_inner_epoch_and_moves_after_an_update(tmp_path):
    # one round, 2 inner epochs, one update each: step 1 is the first epoch (ratio 1), step 2 the second
    extra = {"online.inner_epochs": 2, "train.learning_rate": 1e-2, "online.guidance_scale": 3.0}
    first = train(online_cfg(tmp_path, "grpo", "first", **{**extra, "train.max_steps": 1}))
    assert abs(first.metrics["ratio_mean"] - 1) < 1e-6 and abs(first.metrics["ratio_max"] - 1) < 1e-6
    assert first.metrics["clip_fraction"] == 0 and first.metrics["approx_kl"] < 1e-12
    second = train(online_cfg(tmp_path, "grpo", "second", **{**extra, "train.max_steps": 2}))
    assert second.metrics["ratio_max"] - 1 > 1e-6 or second.metrics["clip_fraction"] > 0


def test_run_folder_shows_rewards_per_round_and_the_reward_curve(tmp_path):
    extra = {"online.monitor_rewards": "[toy_redness]", "log.report_to": "tensorboard", "train.max_steps": 3}
    result = train(online_cfg(tmp_path, "grpo", **extra))
    logged = rounds(result.output_dir)
    assert [r["step"] for r in logged] == [0, 1, 2]
    for record in logged:
        assert {"reward", "reward_toy_redness", "reward_std", "zero_std_groups", "advantage_std",
                "seconds_sampling", "seconds_scoring"} <= set(record)
    assert "seconds_training" in logged[1]  # the time spent training round 0, logged with round 1
    curve = result.output_dir / "reward_curve.png"
    assert curve.is_file() and curve.stat().st_size > 5000
    info = json.loads((result.output_dir / "run_info.json").read_text())
    assert info["online"]["first_round"]["reward"] == pytest.approx(logged[0]["reward"])
    assert set(info["online"]["seconds"]) == {"sampling", "scoring", "training"}
    events = list((result.output_dir / "logs").rglob("events.out.tfevents*"))
    assert events and b"reward_toy_redness" in events[0].read_bytes() and b"clip_fraction" in events[0].read_bytes()


def test_layouts_that_do_not_divide_over_processes_are_refused():
    cfg = load_config(CONFIG, online_overrides(Path("unused"), "grpo", **{
        "online.prompts_per_round": 3, "online.group_size": 2, "train.batch_size": 2,
        "train.gradient_accumulation_steps": 1, "train.checkpointing_steps": 1}))
    with pytest.raises(ConfigError, match="6 images per round do not split over 4 processes"):
        check_round_layout(cfg, 4)
    assert check_round_layout(cfg, 3) == (2, 1, 1)  # 2 images per process: one micro-batch, one update


def test_refusals_say_what_to_change(tmp_path):
    with pytest.raises(ConfigError, match="train.checkpointing_steps=3 must be a multiple of the 2 optimizer steps"):
        train(online_cfg(tmp_path, "grpo", **{"online.inner_epochs": 2, "train.checkpointing_steps": 3}))
    with pytest.raises(ConfigError, match="do not split into micro-batches of train.batch_size=3"):
        train(online_cfg(tmp_path, "grpo", **{"train.batch_size": 3}))
    with pytest.raises(ConfigError, match="is pairwise .* use it with objective.name=pref_grpo"):
        train(online_cfg(tmp_path, "grpo", **{"online.rewards": "{toy_redness_judge: 1.0}"}))
    with pytest.raises(ConfigError, match="online.group_size must be at least 2"):
        online_cfg(tmp_path, "grpo", **{"online.group_size": 1})
    with pytest.raises(ConfigError, match="online.sde_window must be"):
        online_cfg(tmp_path, "grpo", **{"online.sde_window": "[2, 9]"})


def test_pref_grpo_with_a_pairwise_judge_scores_win_rates(tmp_path):
    result = train(online_cfg(tmp_path, "pref_grpo", **{"online.rewards": "{toy_redness_judge: 1.0}",
                                                         "online.monitor_rewards": "[toy_redness]"}))
    logged = rounds(result.output_dir)
    assert all(r["advantage_abs_mean"] > 0 for r in logged) and "reward_toy_redness" in logged[0]


def test_two_processes_gather_the_same_group_statistics_as_one(tmp_path):
    """Round 0 of 3 groups of 4 images sampled by 2 processes (6 images each: the middle group spans both) gives the
    same gathered rewards and advantage spread as 1 process: image k's chain depends on its seed only."""
    layout = {"train.max_steps": 1, "online.prompts_per_round": 3, "online.group_size": 4, "train.batch_size": 2,
              "train.checkpointing_steps": 1}
    single = train(online_cfg(tmp_path, "grpo", "one", **layout, **{"train.gradient_accumulation_steps": 6}))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    two = tmp_path / "two"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "scripts" / "train.py"), "--config", str(CONFIG),
               *online_overrides(two, "grpo", **layout, **{"train.gradient_accumulation_steps": 3})]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    one_round, two_round = rounds(single.output_dir)[0], rounds(two)[0]
    for key in ("reward", "reward_std", "advantage_std", "advantage_abs_mean"):
        assert two_round[key] == pytest.approx(one_round[key], rel=1e-5, abs=1e-7), key
    # one update over the same 12 images (1 process x 6 micro-batches, or 2 x 3 averaged by DDP): the same LoRA, up
    # to rounding: Adam's first step is lr * g / (|g| + eps), which turns the summation order of a near-zero
    # gradient element into up to ~1% of lr (1e-3); a different update would move elements by ~lr
    a = load_file(str(single.output_dir / "pytorch_lora_weights.safetensors"))
    b = load_file(str(two / "pytorch_lora_weights.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=0)


@pytest.mark.parametrize("objective, extra", [
    ("grpo", {"objective.grpo.stat_buffer": 8, "objective.grpo.stat_min_count": 6}),  # running statistics
    ("nft", {}),  # the EMA old policy
])
def test_kill_9_and_resume_give_the_uninterrupted_lora(tmp_path, objective, extra):
    overrides = {"train.max_steps": 12, "train.checkpointing_steps": 2, **extra}

    def command(run: Path, **more) -> list[str]:
        return [sys.executable, "-m", "diffalign", "train", str(CONFIG), *online_overrides(run, objective, **overrides, **more)]

    killed = tmp_path / "killed"
    kill_and_resume(command, tmp_path / "full", killed, "checkpoint-6")
    a = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(killed / "pytorch_lora_weights.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-7, rtol=0)
    assert [r["round"] for r in rounds(killed)] == list(range(12))  # rounds after the checkpoint logged once
    for full_round, resumed_round in zip(rounds(tmp_path / "full"), rounds(killed)):
        assert full_round["reward"] == resumed_round["reward"]


def test_a_nonfinite_reward_counts_as_its_groups_mean_and_is_reported():
    from diffalign.online.rounds import neutralise_nonfinite

    metrics = {}
    total = torch.tensor([1.0, float("nan"), 3.0, 5.0, float("inf"), float("nan")], dtype=torch.float64)
    fixed = neutralise_nonfinite(total, 3, metrics)
    assert fixed.tolist() == [1.0, 2.0, 3.0, 5.0, 5.0, 5.0] and metrics["nonfinite_rewards"] == 3
    clean = {}
    assert neutralise_nonfinite(torch.tensor([1.0, 2.0], dtype=torch.float64), 2, clean).tolist() == [1.0, 2.0]
    assert clean["nonfinite_rewards"] == 0


def test_config_mistakes_a_user_makes_are_refused_or_understood(tmp_path):
    assert online_cfg(tmp_path, "grpo", **{"online.rewards": "toy_redness"}).online.rewards == {"toy_redness": 1.0}
    listed = online_cfg(tmp_path, "grpo", **{"online.rewards": "[toy_redness, clip]"}).online.rewards
    assert listed == {"toy_redness": 1.0, "clip": 1.0}
    with pytest.raises(ConfigError, match="must be a finite number"):
        online_cfg(tmp_path, "grpo", **{"online.rewards": "{toy_redness: true}"})
    with pytest.raises(ConfigError, match="only nft trains from a deterministic sampler"):
        online_cfg(tmp_path, "grpo", **{"online.eta": 0.0})
    assert online_cfg(tmp_path, "nft", **{"online.eta": 0.0}).online.eta == 0.0
    # checked before the model loads: a missing prompts file, an unknown or misplaced reward
    for extra, message in [({"online.prompts": str(tmp_path / "missing.txt")}, "missing.txt"),
                           ({"online.rewards": "{toy_rednes: 1.0}"}, "online.rewards: unknown reward 'toy_rednes'. "
                                                                    "Did you mean 'toy_redness'"),
                           ({"online.monitor_rewards": "[toy_redness_judge]"}, "monitors are scalar rewards")]:
        with pytest.raises(DiffalignError, match=message):  # a missing file is a MissingFile
            check_online(online_cfg(tmp_path, "grpo", **extra), 1)


def test_pref_grpo_with_a_judge_logs_the_spread_of_its_win_rates(tmp_path):
    result = train(online_cfg(tmp_path, "pref_grpo", **{"online.rewards": "{toy_redness_judge: 1.0}",
                                                         "train.max_steps": 1}))
    record = rounds(result.output_dir)[0]
    assert 0 < record["win_rate_std"] <= 0.5 and 0 <= record["zero_std_groups"] <= 1
    card = (result.output_dir / "README.md").read_text()
    assert "online: 1 rounds of 8 images sampled from the model" in card and "records used" not in card
