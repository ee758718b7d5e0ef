"""NPO-guided CFG and timestep-segment switching against hand-written references on the tiny model."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffalign.guidance import load_pipeline, parse_segments

PROMPT, NEGATIVE, STEPS, SCALE = "a red square on a grey background", "blue shapes", 5, 4.0


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_model_path):
    from diffalign.offline.lora import build_tiny_lora

    root = tmp_path_factory.mktemp("loras")
    return {name: str(build_tiny_lora(root / name, seed=seed)) for seed, name in enumerate(["pos", "npo", "a", "b"])}


def stock_pipeline(base, adapters=None):
    """A plain diffusers pipeline with the given {path: weight} LoRAs merged as active adapters."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    for i, path in enumerate(adapters or {}):
        pipe.load_lora_weights(path, adapter_name=f"a{i}")
    if adapters:
        pipe.set_adapters([f"a{i}" for i in range(len(adapters))], list(adapters.values()))
    return pipe


def scheduler_for(pipe, name):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    cls = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[name]
    return cls.from_config(pipe.scheduler.config)


def hand_written_npo_sampling(base, positive, npo, merge_weight, scheduler_name, seed=0):
    """Two separate denoisers combined by the CFG formula, with the pipeline's own scheduler maths."""
    pos_pipe = stock_pipeline(base, {positive: 1.0} if positive else None)
    neg_pipe = stock_pipeline(base, {npo: 1.0, **({positive: 1.0 - merge_weight} if positive else {})})
    cond, uncond = pos_pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
    scheduler = scheduler_for(pos_pipe, scheduler_name)
    scheduler.set_timesteps(STEPS)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed)) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t)
            eps_neg = neg_pipe.unet(x, t, encoder_hidden_states=uncond).sample
            eps_pos = pos_pipe.unet(x, t, encoder_hidden_states=cond).sample
            latents = scheduler.step(eps_neg + SCALE * (eps_pos - eps_neg), t, latents).prev_sample
    return latents


def sample_latents(pipe, seed=0, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=SCALE,
                generator=torch.Generator().manual_seed(seed), output_type="latent", **kwargs).images


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
@pytest.mark.parametrize("merge_weight", [0.0, 1.0])
@pytest.mark.parametrize("with_positive", [True, False])
def test_npo_guided_sampling_equals_two_denoiser_reference(tiny_model_path, loras, scheduler, merge_weight,
                                                           with_positive):
    positive = loras["pos"] if with_positive else None
    pipe = load_pipeline(tiny_model_path, lora=positive, npo=loras["npo"], npo_merge_weight=merge_weight,
                         scheduler=scheduler)
    ours = sample_latents(pipe)
    reference = hand_written_npo_sampling(tiny_model_path, positive, loras["npo"], merge_weight, scheduler)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    branches = {branch for _, branch, _ in pipe.adapter_router.trace}
    assert branches == {"negative", "conditional"}  # really two branches per step


def test_npo_changes_the_result(tiny_model_path, loras):
    plain = sample_latents(load_pipeline(tiny_model_path, lora=loras["pos"]))
    guided = sample_latents(load_pipeline(tiny_model_path, lora=loras["pos"], npo=loras["npo"]))
    assert not torch.allclose(plain, guided, atol=1e-4)


def test_num_images_per_prompt_and_batching_work(tiny_model_path, loras):
    pipe = load_pipeline(tiny_model_path, lora=loras["pos"], npo=loras["npo"])
    two = sample_latents(pipe, num_images_per_prompt=2)
    assert two.shape == (2, 4, 8, 8)


def test_segment_switching_follows_intervals_per_step(tiny_model_path, loras):
    segments = [(loras["a"], (500, 1000)), (loras["b"], (0, 300))]
    pipe = load_pipeline(tiny_model_path, segments=segments, scheduler="ddim")
    sample_latents(pipe)
    trace = list(pipe.adapter_router.trace)
    assert len(trace) == STEPS
    seen = set()
    for t, branch, adapters in trace:
        expected = {"segment_0": 1.0} if 500 <= t < 1000 else {"segment_1": 1.0} if t < 300 else {}
        assert adapters == expected, (t, adapters)
        assert branch == "both"  # no NPO: both CFG halves share the adapters, one call
        seen.add(tuple(adapters))
    assert seen == {("segment_0",), (), ("segment_1",)}  # every case happened


def test_one_segment_over_all_timesteps_equals_plain_lora_sampling(tiny_model_path, loras):
    segment = load_pipeline(tiny_model_path, segments=[(loras["a"], (0, 1000))])
    stock = stock_pipeline(tiny_model_path, {loras["a"]: 1.0})
    torch.testing.assert_close(sample_latents(segment), sample_latents(stock), atol=1e-6, rtol=1e-6)


def test_segments_with_npo_scale_the_segment_in_the_negative_branch(tiny_model_path, loras):
    pipe = load_pipeline(tiny_model_path, npo=loras["npo"], npo_merge_weight=0.25, segments=[(loras["a"], (0, 500))],
                         scheduler="ddim")
    sample_latents(pipe)
    for t, branch, adapters in pipe.adapter_router.trace:
        if branch == "negative":
            assert adapters == ({"segment_0": 0.75, "npo": 1.0} if t < 500 else {"npo": 1.0})
        else:
            assert adapters == ({"segment_0": 1.0} if t < 500 else {})


def test_adapter_scale_zero_is_the_base_model(tiny_model_path, loras):
    zero = sample_latents(load_pipeline(tiny_model_path, lora=loras["pos"], lora_scale=0.0))
    base = sample_latents(stock_pipeline(tiny_model_path))
    full = sample_latents(load_pipeline(tiny_model_path, lora=loras["pos"]))
    torch.testing.assert_close(zero, base, atol=1e-4, rtol=1e-4)  # float noise from the LoRA layers' extra ops
    assert (full - base).abs().max() > 100 * (zero - base).abs().max()
    half = load_pipeline(tiny_model_path, lora=loras["pos"], lora_scale=0.5)
    torch.testing.assert_close(sample_latents(half), sample_latents(stock_pipeline(tiny_model_path, {loras["pos"]: 0.5})),
                               atol=1e-6, rtol=1e-6)


def test_config_mistakes_are_clear_errors(tmp_path, tiny_model_path, loras):
    with pytest.raises(ValueError, match="overlap"):
        parse_segments([(loras["a"], (0, 600)), (loras["b"], (500, 1000))])
    with pytest.raises(ValueError, match="empty"):
        parse_segments([(loras["a"], (400, 400))])
    with pytest.raises(FileNotFoundError, match="no LoRA at"):
        load_pipeline(tiny_model_path, lora=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="npo_merge_weight"):
        load_pipeline(tiny_model_path, npo=loras["npo"], npo_merge_weight=1.5)
    # a LoRA whose shapes belong to another base
    state = load_file(f"{loras['a']}/pytorch_lora_weights.safetensors")
    key = next(k for k in state if k.endswith("lora.down.weight"))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 3)
    (tmp_path / "wrong").mkdir()
    save_file(state, str(tmp_path / "wrong" / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ValueError, match="trained for a different base"):
        load_pipeline(tiny_model_path, lora=str(tmp_path / "wrong"))
    state = {k.replace("down_blocks", "side_blocks"): v for k, v in load_file(f"{loras['a']}/pytorch_lora_weights.safetensors").items()}
    save_file(state, str(tmp_path / "wrong" / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ValueError, match="does not have"):
        load_pipeline(tiny_model_path, lora=str(tmp_path / "wrong"))


def test_segments_yaml_round_trip(tmp_path, loras):
    from diffalign.guidance import Segment, write_segments

    path = write_segments(tmp_path / "segments.yaml", [Segment(loras["a"], (500, 1000)), Segment(loras["b"], (0, 500), 0.5)])
    segments = parse_segments(path)
    assert [s.interval for s in segments] == [(500, 1000), (0, 500)] and segments[1].scale == 0.5
    assert Path(segments[0].lora).resolve() == Path(loras["a"]).resolve()
