"""End-to-end training on the tiny model: loss goes down, outputs reload in stock diffusers, resume is exact."""

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_overrides
from safetensors.torch import load_file

from diffalign.config import ConfigError, load_config
from diffalign.training.trainer import TrainingStopped, train


def tiny_cfg(tmp_path, name="run", **extra):
    return load_config(ROOT / "configs/tiny_dpo.yaml", tiny_overrides(tmp_path / name, **extra))


RELOAD_SCRIPT = textwrap.dedent("""
    import sys, torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file
    base, lora_dir, kohya_file, out = sys.argv[1:5]
    torch.manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 77, 32)
    results = {}
    for name, source in (("diffusers", lora_dir), ("kohya", kohya_file)):
        pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
        pipe.load_lora_weights(source)
        with torch.no_grad():
            results[name] = pipe.unet(x, t, encoder_hidden_states=ctx).sample
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    with torch.no_grad():
        results["base"] = pipe.unet(x, t, encoder_hidden_states=ctx).sample
    save_file({k: v.contiguous() for k, v in results.items()}, out)
""")


def test_train_writes_run_folder_and_lora_reloads_in_fresh_process(tmp_path, tiny_model_path):
    cfg = tiny_cfg(tmp_path, **{"lora.rank": 4, "lora.alpha": 12, "log.validation_every_n_steps": 3,
                                "log.report_to": "tensorboard", "log.validation_inference_steps": 3})
    result = train(cfg)
    run = result.output_dir
    assert result.global_step == 6 and result.skipped_steps == 0
    for name in ("config.yaml", "pytorch_lora_weights.safetensors", "README.md", "run_info.json"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step-3.png", "step-6.png"]
    assert list((run / "logs").rglob("events.out.tfevents*"))
    assert (run / "checkpoint-3" / "pytorch_lora_weights.safetensors").is_file()
    assert "tiny:sd15" in (run / "README.md").read_text() and "load_lora_weights" in (run / "README.md").read_text()
    assert load_config(run / "config.yaml").lora.alpha == 12  # the resolved config is a valid config
    assert {"loss", "implicit_acc", "reward_margin", "policy_mse_w", "ref_mse_w"} <= set(result.metrics)

    from diffalign.training.lora import export_kohya

    kohya = export_kohya(run)
    kohya_state = load_file(str(kohya))
    assert all(k.startswith("lora_unet_") for k in kohya_state)
    alphas = {v.item() for k, v in kohya_state.items() if k.endswith(".alpha")}
    assert alphas == {12.0}  # the real alpha, not the rank

    out = tmp_path / "reload.safetensors"
    script = tmp_path / "reload.py"
    script.write_text(RELOAD_SCRIPT)
    subprocess.run([sys.executable, str(script), tiny_model_path, str(run), str(kohya), str(out)], check=True,
                   capture_output=True)
    reloaded = load_file(str(out))
    torch.manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 77, 32)
    with torch.no_grad():
        trained = result.denoiser.float()(x, t, encoder_hidden_states=ctx).sample
    assert not torch.allclose(reloaded["base"], trained, atol=1e-4)  # the LoRA changed the outputs...
    torch.testing.assert_close(reloaded["diffusers"], trained, atol=1e-5, rtol=1e-4)  # ...and reloads exactly
    torch.testing.assert_close(reloaded["kohya"], trained, atol=1e-5, rtol=1e-4)


def lora_tensors(path):
    return load_file(str(path))


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    extra = {"train.lr_scheduler": "cosine", "train.lr_warmup_steps": 2, "train.gradient_accumulation_steps": 2}
    full = train(tiny_cfg(tmp_path, "full", **extra))
    # Simulate a run killed after step 3 while writing checkpoint 6: a complete checkpoint-3 and a half one.
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(full.output_dir / "checkpoint-3", interrupted / "checkpoint-3")
    (interrupted / ".checkpoint-6.tmp").mkdir()
    (interrupted / ".checkpoint-6.tmp" / "garbage.bin").write_bytes(b"half written")
    resumed = train(tiny_cfg(tmp_path, "interrupted", **extra, **{"train.resume": "latest"}))
    assert resumed.global_step == 6
    a = lora_tensors(full.output_dir / "pytorch_lora_weights.safetensors")
    b = lora_tensors(resumed.output_dir / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-7, rtol=0)
    # and it really resumed: a run from scratch with a different seed ends elsewhere
    other = train(tiny_cfg(tmp_path, "other", **extra, **{"train.seed": 1}))
    c = lora_tensors(other.output_dir / "pytorch_lora_weights.safetensors")
    assert any(not torch.allclose(a[k], c[k]) for k in a)


def nan_loss(loss, inputs):
    return loss * float("nan")


def flaky_objective(nan_calls, name="flaky_dpo", corrupt=nan_loss):
    """DPO, except that on the given call numbers ``corrupt(loss, inputs)`` replaces the loss (default: NaN):
    exercises the trainer's non-finite handling."""
    from diffalign.objectives import Objective, ObjectiveOutput, register_objective
    from diffalign.objectives.dpo import DPOParams, dpo_objective

    calls = {"n": 0}

    def loss_fn(inputs, params):
        calls["n"] += 1
        out = dpo_objective(inputs, params)
        if calls["n"] in nan_calls:
            return ObjectiveOutput(loss=corrupt(out.loss, inputs), metrics=out.metrics)
        return out

    register_objective(Objective(name=name, params_cls=DPOParams, loss_fn=loss_fn))
    return calls


def test_single_nonfinite_loss_skips_the_step_and_continues(tmp_path):
    flaky_objective(nan_calls={3})
    result = train(tiny_cfg(tmp_path, **{"objective.name": "flaky_dpo"}))
    assert result.global_step == 6 and result.skipped_steps == 1
    info = json.loads((result.output_dir / "run_info.json").read_text())
    assert info["skipped_steps"] == 1
    weights = lora_tensors(result.output_dir / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_repeated_nonfinite_losses_stop_and_keep_last_good_checkpoint(tmp_path):
    flaky_objective(nan_calls={4, 5, 6})
    cfg = tiny_cfg(tmp_path, **{"objective.name": "flaky_dpo", "train.max_consecutive_nonfinite": 2})
    with pytest.raises(TrainingStopped, match="2 steps in a row skipped for a non-finite loss"):
        train(cfg)
    run = tmp_path / "run"
    assert (run / "checkpoint-3").is_dir()
    assert not (run / "pytorch_lora_weights.safetensors").exists()
    weights = lora_tensors(run / "checkpoint-3" / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_fp16_on_cpu_is_refused_and_bf16_runs(tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        train(tiny_cfg(tmp_path, "fp16", **{"train.mixed_precision": "fp16"}))
    result = train(tiny_cfg(tmp_path, "bf16", **{"train.mixed_precision": "bf16", "train.max_steps": 2}))
    assert result.global_step == 2 and math.isfinite(result.metrics["loss"])
    lora = lora_tensors(result.output_dir / "pytorch_lora_weights.safetensors")
    assert all(v.dtype == torch.float32 for v in lora.values())  # trainable params were kept in fp32


def test_sft_runs_without_reference(tmp_path):
    result = train(tiny_cfg(tmp_path, **{"objective.name": "sft", "train.max_steps": 2}))
    assert set(result.metrics) >= {"loss", "policy_mse_w"} and "implicit_acc" not in result.metrics


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    plain = train(tiny_cfg(tmp_path, "plain", **{"train.max_steps": 2}))
    checkpointed = train(tiny_cfg(tmp_path, "ckpt", **{"train.max_steps": 2, "train.gradient_checkpointing": True}))
    a = lora_tensors(plain.output_dir / "pytorch_lora_weights.safetensors")
    b = lora_tensors(checkpointed.output_dir / "pytorch_lora_weights.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    assert checkpointed.denoiser.is_gradient_checkpointing


# segment recipes have their own test below
@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("tiny_*.yaml")
                                          if not p.stem.endswith("_segments")))
def test_every_tiny_config_trains_end_to_end(tmp_path, config):
    cfg = load_config(ROOT / "configs" / config, tiny_overrides(tmp_path / "run", **{"train.max_steps": 2}))
    result = train(cfg)
    assert result.global_step == 2 and math.isfinite(result.metrics["loss"])
    assert (result.output_dir / "pytorch_lora_weights.safetensors").is_file()
    info = json.loads((result.output_dir / "run_info.json").read_text())
    if cfg.objective.name in ("grpo", "pref_grpo", "nft"):  # online: no data read, rounds sampled instead
        assert info["online"]["rounds"] == 2 and info["data"]["kept"] == 0
    else:
        assert info["data"]["kept"] > 0


@pytest.mark.parametrize("base", ["tiny:sd15", "tiny:sd2v", "tiny:sdxl", "tiny:sd3", "tiny:sd35", "tiny:flux"])
def test_segment_recipe_trains_one_lora_per_interval_and_samples(tmp_path, base):
    """Every family: one LoRA per interval, each switched on in its own interval (SD3, FLUX: t = 1000 sigma)."""
    config = "tiny_dpo_segments.yaml"
    from diffalign.guidance import load_pipeline, parse_segments
    from diffalign.training.segments import train_segments

    cfg = load_config(ROOT / "configs" / config, tiny_overrides(tmp_path / "seg", **{"train.max_steps": 2,
                                                                                    "model.pretrained": base}))
    results = train_segments(cfg)
    assert [r.global_step for r in results] == [2, 2]
    segments = parse_segments(tmp_path / "seg" / "segments.yaml")
    assert [s.interval for s in segments] == [(500, 1000), (0, 500)]
    for segment, result in zip(segments, results):
        assert Path(segment.lora).resolve() == result.output_dir.resolve()
        trained = load_config(result.output_dir / "config.yaml")
        assert trained.train.timesteps.interval == list(segment.interval)
    assert load_config(results[1].output_dir / "config.yaml").data.source == "tiny:pairs-parquet"  # its own data
    pipe = load_pipeline(cfg.model.pretrained, segments=tmp_path / "seg" / "segments.yaml")
    pipe.set_progress_bar_config(disable=True)
    pipe("a square", num_inference_steps=4, guidance_scale=3.0, output_type="latent")
    for t, _, adapters in pipe.adapter_router.trace:
        assert list(adapters) == (["segment_0"] if t >= 500 else ["segment_1"])
    assert {tuple(adapters) for _, _, adapters in pipe.adapter_router.trace} == {("segment_0",), ("segment_1",)}
