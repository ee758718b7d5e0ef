"""NPO guidance and timestep segments on FLUX: true CFG (two sequential transformer calls per step, not a CFG
batch) routed per branch, and segments in 1000-sigma units although FluxPipeline passes sigma to its transformer.
Real tiny models against hand-written references; nothing mocked."""

import numpy
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from diffalign.errors import ConfigError
from diffalign.families.flux import calculate_shift
from diffalign.guidance import load_pipeline
from diffalign.offline.lora import build_tiny_lora

PROMPT, NEGATIVE, STEPS, SIZE = "a red square on a grey background", "blue shapes", 3, 32
TRUE_CFG, GUIDANCE = 4.0, 3.5  # true CFG scale, and [dev]'s embedded guidance value


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux_loras")
    return {name: str(build_tiny_lora(root / name, base="tiny:flux", seed=seed))
            for seed, name in enumerate(["pos", "npo", "segment"], start=1)}


def stock_flux(base, adapters):
    """A plain FluxPipeline with the given {path: weight} LoRAs active (zero weights left out)."""
    pipe = FluxPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    adapters = {path: weight for path, weight in adapters.items() if weight != 0.0}
    for i, path in enumerate(adapters):
        pipe.load_lora_weights(path, adapter_name=f"a{i}")
    if adapters:
        pipe.set_adapters([f"a{i}" for i in range(len(adapters))], list(adapters.values()))
    return pipe


def hand_written_true_cfg(cond_pipe, neg_pipe, seed=0):
    """FluxPipeline's true-CFG loop by hand: the conditional branch on ``cond_pipe``'s transformer, the negative on
    ``neg_pipe``'s, with the pipeline's sigmas, mu, latents and guidance embedding."""
    embeds, pooled, text_ids = cond_pipe.encode_prompt(PROMPT, None, device="cpu")
    neg_embeds, neg_pooled, neg_text_ids = cond_pipe.encode_prompt(NEGATIVE, None, device="cpu")
    latents, image_ids = cond_pipe.prepare_latents(1, cond_pipe.transformer.config.in_channels // 4, SIZE, SIZE,
                                                   embeds.dtype, "cpu", torch.Generator().manual_seed(seed))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(cond_pipe.scheduler.config)
    config = scheduler.config
    mu = calculate_shift(latents.shape[1], config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)
    scheduler.set_timesteps(sigmas=numpy.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    guidance = torch.full((1,), GUIDANCE) if cond_pipe.transformer.config.guidance_embeds else None
    with torch.no_grad():
        for t in scheduler.timesteps:
            sigma = t.expand(1) / 1000
            cond = cond_pipe.transformer(hidden_states=latents, timestep=sigma, guidance=guidance, pooled_projections=pooled,
                                         encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids,
                                         return_dict=False)[0]
            neg = neg_pipe.transformer(hidden_states=latents, timestep=sigma, guidance=guidance,
                                       pooled_projections=neg_pooled, encoder_hidden_states=neg_embeds,
                                       txt_ids=neg_text_ids, img_ids=image_ids, return_dict=False)[0]
            latents = scheduler.step(neg + TRUE_CFG * (cond - neg), t, latents, return_dict=False)[0]
    return latents


def sample(pipe, seed=0, steps=STEPS, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=GUIDANCE,
                generator=torch.Generator().manual_seed(seed), output_type="latent", **kwargs).images


@pytest.mark.parametrize("merge_weight", [0.0, 1.0])
def test_npo_guided_true_cfg_equals_the_two_transformer_reference(loras, merge_weight):
    pipe = load_pipeline("tiny:flux", lora=loras["pos"], npo=loras["npo"], npo_merge_weight=merge_weight)
    ours = sample(pipe, negative_prompt=NEGATIVE, true_cfg_scale=TRUE_CFG)
    # theta_pos = base + positive; theta_neg = base + NPO + (1 - m) * positive, in separately loaded pipelines
    policy = stock_flux(pipe.config._name_or_path, {loras["pos"]: 1.0})
    negative = stock_flux(pipe.config._name_or_path, {loras["npo"]: 1.0, loras["pos"]: 1.0 - merge_weight})
    torch.testing.assert_close(ours, hand_written_true_cfg(policy, negative), atol=1e-5, rtol=1e-5)
    # the branches matter: the NPO LoRA in the conditional branch instead gives another result
    swapped = hand_written_true_cfg(negative, policy)
    assert (ours - swapped).abs().max() > 1e-3
    branches = [branch for _, branch, _ in pipe.adapter_router.trace]
    assert branches == ["conditional", "negative"] * STEPS  # FluxPipeline's order: cond first, then uncond


def test_npo_without_true_cfg_is_refused_before_sampling(loras):
    pipe = load_pipeline("tiny:flux", lora=loras["pos"], npo=loras["npo"])
    hint = 'true_cfg_scale=4.0, negative_prompt=""'
    for kwargs in ({}, {"true_cfg_scale": TRUE_CFG}, {"negative_prompt": NEGATIVE},
                   {"negative_prompt": NEGATIVE, "true_cfg_scale": 1.0}):
        with pytest.raises(ConfigError, match="NPO guidance needs true CFG") as error:
            sample(pipe, **kwargs)
        assert hint in str(error.value) and "\n" not in str(error.value)
    assert not pipe.adapter_router.trace  # refused before any transformer call
    assert type(pipe).__name__ == "FluxPipeline" and isinstance(pipe, FluxPipeline)  # the guard keeps the class's face


def test_segments_switch_in_sigma_units_in_both_true_cfg_branches(loras):
    pipe = load_pipeline("tiny:flux", lora=loras["pos"], npo=loras["npo"],
                         segments=[{"lora": loras["segment"], "interval": [500, 1000]}])
    sample(pipe, steps=6, negative_prompt=NEGATIVE, true_cfg_scale=TRUE_CFG)
    trace = list(pipe.adapter_router.trace)
    sigmas = pipe.scheduler.sigmas[:-1].tolist()
    assert [branch for _, branch, _ in trace] == ["conditional", "negative"] * len(sigmas)
    # t = 1000 sigma (FluxPipeline passed sigma itself), the same step's t in both branches
    assert [t / 1000 for t, _, _ in trace] == pytest.approx([s for s in sigmas for _ in range(2)], abs=1e-6)
    assert trace[0][0] == 1000.0  # the pure-noise step lands on the top of the interval exactly
    for t, branch, adapters in trace:
        assert ("segment_0" in adapters) == (t >= 500), (t, branch, adapters)
        assert ("npo" in adapters) == (branch == "negative")
        assert adapters["positive"] == 1.0  # merge weight 0: the positive LoRA in both branches
    assert {"segment_0" in adapters for _, _, adapters in trace} == {True, False}  # the test spans the boundary


def test_schnell_with_a_positive_lora_samples_without_true_cfg(tmp_path):
    positive = str(build_tiny_lora(tmp_path / "pos", base="tiny:flux-schnell", seed=1))
    pipe = load_pipeline("tiny:flux-schnell", lora=positive)
    ours = sample(pipe)
    assert [(branch, adapters) for _, branch, adapters in pipe.adapter_router.trace] == \
        [("conditional", {"positive": 1.0})] * STEPS
    reference = stock_flux(pipe.config._name_or_path, {positive: 1.0})
    torch.testing.assert_close(ours, sample(reference), atol=1e-5, rtol=1e-5)
    assert (ours - sample(stock_flux(pipe.config._name_or_path, {}))).abs().max() > 1e-3  # the LoRA is active
