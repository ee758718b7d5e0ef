"""`diffalign score` end to end on images written by `diffalign sample`, ensembles, and bad input."""

import csv
import json
import shutil

import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.rewards.ensemble import consensus_preference, per_prompt_zscores, zscore_ensemble


def test_per_prompt_zscores_and_weighted_ensemble_by_hand():
    scores = torch.tensor([1.0, 3.0, 10.0, 5.0, 7.0])
    prompts = ["a", "a", "b", "c", "c"]
    torch.testing.assert_close(per_prompt_zscores(scores, prompts), torch.tensor([-1.0, 1.0, 0.0, -1.0, 1.0]))
    other = torch.tensor([0.2, 0.1, 0.0, 0.3, 0.9])  # disagrees on prompt a, agrees on c
    combined = zscore_ensemble({"x": scores, "y": other}, prompts, {"x": 3.0, "y": 1.0})
    torch.testing.assert_close(combined, torch.tensor([(-3 + 1) / 4, (3 - 1) / 4, 0.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="not scored"):
        zscore_ensemble({"x": scores}, prompts, {"z": 1.0})


def test_consensus_is_a_majority_vote_with_abstentions():
    a = {"r1": torch.tensor([1.0, 1.0, 0.0, 2.0]), "r2": torch.tensor([1.0, 0.0, 0.0, 2.0]), "r3": torch.tensor([0.0, 0.0, 1.0, 2.0])}
    b = {"r1": torch.tensor([0.0, 0.0, 1.0, 2.0]), "r2": torch.tensor([0.0, 1.0, 1.0, 2.0]), "r3": torch.tensor([1.0, 1.0, 0.0, 2.0])}
    torch.testing.assert_close(consensus_preference(a, b), torch.tensor([1.0, 0.0, 0.0, 0.5]))


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, tiny_model_path):
    out = tmp_path_factory.mktemp("sampled")
    assert main(["sample", "--model", tiny_model_path, "--prompt-set", "shapes", "--num-images", "2", "--steps", "2",
                 "--guidance", "3", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tiny_rewards(tmp_path_factory):
    from diffalign.rewards.tiny import build_tiny_reward

    root = tmp_path_factory.mktemp("rewards")
    return {name: build_tiny_reward(root / name, name) for name in ("clip", "aesthetic")}


def test_score_end_to_end_with_bad_rows(tmp_path, sampled, tiny_rewards):
    from diffalign.rewards import build_reward

    images = tmp_path / "images"
    shutil.copytree(sampled, images)
    (images / "9999_00.png").write_bytes(b"not a png at all")  # corrupt, and listed with a prompt
    with open(images / "samples.jsonl", "a") as log:
        log.write(json.dumps({"file_name": "9999_00.png", "prompt": "a square"}) + "\n")
    Image.new("RGBA", (40, 20), (255, 0, 0, 128)).save(images / "9998_00.png")  # readable, but no prompt
    out_csv, out_jsonl = tmp_path / "scores.csv", tmp_path / "scores.jsonl"
    args = ["score", "--images", str(images), "--reward", "clip,aesthetic", "--batch-size", "4",
            "--weights", f"clip={tiny_rewards['clip']}", "--weights", f"aesthetic={tiny_rewards['aesthetic']}"]
    assert main([*args, "--out", str(out_csv)]) == 0
    assert main([*args, "--out", str(out_jsonl)]) == 0
    rows = list(csv.DictReader(open(out_csv)))
    assert len(rows) == 8
    errors = {row["file"].rsplit("/", 1)[1]: row["error"] for row in rows if row["error"]}
    assert set(errors) == {"9999_00.png", "9998_00.png"}
    assert "unreadable" in errors["9999_00.png"] and "no prompt" in errors["9998_00.png"]
    records = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
    good = [r for r in records if r["error"] is None]
    assert len(good) == 6 and all(isinstance(r["ensemble_z"], float) for r in good)
    # the written scores are the reward's own scores of those images (batching and order preserved)
    clip = build_reward("clip", weights=str(tiny_rewards["clip"]))
    direct = clip.score([Image.open(r["file"]).convert("RGB") for r in good], [r["prompt"] for r in good])
    torch.testing.assert_close(torch.tensor([r["clip"] for r in good]), direct, atol=1e-4, rtol=1e-4)


def test_score_exit_code_is_nonzero_only_when_nothing_scored(tmp_path, tiny_rewards, capsys):
    (tmp_path / "a.png").write_bytes(b"broken")
    (tmp_path / "prompts.txt").write_text("a square\n")
    code = main(["score", "--images", str(tmp_path), "--prompts", str(tmp_path / "prompts.txt"), "--reward", "clip",
                 "--weights", str(tiny_rewards["clip"]), "--out", str(tmp_path / "s.csv")])
    assert code == 1 and "nothing could be scored" in capsys.readouterr().err
    (tmp_path / "prompts.txt").write_text("one\ntwo\n")
    assert main(["score", "--images", str(tmp_path), "--prompts", str(tmp_path / "prompts.txt"), "--reward", "clip",
                 "--weights", str(tiny_rewards["clip"])]) == 2  # 2 prompts for 1 image: a clear error
    assert "must agree" in capsys.readouterr().err


def test_tiny_reward_command_and_large_and_16bit_images(tmp_path, capsys):
    import numpy as np

    from diffalign.rewards import build_reward

    assert main(["tiny", "reward", str(tmp_path / "hps"), "--reward", "hpsv21"]) == 0
    assert "--weights" in capsys.readouterr().out
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (6000, 3000), (200, 30, 30)).save(images / "a_large.png")
    Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).save(images / "b_16bit.png")
    Image.new("L", (50, 80), 128).save(images / "c_gray.png")
    (images / "prompts.txt").write_text("red\ngradient\ngrey\n")
    out = tmp_path / "s.jsonl"
    assert main(["score", "--images", str(images), "--prompts", str(images / "prompts.txt"), "--reward", "hpsv21",
                 "--weights", str(tmp_path / "hps"), "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["error"] for r in records] == [None, None, None]
    reward = build_reward("hpsv21", weights=str(tmp_path / "hps"))
    small = reward.score([Image.new("RGB", (2048, 1024), (200, 30, 30))], ["red"])
    assert abs(records[0]["hpsv21"] - small.item()) < 1e-3  # large images are shrunk first, same score


def test_unloadable_reward_is_a_one_line_error(tmp_path, sampled, capsys):
    code = main(["score", "--images", str(sampled), "--reward", "hpsv21", "--weights", str(tmp_path / "missing.pt")])
    assert code == 2
    err = capsys.readouterr().err
    assert "could not load reward 'hpsv21'" in err and "--weights hpsv21=PATH" in err
