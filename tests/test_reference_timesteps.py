"""Reference strategies, full fine-tuning and timestep control."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT, tiny_overrides

from diffalign.config import Config, ConfigError, load_config
from diffalign.families.timesteps import min_snr_weights, sample_discrete_timesteps, table_weights
from diffalign.training.reference import EmaReference, FrozenCopyReference, LoraEmaReference
from diffalign.training.step import denoising_errors


def small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def test_full_model_ema_moves_towards_policy_at_configured_rate():
    policy = small_net()
    reference = EmaReference(policy, "cpu", torch.float32, offload=False, decay=0.9, every=3)
    start = {n: p.detach().clone() for n, p in reference.model.named_parameters()}
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    reference.update(policy, step=2)  # not a multiple of 3: no update
    for n, p in reference.model.named_parameters():
        torch.testing.assert_close(p, start[n])
    reference.update(policy, step=3)
    for n, p in reference.model.named_parameters():
        torch.testing.assert_close(p, 0.9 * start[n] + 0.1 * (start[n] + 1.0))
    assert not any(p.requires_grad for p in reference.model.parameters())


def test_lora_ema_averages_trainable_weights_and_swaps_them_in_only_for_the_pass():
    policy = small_net()
    policy[0].requires_grad_(False)  # only layer 1 is "the LoRA"
    reference = LoraEmaReference(policy, decay=0.5, every=1)
    before = policy[1].weight.detach().clone()
    with torch.no_grad():
        policy[1].weight.add_(2.0)
    reference.update(policy, step=1)
    torch.testing.assert_close(reference.shadow["1.weight"], before + 1.0)  # 0.5 * w0 + 0.5 * (w0 + 2)
    x = torch.randn(5, 3)
    with reference.model_for_pass(policy) as model:
        expected = torch.nn.functional.linear(policy[0](x), before + 1.0, reference.shadow["1.bias"])
        torch.testing.assert_close(model(x), expected)  # the pass sees the EMA weights...
        torch.testing.assert_close(policy[1].weight, before + 2.0)  # ...without writing them into the policy
    torch.testing.assert_close(policy[1].weight, before + 2.0)
    assert set(reference.shadow) == {"1.weight", "1.bias"}


def test_frozen_copy_offload_lives_on_cpu_and_does_not_follow_training():
    policy = small_net()
    reference = FrozenCopyReference(policy, "cpu", torch.float32, offload=True)
    with torch.no_grad():
        policy[0].weight.add_(1.0)
    with reference.model_for_pass(policy) as model:
        assert not torch.equal(model[0].weight, policy[0].weight)
    assert next(reference.model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("overrides, message", [
    (["lora.enabled=false", "objective.reference=lora_disabled"], "no adapters to disable"),
    (["objective.reference=none"], "needs a reference model"),
    (["objective.name=mapo", "objective.reference=lora_disabled"], "runs no reference pass"),
    (["objective.name=sft", "objective.reference=ema"], "runs no reference pass"),
    (["objective.reference_offload=true"], "applies to a separate reference copy"),
    (["objective.reference=everything"], "objective.reference"),
    (["objective.ema_decay=1.5", "objective.reference=ema"], "ema_decay"),
])
def test_senseless_reference_combinations_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_reference_defaults():
    from diffalign.config import resolve_reference

    assert resolve_reference(load_config(None, [])) == "lora_disabled"
    assert resolve_reference(load_config(None, ["lora.enabled=false"])) == "frozen_copy"
    assert resolve_reference(load_config(None, ["objective.name=mapo"])) == "none"
    assert resolve_reference(load_config(None, ["objective.reference=ema"])) == "ema"


def test_interval_sampling_stays_inside_the_segment():
    t = sample_discrete_timesteps(1000, 5000, torch.Generator().manual_seed(0), [200, 400])
    assert t.min() >= 200 and t.max() < 400 and len(t.unique()) > 150
    with pytest.raises(ValueError, match="exceeds"):
        sample_discrete_timesteps(1000, 4, torch.Generator(), [500, 1200])


def test_logit_normal_ddpm_timesteps_floor_the_density_onto_the_grid_inside_the_interval():
    from diffalign.config import TimestepConfig
    from diffalign.families.timesteps import sample_ddpm_timesteps

    cfg = TimestepConfig(sampling="logit_normal", interval=[200, 400])
    t = sample_ddpm_timesteps(1000, 5000, torch.Generator().manual_seed(0), cfg, "logit_normal")
    assert t.dtype == torch.long and t.min() >= 200 and t.max() < 400
    # logit-normal(0, 1) restricted to u in [0.2, 0.4) puts more mass near 0.4 (closer to the mode at 0.5)
    assert (t >= 300).float().mean() > 0.55
    everywhere = sample_ddpm_timesteps(1000, 20_000, torch.Generator().manual_seed(1), TimestepConfig(), "logit_normal")
    assert abs((everywhere < 500).float().mean().item() - 0.5) < 0.015  # symmetric around u = 0.5
    assert (everywhere < 100).float().mean() < 0.02  # logit-normal(0, 1): P(u < 0.1) = Phi(-2.197) = 0.014


def test_timestep_sampling_choices_are_validated():
    from diffalign.config import ConfigError, load_config

    assert load_config(None, []).train.timesteps.sampling == "auto"
    with pytest.raises(ConfigError, match="sampling"):
        load_config(None, ["train.timesteps.sampling=cosine"])
    with pytest.raises(ConfigError, match="logit_std"):
        load_config(None, ["train.timesteps.logit_std=0"])


def test_min_snr_and_table_weights_by_hand():
    snr = torch.tensor([0.5, 5.0, 20.0])
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.25]))
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21]))
    weights = table_weights(torch.tensor([0, 99, 100, 500, 999]), [[0, 100, 2.0], [500, 1000, 0.5]])
    torch.testing.assert_close(weights, torch.tensor([2.0, 2.0, 1.0, 0.5, 0.5]))


@pytest.mark.parametrize("overrides, message", [
    (["train.timesteps.interval=[500, 100]"], "t_lo < t_hi"),
    (["train.timesteps.weighting=table"], "needs train.timesteps.weight_table"),
    (["train.timesteps.weighting=table", "train.timesteps.weight_table=[[0, 500, 1], [400, 900, 2]]"], "overlap"),
    (["train.timesteps.weighting=snr"], "weighting"),
])
def test_timestep_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_weights_multiply_policy_and_reference_errors(tiny_model_path):
    from diffalign.families import load_components
    from diffalign.training.reference import LoraDisabledReference

    cfg = Config()
    components = load_components(cfg.model)
    torch.manual_seed(0)
    latents, cond = torch.randn(3, 2, 4, 8, 8), {"encoder_hidden_states": torch.randn(3, 77, 32)}
    timestep_cfg = load_config(None, ["train.timesteps.weighting=min_snr", "train.timesteps.min_snr_gamma=1.0"]).train.timesteps

    def errors(ts_cfg):
        from diffalign.training.lora import attach_lora

        if not hasattr(components.denoiser, "peft_config"):
            attach_lora(components.denoiser, cfg.lora, ("to_q",))
        return denoising_errors(components.family, components, components.denoiser, latents, cond,
                                torch.Generator().manual_seed(1), "cpu", LoraDisabledReference(), ts_cfg)

    plain, weighted = errors(None), errors(timestep_cfg)
    alphas = components.noise_scheduler.alphas_cumprod[plain.timesteps]
    expected = (torch.clamp(alphas / (1 - alphas), max=1.0) / (alphas / (1 - alphas))).view(3, 1)
    torch.testing.assert_close(weighted.policy, plain.policy * expected)
    torch.testing.assert_close(weighted.reference, plain.reference * expected)


FULL_RELOAD = textwrap.dedent("""
    import sys, torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    unet = UNet2DConditionModel.from_pretrained(sys.argv[1])
    torch.manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 77, 32)
    with torch.no_grad():
        save_file({"sample": unet(x, t, encoder_hidden_states=ctx).sample.contiguous()}, sys.argv[2])
""")


@pytest.mark.parametrize("reference", ["frozen_copy", "ema"])
def test_full_fine_tune_saves_unet_folder_that_reloads(tmp_path, tiny_model_path, reference):
    from diffalign.training.trainer import train

    cfg = load_config(ROOT / "configs/tiny_dpo.yaml", tiny_overrides(
        tmp_path / "run", **{"lora.enabled": False, "train.max_steps": 3, "train.learning_rate": 1e-4,
                             "objective.reference": reference, "objective.ema_update_every": 1}))
    result = train(cfg)
    unet_dir = result.output_dir / "unet"
    assert (unet_dir / "config.json").is_file() and not (result.output_dir / "pytorch_lora_weights.safetensors").exists()
    script, out = tmp_path / "reload.py", tmp_path / "out.safetensors"
    script.write_text(FULL_RELOAD)
    subprocess.run([sys.executable, str(script), str(unet_dir), str(out)], check=True, capture_output=True)
    base_out = tmp_path / "base.safetensors"
    subprocess.run([sys.executable, str(script), str(tiny_model_path) + "/unet", str(base_out)], check=True,
                   capture_output=True)
    torch.manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 77, 32)
    with torch.no_grad():
        trained = result.denoiser(x, t, encoder_hidden_states=ctx).sample
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(str(out))["sample"], trained, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(load_file(str(base_out))["sample"], trained, atol=1e-4)  # it really trained the whole network


@pytest.mark.parametrize("objective, forwards", [("mapo", 1), ("sft", 1), ("dpo", 2), ("kto", 2)])
def test_reference_free_objectives_make_no_reference_call(objective, forwards):
    from diffalign.config import resolve_reference
    from diffalign.families import load_components
    from diffalign.training.lora import attach_lora
    from diffalign.training.reference import build_reference

    cfg = load_config(None, [f"objective.name={objective}"])
    components = load_components(cfg.model)
    attach_lora(components.denoiser, cfg.lora, ("to_q",))
    reference = build_reference(resolve_reference(cfg), cfg.objective, True, components.denoiser, "cpu", torch.float32)
    calls = []
    components.denoiser.register_forward_hook(lambda *args: calls.append(1))
    latents, cond = torch.randn(2, 2, 4, 8, 8), {"encoder_hidden_states": torch.randn(2, 77, 32)}
    errors = denoising_errors(components.family, components, components.denoiser, latents, cond,
                              torch.Generator().manual_seed(0), "cpu", reference)
    assert len(calls) == forwards
    assert (errors.reference is None) == (forwards == 1)


def test_full_model_ema_under_bf16_keeps_an_fp32_copy_that_moves(tmp_path, tiny_model_path):
    from diffalign.training.trainer import train

    cfg = load_config(ROOT / "configs/tiny_dpo.yaml", tiny_overrides(
        tmp_path / "run", **{"lora.enabled": False, "train.max_steps": 2, "train.learning_rate": 1e-3,
                             "train.lr_warmup_steps": 0, "train.mixed_precision": "bf16",
                             "objective.reference": "ema", "objective.ema_update_every": 1,
                             "objective.ema_decay": 0.999}))
    result = train(cfg)  # the fp32 copy runs under bf16 autocast next to the bf16 inputs
    assert math.isfinite(result.metrics["loss"]) and math.isfinite(result.metrics["ref_mse_w"])


def test_ema_copy_is_fp32_so_small_updates_do_not_round_away():
    policy = small_net()
    reference = EmaReference(policy, "cpu", torch.bfloat16, offload=False, decay=0.999, every=1)
    assert all(p.dtype == torch.float32 for p in reference.model.parameters())
    start = reference.model[0].weight.detach().clone()
    with torch.no_grad():
        policy[0].weight.add_(1e-3)
    reference.update(policy, step=1)
    torch.testing.assert_close(reference.model[0].weight - start, torch.full_like(start, 1e-6), atol=1e-7, rtol=0)
