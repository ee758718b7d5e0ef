"""Every model family through the whole product, on its tiny model: training, LoRA reload in the family's stock
diffusers pipeline (fresh process), NPO-guided sampling against a hand-written reference, pairs and eval.

Families: sd15 (epsilon), sd2v (SD2.x v-prediction), sdxl (two text encoders, per-image time ids), sd3
(flow-matching MMDiT, three text encoders, a transformer called by keyword), sd35 (SD3's with dual attention),
flux and flux-schnell (FLUX.1 [dev] with embedded guidance, [schnell] without; packed latents).
"""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_overrides
from diffusers import DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from safetensors import safe_open

from diffalign.config import Config, load_config
from diffalign.data import read_preferences
from diffalign.data.records import open_image
from diffalign.evaluation.pairs import PairSettings, generate_pairs
from diffalign.evaluation.report import run_eval
from diffalign.families import load_components
from diffalign.guidance import load_pipeline
from diffalign.guidance.sample import SampleSettings
from diffalign.objectives import ObjectiveInputs, get_objective
from diffalign.offline.lora import build_tiny_lora
from diffalign.offline.specs import resolve_model_spec
from diffalign.rewards import build_reward
from diffalign.training.lora import attach_lora
from diffalign.training.reference import build_reference
from diffalign.training.step import denoising_errors
from diffalign.training.trainer import train

FAMILIES = ["sd15", "sd2v", "sdxl", "sd3", "sd35", "flux", "flux-schnell"]
PROMPT, NEGATIVE, STEPS, SCALE = "a red square on a grey background", "blue shapes", 3, 4.0


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request) -> tuple[str, str]:
    return request.param, resolve_model_spec(f"tiny:{request.param}")


def test_each_family_trains_towards_its_own_target(family_model):
    """The target follows the checkpoint: sd2v's is v = alpha_t * eps - sigma_t * x0, sd15 and sdxl's eps, and
    the flow models' (sd3, sd35, flux) the velocity eps - x0 at x_t = (1 - sigma) x0 + sigma eps with
    sigma = t / 1000; by hand."""
    name, path = family_model
    cfg = Config()
    cfg.model.pretrained = path
    components = load_components(cfg.model)
    scheduler = components.noise_scheduler
    if components.family.flow_matching:
        x0, eps, t = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8), torch.tensor([100.0, 750.0])
        x_t, target = components.family.noisy_input_and_target(components, x0, eps, t)
        sigma = torch.tensor([0.1, 0.75]).view(-1, 1, 1, 1)
        torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * eps)
        torch.testing.assert_close(target, eps - x0)
        return
    assert scheduler.config.prediction_type == ("v_prediction" if name == "sd2v" else "epsilon")
    x0, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 800])
    x_t, target = components.family.noisy_input_and_target(components, x0, eps, t)
    alpha = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, alpha * x0 + sigma * eps)
    torch.testing.assert_close(target, alpha * eps - sigma * x0 if name == "sd2v" else eps)


def test_dpo_lowers_its_loss_on_a_fixed_batch(family_model, tiny_data_path):
    _, path = family_model
    cfg = Config()
    cfg.model.pretrained = path
    components = load_components(cfg.model)
    family = components.family
    records, _ = read_preferences(cfg.data, tiny_data_path)
    records = records[:6]
    pixels = torch.stack([torch.stack([family.preprocess_image(open_image(s), components.resolution) for s in r.images])
                          for r in records])
    latents = family.encode_images(components, pixels.flatten(0, 1))
    latents = latents.view(len(records), 2, *latents.shape[1:])
    cond = family.encode_prompts(components, [r.prompt for r in records])
    if family.needs_image_sizes:  # SDXL: per-image time ids from each image's original size and crop
        sizes = torch.tensor([[family.image_size(open_image(s), components.resolution) for s in r.images]
                              for r in records])
        cond.update(family.image_cond(components, sizes))
    cond.update(family.run_cond(components, len(records), "cpu"))  # FLUX.1-dev's guidance value
    attach_lora(components.denoiser, cfg.lora, family.lora_targets(components.denoiser))
    reference = build_reference("lora_disabled", cfg.objective, True, components.denoiser, "cpu", torch.float32)
    objective = get_objective("dpo")
    params = objective.parse_params({"beta": 500.0})
    optimizer = torch.optim.AdamW([p for p in components.denoiser.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(8):
        generator = torch.Generator().manual_seed(0)  # the same noise and timesteps every step
        errors = denoising_errors(family, components, components.denoiser, latents, cond, generator, "cpu", reference)
        loss = objective(ObjectiveInputs(errors.policy, errors.reference), params).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B starts at zero: policy == reference
    assert losses[-1] < losses[0] - 1e-3, losses


RELOAD_SCRIPT = """
import sys, torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
base, run, out = sys.argv[1:4]
pipe = DiffusionPipeline.from_pretrained(base)
pipe.load_lora_weights(run)
pipe.set_progress_bar_config(disable=True)
latents = pipe("a red square", num_inference_steps=3, guidance_scale=4.0, output_type="latent", height=32, width=32,
               generator=torch.Generator().manual_seed(0)).images
save_file({"latents": latents.contiguous()}, out, metadata={"pipeline": type(pipe).__name__})
"""


def test_trained_lora_reloads_in_the_stock_pipeline_in_a_fresh_process(family_model, tmp_path):
    name, path = family_model
    cfg = load_config(ROOT / "configs" / "tiny_dpo.yaml",
                      tiny_overrides(tmp_path / "run", **{"model.pretrained": path, "lora.rank": 4, "lora.alpha": 8,
                                                          "train.max_steps": 3, "train.learning_rate": 5e-3}))
    result = train(cfg)
    card = (result.output_dir / "README.md").read_text()
    assert ("--format kohya" in card) == (not name.startswith("sd3"))  # SD3's LoRA has no kohya layout
    components = load_components(cfg.model)
    pipe = components.family.build_pipeline(components, result.denoiser.float())
    pipe.set_progress_bar_config(disable=True)
    trained = pipe("a red square", num_inference_steps=3, guidance_scale=4.0, output_type="latent", height=32,
                   width=32, generator=torch.Generator().manual_seed(0)).images
    base = components.family.build_pipeline(components)  # the untouched base, for contrast
    base.set_progress_bar_config(disable=True)
    script = tmp_path / "reload.py"
    script.write_text(RELOAD_SCRIPT)
    out = tmp_path / "reloaded.safetensors"
    subprocess.run([sys.executable, str(script), path, str(result.output_dir), str(out)], check=True,
                   capture_output=True)
    with safe_open(str(out), framework="pt") as handle:
        reloaded = {"latents": handle.get_tensor("latents"), **handle.metadata()}
    assert reloaded["pipeline"] == type(pipe).__name__
    torch.testing.assert_close(reloaded["latents"], trained, atol=1e-4, rtol=1e-4)
    untouched = base("a red square", num_inference_steps=3, guidance_scale=4.0, output_type="latent", height=32,
                     width=32, generator=torch.Generator().manual_seed(0)).images
    assert not torch.allclose(untouched, trained, atol=1e-4)  # the LoRA is really in the reloaded outputs


def hand_written_npo_sampling(base, positive, npo):
    """Two separate stock pipelines (base + positive LoRA, base + NPO LoRA), combined by the CFG formula."""
    pos_pipe, neg_pipe = DiffusionPipeline.from_pretrained(base), DiffusionPipeline.from_pretrained(base)
    pos_pipe.load_lora_weights(positive)
    neg_pipe.load_lora_weights(npo)
    if type(pos_pipe).__name__ == "StableDiffusion3Pipeline":
        return hand_written_flow_npo_sampling(pos_pipe, neg_pipe)
    sdxl = type(pos_pipe).__name__ == "StableDiffusionXLPipeline"
    if sdxl:  # 4 tensors, and the UNet's added conditioning: pooled text embeds + (32, 32, 0, 0, 32, 32) time ids
        cond, uncond, pooled, pooled_uncond = pos_pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                                     do_classifier_free_guidance=True,
                                                                     negative_prompt=NEGATIVE)
        time_ids = pos_pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), dtype=cond.dtype,
                                              text_encoder_projection_dim=pos_pipe.text_encoder_2.config.projection_dim)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        added_uncond = {"text_embeds": pooled_uncond, "time_ids": time_ids}
    else:
        cond, uncond = pos_pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
        added = added_uncond = None
    scheduler = DDIMScheduler.from_config(pos_pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t)
            out_neg = neg_pipe.unet(x, t, encoder_hidden_states=uncond, added_cond_kwargs=added_uncond).sample
            out_pos = pos_pipe.unet(x, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
            latents = scheduler.step(out_neg + SCALE * (out_pos - out_neg), t, latents).prev_sample
    return latents


def hand_written_flow_npo_sampling(pos_pipe, neg_pipe):
    """SD3: the transformer takes pooled projections, the flow-matching Euler scheduler steps along the velocity."""
    cond, uncond, pooled, pooled_uncond = pos_pipe.encode_prompt(PROMPT, None, None, device="cpu",
                                                                 num_images_per_prompt=1,
                                                                 do_classifier_free_guidance=True,
                                                                 negative_prompt=NEGATIVE)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pos_pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    latents = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in scheduler.timesteps:
            t_batch = t.expand(1)
            out_neg = neg_pipe.transformer(hidden_states=latents, timestep=t_batch, encoder_hidden_states=uncond,
                                           pooled_projections=pooled_uncond).sample
            out_pos = pos_pipe.transformer(hidden_states=latents, timestep=t_batch, encoder_hidden_states=cond,
                                           pooled_projections=pooled).sample
            latents = scheduler.step(out_neg + SCALE * (out_pos - out_neg), t, latents).prev_sample
    return latents


def test_npo_guided_sampling_equals_the_two_denoiser_reference(family_model, tmp_path):
    name, path = family_model
    if name.startswith("flux"):
        pytest.skip("FLUX runs no CFG batch; NPO guidance there is true CFG, tested in tests/test_flux_guidance.py")
    positive = str(build_tiny_lora(tmp_path / "pos", base=path, seed=1))
    npo = str(build_tiny_lora(tmp_path / "npo", base=path, seed=2))
    # merge weight 1: the negative branch is base + NPO alone (0 would add the positive LoRA there too)
    pipe = load_pipeline(path, lora=positive, npo=npo, npo_merge_weight=1.0,
                         scheduler="flow_euler" if name.startswith("sd3") else "ddim")
    pipe.set_progress_bar_config(disable=True)
    ours = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=SCALE,
                generator=torch.Generator().manual_seed(0), output_type="latent").images
    torch.testing.assert_close(ours, hand_written_npo_sampling(path, positive, npo), atol=1e-5, rtol=1e-5)


def test_pairs_train_and_eval_run(family_model, tmp_path):
    _, path = family_model
    rewards = {"toy_redness": build_reward("toy_redness")}
    settings = PairSettings(images_per_prompt=2, steps=2, guidance_scale=3.0, batch_size=4)
    result = generate_pairs(load_pipeline(path), ["a square", "a circle"], rewards, settings, tmp_path / "pairs")
    assert result.pairs == 2
    cfg = load_config(ROOT / "configs" / "tiny_dpo.yaml",
                      tiny_overrides(tmp_path / "run", **{"model.pretrained": path, "data.source": str(tmp_path / "pairs" / "pairs"),
                                                          "train.max_steps": 1, "train.batch_size": 2}))
    trained = train(cfg)
    report = run_eval(path, {"dpo": {"lora": str(trained.output_dir)}}, ["a square"], rewards,
                      SampleSettings(num_images=2, steps=2, guidance_scale=3.0), tmp_path / "eval", resamples=200)
    table = json.loads(report.paths["report"].read_text())["rewards"]["toy_redness"]
    assert set(table) == {"base", "dpo"} and table["dpo"]["win_rate"]["n"] == 2
