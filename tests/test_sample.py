"""`diffalign sample`: prompts in, PNGs + samples.jsonl + grid out, reproducible per (prompt, image) seed."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.evaluation.prompts import read_prompts


def test_read_prompts_from_string_file_jsonl_and_set(tmp_path):
    assert read_prompts(prompt="a cat") == ["a cat"]
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert read_prompts(prompts_file=str(tmp_path / "p.txt")) == ["one", "two"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "x", "file_name": "a.png"}\n{"prompt": "y"}\n')
    assert read_prompts(prompts_file=str(tmp_path / "p.jsonl")) == ["x", "y"]
    assert read_prompts(prompt_set="shapes")[0] == "a square on a grey background"
    with pytest.raises(ValueError, match="shipped sets: animals, everyday, shapes"):
        read_prompts(prompt_set="nope")
    with pytest.raises(ValueError, match="exactly one"):
        read_prompts(prompt="a", prompt_set="shapes")


def test_sample_command_writes_images_log_and_grid(tmp_path, tiny_model_path):
    from diffalign.guidance import load_pipeline
    from diffalign.offline.lora import build_tiny_lora

    lora, npo = build_tiny_lora(tmp_path / "pos", seed=1), build_tiny_lora(tmp_path / "npo", seed=2)
    out = tmp_path / "out"
    code = main(["sample", "--model", tiny_model_path, "--prompt-set", "shapes", "--lora", str(lora), "--npo", str(npo),
                 "--num-images", "2", "--steps", "3", "--guidance", "4", "--seed", "10", "--scheduler", "ddim",
                 "--negative-prompt", "blue", "--out", str(out), "--batch-size", "4"])
    assert code == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all((out / r["file_name"]).is_file() for r in records)
    assert [r["seed"] for r in records] == list(range(10, 16))
    assert records[3]["prompt"] == "a circle on a grey background" and records[3]["npo"] == str(npo)
    assert records[0]["steps"] == 3 and records[0]["negative_prompt"] == "blue"
    assert Image.open(out / "overview" / "grid.png").size[0] >= 256
    # image 1 of prompt 1 (seed 13) is reproduced by a single call with that seed: batching does not matter
    pipe = load_pipeline(tiny_model_path, lora=str(lora), npo=str(npo), scheduler="ddim")
    pipe.set_progress_bar_config(disable=True)
    single = pipe(records[3]["prompt"], negative_prompt="blue", num_inference_steps=3, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(13)).images[0]
    saved = np.asarray(Image.open(out / records[3]["file_name"]), dtype=np.int16)
    assert np.abs(saved - np.asarray(single, dtype=np.int16)).max() <= 1


def test_sample_errors_are_one_line(tmp_path, tiny_model_path, capsys):
    assert main(["sample", "--model", tiny_model_path, "--prompt", "x", "--lora", str(tmp_path / "none")]) == 2
    assert "no LoRA at" in capsys.readouterr().err


def test_sample_command_reads_a_segments_file(tmp_path, tiny_model_path):
    from diffalign.guidance import Segment, write_segments
    from diffalign.offline.lora import build_tiny_lora

    early, late = build_tiny_lora(tmp_path / "early", seed=3), build_tiny_lora(tmp_path / "late", seed=4)
    segments = write_segments(tmp_path / "segments.yaml", [Segment(str(early), (500, 1000)), Segment(str(late), (0, 500))])
    out = tmp_path / "out"
    assert main(["sample", "--model", tiny_model_path, "--prompt", "a square", "--segments", str(segments),
                 "--steps", "2", "--guidance", "3", "--out", str(out)]) == 0
    record = json.loads((out / "samples.jsonl").read_text())
    assert record["segments"] == str(segments) and (out / record["file_name"]).is_file()
    assert main(["sample", "--model", tiny_model_path, "--prompt", "a square", "--steps", "2", "--guidance", "3",
                 "--out", str(tmp_path / "base")]) == 0
    with_segments = np.asarray(Image.open(out / record["file_name"]), dtype=np.int16)
    base = np.asarray(Image.open(tmp_path / "base" / record["file_name"]), dtype=np.int16)
    assert np.abs(with_segments - base).max() > 0  # the segment LoRAs were active
