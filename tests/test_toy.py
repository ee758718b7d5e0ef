"""The toy world: its reward, data, base-model builder and the alignment loop's plumbing.

The full loop (pre-trained base -> pairs -> DPO -> eval) is the slow-marked test at the bottom; CI runs it.
"""

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from PIL import Image

from diffalign.offline.data import draw_shape
from diffalign.offline.specs import resolve_model_spec
from diffalign.offline.toy_base import ToyBaseSettings, build_toy_base, toy_images, toy_prompts
from diffalign.offline.toy_loop import (
    OBJECTIVES,
    ToyRow,
    ToySettings,
    eval_setups,
    format_table,
    head_to_head,
    run_toy_alignment,
    toy_config,
)
from diffalign.rewards import available_rewards, build_reward
from diffalign.rewards.toy import redness


def test_toy_reward_is_registered_and_prefers_red():
    assert "toy_redness" in available_rewards()
    reward = build_reward("toy_redness")
    rng = random.Random(0)
    red, blue = draw_shape("circle", "red", rng), draw_shape("circle", "blue", rng)
    grey = Image.new("RGB", (32, 32), (200, 200, 200))
    scores = reward.score([red, blue, grey], ["a circle", "a circle", "anything"])
    assert scores[0] > 0 > scores[1] and scores[2] == 0
    # (R - B) / 255 averaged by hand
    pixels = np.asarray(red, dtype=np.float64)
    assert scores[0].item() == pytest.approx((pixels[..., 0] - pixels[..., 2]).mean() / 255, abs=1e-6)
    with pytest.raises(ValueError, match="no weights"):
        build_reward("toy_redness", weights="x")


def test_toy_images_are_balanced_deterministic_and_prompts_never_name_the_colour():
    images, prompts, colours = toy_images(600, seed=3)
    again = toy_images(600, seed=3)
    assert colours == again[2] and list(images[5].getdata()) == list(again[0][5].getdata())
    assert 0.4 < colours.count("red") / 600 < 0.6
    assert set(prompts) == set(toy_prompts()) and not any("red" in p or "blue" in p for p in prompts)
    # the colour is visible in the pixels: the toy reward separates the two perfectly
    assert all((redness(image) > 0) == (colour == "red") for image, colour in zip(images, colours))


def test_build_toy_base_saves_a_stock_pipeline_with_a_measured_scaling_factor(tmp_path):
    settings = ToyBaseSettings(num_images=48, vae_steps=2, vae_batch_size=8, unet_steps=3, unet_batch_size=8,
                               balance_samples=4)
    out = build_toy_base(tmp_path / "toy", settings=settings)
    log = json.loads((out / "toy_base.json").read_text())
    assert log["settings"]["unet_steps"] == 3 and 0 <= log["red_share_samples"] <= 1
    pipe = StableDiffusionPipeline.from_pretrained(out)
    # register_to_config: the saved config carries the measured factor, not the SD default
    assert pipe.vae.config.scaling_factor == pytest.approx(log["scaling_factor"]) != pytest.approx(0.18215)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 64
    image = pipe("a square", num_inference_steps=2, guidance_scale=4.0).images[0]
    assert image.size == (32, 32)


def test_loop_plumbing_setups_configs_and_table(tmp_path):
    setups = eval_setups(["dpo", "npo", "self_npo", "dpo_segments", "kto"], tmp_path)
    assert setups["base"] == {} and setups["dpo"] == {"lora": str(tmp_path / "dpo")}
    assert setups["npo-guided"] == {"npo": str(tmp_path / "npo")}  # a negative LoRA goes on the uncond branch
    assert setups["self_npo-guided"] == {"npo": str(tmp_path / "self_npo")}
    assert setups["dpo+npo-guided"] == {"lora": str(tmp_path / "dpo"), "npo": str(tmp_path / "npo")}
    assert setups["dpo_segments"] == {"segments": str(tmp_path / "dpo_segments" / "segments.yaml")}
    # every objective has a toy config, trained on the view of the pairs folder it needs
    views = {name: Path(toy_config(name, tmp_path, tmp_path / "pairs", []).data.source).name for name in OBJECTIVES}
    assert views["smpo"] == "scored" and views["rank_dpo"] == "ranked" and views["kto"] == "kto"
    assert views["dpo"] == views["npo"] == views["sft"] == "pairs"
    cfg = toy_config("dpo", tmp_path, tmp_path / "pairs", ["train.max_steps=7"])
    assert cfg.model.pretrained == "tiny:toy" and cfg.train.max_steps == 7
    # the loop trains on the very base folder that made the pairs, never a tiny:toy of another cache
    assert toy_config("kto", tmp_path, tmp_path / "pairs", [], base="/bases/toy").model.pretrained == "/bases/toy"
    assert toy_config("dpo_segments", tmp_path, tmp_path / "pairs", []).segments
    table = format_table([ToyRow("base", 0.5, 0.5, 0.5, 0.0, 0.4, 0), ToyRow("dpo", 0.8, 0.7, 0.9, 0.02, 0.6, 60)])
    assert "| dpo | 0.800 | [0.700, 0.900] | +0.0200 | 0.60 | 60 |" in table


def test_head_to_head_pairs_two_setups_by_prompt_and_seed(tmp_path):
    rows = []
    # guided beats dpo on 3 of 4 images and ties one; base rows must be ignored
    for setup, values in {"dpo": [0.1, 0.2, 0.3, 0.4], "guided": [0.2, 0.3, 0.3, 0.5], "base": [9, 9, 9, 9]}.items():
        for index, value in enumerate(values):
            rows.append({"setup": setup, "prompt_index": index % 2, "image_index": index // 2, "toy_redness": value})
    (tmp_path / "scores.jsonl").write_text("".join(json.dumps(row) + "\n" for row in reversed(rows)))
    result = head_to_head(tmp_path, "guided", "dpo")
    assert (result.rate, result.wins, result.ties, result.n) == (0.875, 3, 1, 4)
    assert result.mean_aligned == pytest.approx(0.325) and result.mean_base == pytest.approx(0.25)


def cached_toy_base() -> str:
    """The toy base, cached in the user's cache (it is deterministic and versioned): built once, minutes."""
    user_cache = Path.home() / ".cache" / "diffalign"
    previous = os.environ["DIFFALIGN_CACHE"]
    os.environ["DIFFALIGN_CACHE"] = str(user_cache)
    try:
        return resolve_model_spec("tiny:toy")
    finally:
        os.environ["DIFFALIGN_CACHE"] = previous


@pytest.mark.slow
def test_toy_world_online_grpo_moves_the_model_towards_the_reward(tmp_path):
    """Online GRPO on the toy base, shortened to 40 rounds (the benchmark's 80): it samples and scores its own
    images, with no pairs, and must beat the base on held-out seeds."""
    settings = ToySettings(eval_images=150, train_overrides=["train.max_steps=40"])
    rows, timings = run_toy_alignment(tmp_path / "toy", ["grpo"], settings, base=cached_toy_base())
    by_name = {row.setup: row for row in rows}
    grpo, plain = by_name["grpo"], by_name["base"]
    assert "pairs" not in timings  # nothing was generated for it
    assert grpo.low > 0.5, f"GRPO win rate {grpo.win_rate:.3f} [{grpo.low:.3f}, {grpo.high:.3f}] does not exclude 0.5"
    assert grpo.mean_reward > plain.mean_reward
    assert (tmp_path / "toy" / "grpo" / "reward_curve.png").is_file()


@pytest.mark.slow
def test_toy_world_dpo_moves_the_model_towards_the_reward(tmp_path):
    """The product loop on the pre-trained toy base, shortened: fewer pairs and eval images, so a lower bar than
    the benchmark's 0.75."""
    base = cached_toy_base()
    settings = ToySettings(groups=192, eval_images=150)
    rows, timings = run_toy_alignment(tmp_path / "toy", ["dpo"], settings, base=base)
    by_name = {row.setup: row for row in rows}
    dpo, plain = by_name["dpo"], by_name["base"]
    assert dpo.low > 0.5, f"DPO win rate {dpo.win_rate:.3f} [{dpo.low:.3f}, {dpo.high:.3f}] does not exclude 0.5"
    assert dpo.mean_reward > plain.mean_reward
    report = tmp_path / "toy" / "eval"
    for name in ("report.json", "report.md", "grid.png", "winrate.png"):
        assert (report / name).is_file()
