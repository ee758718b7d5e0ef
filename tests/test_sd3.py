"""The SD3 family: flow-matching noise and target on hand-made tensors, the timestep densities, conditioning as the
stock pipeline builds it (with and without T5), the LoRA format, and guidance in sigma units."""

import math

import pytest
import torch
from conftest import ROOT, assert_cached_and_uncached_train_alike, tiny_overrides
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from safetensors import safe_open

from diffalign.config import Config, ModelConfig, TimestepConfig, load_config
from diffalign.errors import ConfigError
from diffalign.families import load_components
from diffalign.families.sd3 import flow_matching_noisy, flow_matching_target, shift_levels, unshift_levels
from diffalign.families.timesteps import sample_unit_levels
from diffalign.guidance import load_pipeline
from diffalign.offline.lora import build_tiny_lora
from diffalign.offline.models import build_tiny_sd3
from diffalign.offline.specs import resolve_model_spec
from diffalign.training.lora import export_kohya
from diffalign.training.trainer import train


@pytest.fixture(scope="module")
def sd3():
    cfg = Config()
    cfg.model.pretrained = resolve_model_spec("tiny:sd3")
    return load_components(cfg.model)


def test_flow_matching_noise_and_target_on_hand_made_tensors():
    x0 = torch.tensor([[[[2.0, -4.0]]], [[[2.0, -4.0]]], [[[2.0, -4.0]]]])  # (3, 1, 1, 2)
    eps = torch.tensor([[[[-1.0, 1.0]]]]).expand(3, 1, 1, 2)
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    # x_t = (1 - sigma) x0 + sigma eps: 0.75 * 2 + 0.25 * -1 = 1.25 and 0.75 * -4 + 0.25 * 1 = -2.75 at sigma 0.25
    expected = torch.tensor([[[[2.0, -4.0]]], [[[1.25, -2.75]]], [[[-1.0, 1.0]]]])
    torch.testing.assert_close(flow_matching_noisy(x0, eps, sigmas), expected)
    torch.testing.assert_close(flow_matching_target(x0, eps), torch.tensor([[[[-3.0, 5.0]]]]).expand(3, 1, 1, 2))


def test_family_noises_at_sigma_t_over_1000_and_splits_the_velocity(sd3):
    family = sd3.family
    x0, eps = torch.randn(3, 16, 8, 8), torch.randn(3, 16, 8, 8)
    t = torch.tensor([0.0, 400.0, 999.0])
    x_t, target = family.noisy_input_and_target(sd3, x0, eps, t)
    sigma = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * eps)
    torch.testing.assert_close(target, eps - x0)
    alpha, sigma_levels = family.noise_levels(sd3, t)
    torch.testing.assert_close(sigma_levels, t / 1000)
    torch.testing.assert_close(alpha, 1 - t / 1000)
    # the exact velocity splits back into the x0 and eps that made x_t (Self-NPO's teacher relies on this)
    x0_hat, eps_hat = family.split_prediction(sd3, target, x_t, alpha.view(-1, 1, 1, 1), sigma_levels.view(-1, 1, 1, 1))
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=1e-5)


def test_the_shift_maps_levels_like_the_scheduler():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    u = torch.linspace(1.0, 0.001, 1000, dtype=torch.float64)  # the scheduler's unshifted training grid
    torch.testing.assert_close(shift_levels(u, 3.0).float(), scheduler.sigmas.float())
    assert shift_levels(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)  # 3 * 0.5 / (1 + 2 * 0.5)
    torch.testing.assert_close(unshift_levels(shift_levels(u, 3.0), 3.0), u)


def test_logit_normal_density_and_its_truncation():
    generator = torch.Generator().manual_seed(0)
    u = sample_unit_levels(40_000, generator, "logit_normal", mean=0.5, std=1.5)
    logits = torch.logit(u)
    assert logits.mean().item() == pytest.approx(0.5, abs=0.03)
    assert logits.std().item() == pytest.approx(1.5, abs=0.03)
    # truncated to [0.6, 0.9): every draw inside, distributed as the density restricted there (median by CDF)
    low, high = 0.6, 0.9
    u = sample_unit_levels(40_000, generator, "logit_normal", low, high, mean=0.0, std=1.0)
    assert low <= u.min().item() and u.max().item() < high
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    inverse = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((phi(math.log(low / (1 - low)))
                                                                      + phi(math.log(high / (1 - high)))) / 2))
    assert u.median().item() == pytest.approx(torch.sigmoid(inverse).item(), abs=0.005)
    uniform = sample_unit_levels(40_000, generator, "uniform", 0.2, 0.4)
    assert 0.2 <= uniform.min().item() and uniform.max().item() < 0.4
    assert uniform.mean().item() == pytest.approx(0.3, abs=0.003)


def test_training_timesteps_follow_the_density_the_shift_and_the_interval(sd3):
    family, generator = sd3.family, torch.Generator().manual_seed(0)
    t = family.sample_timesteps(sd3, 20_000, generator, TimestepConfig(sampling="uniform"))
    u = unshift_levels(t.double() / 1000, 3.0)  # undo the shift: uniform again
    assert (u < 0.5).float().mean().item() == pytest.approx(0.5, abs=0.015)
    assert (t / 1000 < 0.75).float().mean().item() == pytest.approx(0.5, abs=0.015)  # shift(0.5) = 0.75
    default = family.sample_timesteps(sd3, 20_000, generator, TimestepConfig())  # auto: logit-normal
    assert torch.logit(unshift_levels(default.double() / 1000, 3.0)).std().item() == pytest.approx(1.0, abs=0.03)
    inside = family.sample_timesteps(sd3, 2_000, generator, TimestepConfig(interval=[500, 800]))
    assert 500 <= inside.min().item() and inside.max().item() < 800


def test_min_snr_weighting_is_refused_for_flow_matching(sd3):
    with pytest.raises(ValueError, match="flow matching use weighting=table"):
        sd3.family.timestep_weights(sd3, torch.tensor([10.0]), TimestepConfig(weighting="min_snr"))
    weights = sd3.family.timestep_weights(sd3, torch.tensor([100.0, 600.0]),
                                          TimestepConfig(weighting="table", weight_table=[[500, 1000, 2.0]]))
    torch.testing.assert_close(weights, torch.tensor([1.0, 2.0]))


def test_conditioning_equals_the_stock_pipeline_encoding(sd3):
    pipe = sd3.family.build_pipeline(sd3)
    prompts = ["a red square", "two blue circles on grey"]
    cond = sd3.family.encode_prompts(sd3, prompts)
    states, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=False)
    assert cond["encoder_hidden_states"].shape == (2, 77 + 256, 64)
    torch.testing.assert_close(cond["encoder_hidden_states"], states)
    torch.testing.assert_close(cond["pooled_projections"], pooled)


def test_without_t5_the_text_states_end_in_zeros_as_in_the_pipeline(tmp_path):
    path = build_tiny_sd3(tmp_path / "no_t5", with_t5=False)
    cfg = Config()
    cfg.model.pretrained = str(path)
    components = load_components(cfg.model)
    assert len(components.text_encoders) == 2
    cond = components.family.encode_prompts(components, ["a red square"])
    states, _, _, _ = components.family.build_pipeline(components).encode_prompt(
        "a red square", None, None, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(cond["encoder_hidden_states"], states)
    assert torch.count_nonzero(cond["encoder_hidden_states"][:, 77:]) == 0


def test_lora_targets_the_joint_attention_and_saves_in_the_sd3_format(tmp_path):
    run = build_tiny_lora(tmp_path / "lora", base="tiny:sd3")
    with safe_open(str(run / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
        metadata = handle.metadata()
    assert keys and all(key.startswith("transformer.") and ".lora_" in key for key in keys)  # peft names, as
    # diffusers' SD3 LoRA script saves them
    adapted = {key.split(".lora")[0].rsplit(".", 1)[-1] if "to_out" not in key else "to_out.0" for key in keys}
    assert adapted == {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
    assert "lora_adapter_metadata" in metadata  # alpha survives the reload
    with pytest.raises(ValueError, match="SD3 transformer LoRA stays in the diffusers format"):
        export_kohya(run)


def test_segments_switch_in_sigma_units(tmp_path):
    path = resolve_model_spec("tiny:sd3")
    high = str(build_tiny_lora(tmp_path / "high", base=path, seed=1))
    pipe = load_pipeline(path, segments=[{"lora": high, "interval": [500, 1000]}])
    pipe.set_progress_bar_config(disable=True)
    pipe("a square", num_inference_steps=6, guidance_scale=3.0, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    sigmas = [t / 1000 for t, _, _ in pipe.adapter_router.trace]
    assert sigmas == pytest.approx(pipe.scheduler.sigmas[:-1].tolist(), abs=1e-6)  # t = 1000 sigma, every step
    for t, _, adapters in pipe.adapter_router.trace:
        assert ("segment_0" in adapters) == (t >= 500)
    assert {bool(adapters) for _, _, adapters in pipe.adapter_router.trace} == {True, False}


def test_ddpm_schedulers_are_refused_for_a_flow_model():
    with pytest.raises(ValueError, match="flow_euler"):
        load_pipeline("tiny:sd3", scheduler="ddim")
    with pytest.raises(ValueError, match="ddim"):
        load_pipeline("tiny:sd15", scheduler="flow_euler")


def test_training_refuses_min_snr_on_sd3_before_any_work(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny_sd3_dpo.yaml",
                      tiny_overrides(tmp_path / "run", **{"train.timesteps.weighting": "min_snr"}))
    with pytest.raises(ConfigError, match="flow matching use weighting=table"):
        train(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_resolution_must_tile_into_whole_patches():
    cfg = Config()
    cfg.model.pretrained = resolve_model_spec("tiny:sd3")
    cfg.model.resolution = 36  # a multiple of the VAE factor 4, not of 4 x patch size 2
    with pytest.raises(ValueError, match="multiple of 8"):
        load_components(cfg.model)


def test_two_dpo_steps_train_cached_and_uncached_alike_and_render_validation(tmp_path):
    assert_cached_and_uncached_train_alike("tiny_sd3_dpo.yaml", tmp_path)  # T5 states cached too


def test_full_fine_tune_saves_a_transformer_folder_the_pipeline_takes(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny_sd3_dpo.yaml", tiny_overrides(
        tmp_path / "run", **{"lora.enabled": False, "train.max_steps": 2, "train.learning_rate": 1e-3}))
    result = train(cfg)
    folder = result.output_dir / "transformer"
    assert result.lora_path == folder and (folder / "config.json").is_file()
    card = (result.output_dir / "README.md").read_text()
    assert 'SD3Transformer2DModel.from_pretrained("' in card and "transformer=transformer" in card
    reloaded = SD3Transformer2DModel.from_pretrained(str(folder))
    pipe = DiffusionPipeline.from_pretrained(_base_path(cfg), transformer=reloaded)  # as the model card says
    base = DiffusionPipeline.from_pretrained(_base_path(cfg))
    inputs = dict(hidden_states=torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)),
                  timestep=torch.tensor([600.0]), encoder_hidden_states=torch.randn(1, 333, 64),
                  pooled_projections=torch.randn(1, 64))
    with torch.no_grad():
        trained = result.denoiser.float()(**inputs).sample
        torch.testing.assert_close(pipe.transformer(**inputs).sample, trained, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(base.transformer(**inputs).sample, trained, atol=1e-4)  # it really trained


def _base_path(cfg) -> str:
    return resolve_model_spec(cfg.model.pretrained)


def test_sd35_dual_attention_is_in_the_default_targets_and_loads_in_the_pipeline(tmp_path):
    """SD3.5-medium's second attention (attn2, in its dual-attention blocks) is adapted by default, and the saved
    LoRA puts it back in the stock pipeline; SD3 has no attn2 and its targets do not name one."""
    sd3 = load_components(ModelConfig(pretrained=resolve_model_spec("tiny:sd3")))
    assert not any(name.startswith("attn2") for name in sd3.family.lora_targets(sd3.denoiser))
    run = build_tiny_lora(tmp_path / "lora", base="tiny:sd35")
    with safe_open(str(run / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    assert "transformer.transformer_blocks.0.attn2.to_q.lora_A.weight" in keys
    assert not any("transformer_blocks.1.attn2" in key for key in keys)  # block 1 is not a dual-attention block
    pipe = DiffusionPipeline.from_pretrained(resolve_model_spec("tiny:sd35"))
    pipe.load_lora_weights(str(run))
    assert hasattr(pipe.transformer.transformer_blocks[0].attn2.to_q, "lora_A")
