"""The FLUX.1 family against diffusers' FluxPipeline and by hand: packing, position ids, conditioning, the
transformer call with its guidance value, resolution-dependent shifting in training and sampling, [schnell];
then training runs: cached and uncached, full fine-tuning, two processes with an exact resume."""

import json
import math
import shutil

import numpy
import pytest
import torch
from conftest import ROOT, assert_cached_and_uncached_train_alike, tiny_overrides
from diffusers import DiffusionPipeline, FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file
from test_distributed import launch_two_processes

from diffalign.config import ModelConfig, TimestepConfig, load_config
from diffalign.errors import ConfigError
from diffalign.families import load_components
from diffalign.families.flux import calculate_shift, image_ids, pack_latents, unpack_latents
from diffalign.families.sd3 import unshift_levels
from diffalign.offline.specs import resolve_model_spec
from diffalign.online.sampling import sampling_grid
from diffalign.training.trainer import train

PROMPTS = ["a red square", "a blue circle on grey"]


@pytest.fixture(scope="module")
def flux():
    return load_components(ModelConfig(pretrained=resolve_model_spec("tiny:flux")))


@pytest.fixture(scope="module")
def pipe(flux):
    pipe = FluxPipeline.from_pretrained(flux.pretrained)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_packing_and_position_ids_are_the_pipelines(pipe):
    latents = torch.randn(3, 16, 8, 6)
    packed = pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 3, 16, 8, 6), rtol=0, atol=0)
    assert packed.shape == (3, 12, 64)
    torch.testing.assert_close(unpack_latents(packed, 8, 6), latents, rtol=0, atol=0)
    # the pipeline unpacks from pixel sizes: 8 x 6 latents are 32 x 24 px at the tiny VAE's factor 4
    torch.testing.assert_close(FluxPipeline._unpack_latents(packed, 32, 24, 4), latents, rtol=0, atol=0)
    expected = FluxPipeline._prepare_latent_image_ids(3, 4, 3, "cpu", torch.float32)
    torch.testing.assert_close(image_ids(8, 6, "cpu", torch.float32), expected, rtol=0, atol=0)
    assert image_ids(8, 6, "cpu", torch.float32)[5].tolist() == [0.0, 1.0, 2.0]  # token 5: row 1, column 2


def test_conditioning_equals_the_pipeline_encoding(flux, pipe):
    cond = flux.family.encode_prompts(flux, PROMPTS)
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, PROMPTS, device="cpu")
    torch.testing.assert_close(cond["encoder_hidden_states"], prompt_embeds)
    torch.testing.assert_close(cond["pooled_projections"], pooled)
    assert cond["encoder_hidden_states"].shape == (2, 512, 32) and not text_ids.any()  # T5's 512 tokens, zero ids


def test_prediction_is_the_pipelines_transformer_call_with_the_guidance_value(flux, pipe):
    family = flux.family
    x_t, t = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([900.0, 250.0])
    cond = {**family.encode_prompts(flux, PROMPTS), **family.run_cond(flux, 2, "cpu")}
    assert cond["guidance"].tolist() == [1.0, 1.0]  # model.flux_guidance's default
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, PROMPTS, device="cpu")
    with torch.no_grad():
        ours = family.predict(flux.denoiser, x_t, t, cond)
        theirs = pipe.transformer(hidden_states=FluxPipeline._pack_latents(x_t, 2, 16, 8, 8), timestep=t / 1000,
                                  guidance=torch.full([2], 1.0), pooled_projections=pooled,
                                  encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                                  img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
                                  return_dict=False)[0]
        torch.testing.assert_close(ours, FluxPipeline._unpack_latents(theirs, 32, 32, 4))
        other = family.predict(flux.denoiser, x_t, t, {**cond, "guidance": torch.full((2,), 3.5)})
    assert (other - ours).abs().max() > 1e-4  # the guidance value is really an input


def test_the_guidance_value_is_the_configured_one_and_schnell_has_none():
    dev = load_components(ModelConfig(pretrained=resolve_model_spec("tiny:flux"), flux_guidance=3.5))
    assert dev.family.run_cond(dev, 3, "cpu")["guidance"].tolist() == [3.5] * 3 and dev.family.embedded_guidance(dev)
    schnell = load_components(ModelConfig(pretrained=resolve_model_spec("tiny:flux-schnell")))
    assert schnell.family.name == "flux" and schnell.family.run_cond(schnell, 3, "cpu") == {}
    assert not schnell.denoiser.config.guidance_embeds and schnell.family.timestep_shift(schnell) == 1.0


def test_mu_is_linear_in_the_image_tokens_through_flux_anchor_points():
    assert calculate_shift(256) == pytest.approx(0.5) and calculate_shift(4096) == pytest.approx(1.15)
    assert calculate_shift(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)  # 512 px at FLUX's 8x VAE: 32x32 tokens


def test_training_timesteps_are_shifted_by_mu_of_the_training_resolution(flux):
    family = flux.family
    mu = 0.5 + 0.65 / 3840 * (16 - 256)  # 32 px -> 8x8 latents -> 4x4 = 16 packed tokens; by hand
    assert family.timestep_shift(flux) == pytest.approx(math.exp(mu))
    t = family.sample_timesteps(flux, 20_000, torch.Generator().manual_seed(0), TimestepConfig(sampling="uniform"))
    u = unshift_levels(t.double() / 1000, math.exp(mu))  # undo the shift by hand: uniform again
    assert u.min() >= 0 and u.max() <= 1 and u.mean().item() == pytest.approx(0.5, abs=0.01)
    # E[sigma] for u ~ U(0, 1) under sigma = s u / (1 + (s - 1) u): s / (s - 1) - s ln(s) / (s - 1)^2
    s = math.exp(mu)
    assert (t / 1000).mean().item() == pytest.approx(s / (s - 1) - s * math.log(s) / (s - 1) ** 2, abs=0.005)


def test_sampling_grid_is_the_one_the_pipeline_samples_on(flux, pipe):
    seen = []

    def record(pipeline, step, timestep, kwargs):
        seen.append(float(timestep))
        return kwargs

    pipe("a red square", num_inference_steps=5, height=32, width=32, output_type="latent",
         callback_on_step_end=record, generator=torch.Generator().manual_seed(0))
    grid = sampling_grid(flux.family, flux, 5)
    torch.testing.assert_close(grid.timesteps, torch.tensor(seen), rtol=0, atol=1e-4)
    mu = calculate_shift(16)  # the pipeline's shift at 32 px, on linspace(1, 1/5, 5)
    base = torch.tensor(numpy.linspace(1.0, 0.2, 5), dtype=torch.float32)
    torch.testing.assert_close(grid.sigma, math.exp(mu) * base / (1 + (math.exp(mu) - 1) * base))
    assert grid.sigma_next[-1] == 0


def test_two_dpo_steps_train_cached_and_uncached_alike(tmp_path):
    assert_cached_and_uncached_train_alike("tiny_flux_dpo.yaml", tmp_path)  # T5 states and guidance


def test_full_fine_tune_saves_a_transformer_folder_the_pipeline_takes(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny_flux_dpo.yaml", tiny_overrides(
        tmp_path / "run", **{"lora.enabled": False, "train.max_steps": 2, "train.learning_rate": 1e-3}))
    result = train(cfg)
    folder = result.output_dir / "transformer"
    assert result.lora_path == folder and (folder / "config.json").is_file()
    assert 'FluxTransformer2DModel.from_pretrained("' in (result.output_dir / "README.md").read_text()
    base_path = resolve_model_spec("tiny:flux")
    pipe = DiffusionPipeline.from_pretrained(base_path, transformer=FluxTransformer2DModel.from_pretrained(str(folder)))
    base = DiffusionPipeline.from_pretrained(base_path)
    generator = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 64, generator=generator), timestep=torch.tensor([0.6]),
                  guidance=torch.tensor([1.0]), encoder_hidden_states=torch.randn(1, 512, 32, generator=generator),
                  pooled_projections=torch.randn(1, 32, generator=generator), txt_ids=torch.zeros(512, 3),
                  img_ids=image_ids(8, 8, "cpu", torch.float32))
    with torch.no_grad():
        trained = result.denoiser.float()(**inputs).sample
        torch.testing.assert_close(pipe.transformer(**inputs).sample, trained, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(base.transformer(**inputs).sample, trained, atol=1e-4)


def test_two_processes_share_the_cache_and_resume_exactly(tmp_path):
    """Two processes build the feature cache together and train in step; a run resumed from its checkpoint ends
    with the uninterrupted run's LoRA."""
    extra = {"data.cache_dir": str(tmp_path / "features")}
    full = tmp_path / "full"
    launch_two_processes("tiny_flux_dpo.yaml", full, **extra)
    info = json.loads((full / "run_info.json").read_text())
    assert info["num_processes"] == 2 and info["lora_checksums"][0] == info["lora_checksums"][1]
    assert all(share > 0 for share in info["data_build"]["images_per_process"])
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    completed = launch_two_processes("tiny_flux_dpo.yaml", resumed, **extra, **{"train.resume": "latest"})
    assert "resumed from" in completed.stdout
    a, b = (load_file(str(run / "pytorch_lora_weights.safetensors")) for run in (full, resumed))
    assert any(value.abs().max() > 0 for key, value in a.items() if "lora_B" in key)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-7, rtol=0)


@pytest.mark.parametrize("model", ["tiny:flux", "tiny:flux-schnell"])
def test_online_rounds_embed_the_guidance_scale_on_dev_and_run_no_cfg_on_schnell(tmp_path, model):
    from accelerate import Accelerator

    from diffalign.objectives import get_objective
    from diffalign.online.rounds import OnlineRounds

    def rounds_with(guidance: float) -> OnlineRounds:
        cfg = load_config(ROOT / "configs" / "tiny_grpo.yaml", tiny_overrides(
            tmp_path / "run", **{"model.pretrained": model, "online.guidance_scale": guidance,
                                 "online.prompts_per_round": 2, "online.group_size": 2, "train.batch_size": 2}))
        objective = get_objective("grpo")
        return OnlineRounds(cfg, Accelerator(cpu=True), load_components(cfg.model), objective,
                            objective.parse_params(cfg.objective.selected), torch.float32, tmp_path)

    if model == "tiny:flux-schnell":  # FluxPipeline samples schnell without guidance: rounds may not use CFG
        with pytest.raises(ConfigError, match="schnell samples without CFG"):
            rounds_with(3.5)
    rounds = rounds_with(3.5 if model == "tiny:flux" else 1.0)
    cond, uncond = rounds.conditioning(["a red square", "a blue circle"])
    if model == "tiny:flux":  # [dev]: the value goes in as the pipeline's guidance_scale, and no CFG branch runs
        assert cond["guidance"].tolist() == [3.5, 3.5] and uncond is None
    else:  # [schnell]: no guidance input and no CFG branch
        assert "guidance" not in cond and uncond is None


def test_sample_command_runs_npo_guidance_on_flux_with_true_cfg(tmp_path, capsys):
    from PIL import Image

    from diffalign.cli import main
    from diffalign.offline.lora import build_tiny_lora

    path = resolve_model_spec("tiny:flux")
    lora, npo = (build_tiny_lora(tmp_path / name, base=path, seed=seed) for name, seed in (("pos", 1), ("npo", 2)))
    common = ["sample", "--model", path, "--prompt", "a red square", "--lora", str(lora), "--npo", str(npo),
              "--steps", "2", "--guidance", "3.5"]
    assert main([*common, "--out", str(tmp_path / "refused")]) == 2
    assert "NPO guidance on flux runs in true CFG's negative branch" in capsys.readouterr().err
    assert main([*common, "--true-cfg", "4", "--out", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "samples.jsonl").read_text().splitlines()[0])
    assert record["true_cfg_scale"] == 4.0
    assert Image.open(tmp_path / "out" / record["file_name"]).size == (32, 32)  # the VAE's native size


def test_true_cfg_is_refused_where_it_cannot_run_and_flux_samples_at_its_own_guidance(tmp_path, capsys):
    from diffalign.cli import main

    sd35 = resolve_model_spec("tiny:sd35")
    assert main(["sample", "--model", sd35, "--prompt", "a", "--true-cfg", "4", "--steps", "1",
                 "--out", str(tmp_path / "sd35")]) == 2
    assert "--true-cfg is FLUX's true CFG" in capsys.readouterr().err and not (tmp_path / "sd35").exists()
    flux = resolve_model_spec("tiny:flux")
    assert main(["sample", "--model", flux, "--prompt", "a", "--steps", "1", "--out", str(tmp_path / "f")]) == 0
    record = json.loads((tmp_path / "f" / "samples.jsonl").read_text().splitlines()[0])
    assert record["guidance_scale"] == 3.5  # FluxPipeline's default, not the 7.5 of the CFG families
    npo = str(resolve_model_spec("tiny:flux"))  # any path: refused before it is read
    assert main(["eval", "--model", flux, "--prompts", "shapes", "--limit", "1", "--reward", "toy_redness",
                 "--setup", f"n:npo={npo}", "--out", str(tmp_path / "e")]) == 2
    assert "setup 'n': NPO guidance on flux runs in true CFG's negative branch" in capsys.readouterr().err
    assert not (tmp_path / "e" / "samples").exists()  # refused before the base was sampled


def test_pairs_refuse_to_resume_with_another_true_cfg(tmp_path):
    from diffalign.cli import main

    flux = resolve_model_spec("tiny:flux")
    common = ["pairs", "--model", flux, "--prompt", "a red square", "--images-per-prompt", "2", "--steps", "1",
              "--reward", "toy_redness", "--out", str(tmp_path / "pairs")]
    assert main(common) == 0
    assert main([*common, "--true-cfg", "4"]) == 2  # its images were made without true CFG
    assert main(common) == 0  # the same settings resume (nothing left to do)
