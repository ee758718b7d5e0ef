"""`diffalign score` end to end on images written by `diffalign sample`, ensembles, and bad input."""

import csv
import json
import shutil
from pathlib import Path

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


def score_folder(folder, prompts: list[str], tiny_rewards, *extra, reward="clip"):
    """Run diffalign score on ``folder`` (a folder or glob; prompts matched to the sorted files), writing beside
    it; (exit code, rows by file name relative to the folder)."""
    base = Path(str(folder).split("*")[0])  # the folder, or a glob's part before its first wildcard
    (base.parent / "prompts.txt").write_text("".join(prompt + "\n" for prompt in prompts))
    out = base.parent / "scores.jsonl"
    out.unlink(missing_ok=True)
    weights = [f"--weights={name}={tiny_rewards[name]}" for name in reward.split(",")]
    code = main(["score", "--images", str(folder), "--prompts", str(base.parent / "prompts.txt"), "--reward", reward,
                 *weights, "--out", str(out), *extra])
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return code, {Path(row["file"]).relative_to(base).as_posix(): row for row in rows}


def test_score_rates_oriented_images_upright(tmp_path, tiny_rewards):
    from diffusers.utils import load_image as diffusers_load_image
    from test_images import oriented

    from diffalign.rewards import build_reward

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a_oriented.jpg").write_bytes(oriented(6))  # stored 64x32, EXIF orientation 6: upright 32x64
    diffusers_load_image(str(folder / "a_oriented.jpg")).save(folder / "b_upright.png")  # the same pixels, upright
    code, rows = score_folder(folder, ["a red corner"] * 2, tiny_rewards)
    assert code == 0 and [row["error"] for row in rows.values()] == [None, None]
    assert rows["a_oriented.jpg"]["clip"] == pytest.approx(rows["b_upright.png"]["clip"], abs=1e-5)
    sideways = Image.open(folder / "a_oriented.jpg").convert("RGB")  # what was scored before: 64x32
    score = build_reward("clip", weights=str(tiny_rewards["clip"])).score([sideways], ["a red corner"]).item()
    assert abs(score - rows["b_upright.png"]["clip"]) > 1e-4  # so the equality above says something


def test_score_pixel_limit_gives_error_rows_that_name_the_flag(tmp_path, tiny_rewards):
    from test_images import bomb_png

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a_bomb.png").write_bytes(bomb_png())  # 9500x9500, 1-bit: 11 KB
    Image.new("RGB", (40, 40), (200, 30, 30)).save(folder / "b_mid.png")
    Image.new("RGB", (20, 20), (30, 30, 200)).save(folder / "c_small.png")
    code, rows = score_folder(folder, ["a", "b", "c"], tiny_rewards, "--max-image-pixels", "1000")
    assert code == 0 and rows["c_small.png"]["error"] is None
    assert rows["b_mid.png"]["error"] == (
        "image too large: 40x40 = 1600 pixels is over the 1000-pixel limit (Pillow's decompression-bomb guard); "
        "raise it with data.max_image_pixels=N (diffalign score: --max-image-pixels N)")
    code, rows = score_folder(folder, ["a", "b", "c"], tiny_rewards)  # the default: Pillow's limit
    assert code == 0 and [rows[name]["error"] is None for name in sorted(rows)] == [False, True, True]
    assert "9500x9500 = 90250000 pixels is over the 89478485-pixel limit" in rows["a_bomb.png"]["error"]


def test_symlinks_out_of_the_folder_are_error_rows_unless_followed(tmp_path, tiny_rewards, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(outside / "secret.png")
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32), (30, 30, 200)).save(folder / "a.png")
    (folder / "b_inside.png").symlink_to("a.png")  # stays inside: fine
    (folder / "c_outside.png").symlink_to(outside / "secret.png")
    (folder / "sub").symlink_to(outside, target_is_directory=True)  # a recursive glob walks into it
    secret = (outside / "secret.png").resolve()
    cases = [(folder, "", ["a.png", "b_inside.png", "c_outside.png"]),
             (folder / "*.png", "", ["a.png", "b_inside.png", "c_outside.png"]),
             (folder / "**" / "*.png", "sub/secret.png", ["a.png", "b_inside.png", "c_outside.png", "sub/secret.png"])]
    for images, extra_outside, names in cases:
        code, rows = score_folder(images, ["p"] * len(names), tiny_rewards)
        assert code == 0 and sorted(rows) == names
        errors = {name: row["error"] for name, row in rows.items() if row["error"]}
        assert set(errors) == {"c_outside.png", *([extra_outside] if extra_outside else [])}
        assert errors["c_outside.png"] == f"symlink to {secret} outside {folder}; pass --follow-symlinks to score it"
        assert f"{len(errors)} of {len(names)} rows not scored" in capsys.readouterr().out
        code, rows = score_folder(images, ["p"] * len(names), tiny_rewards, "--follow-symlinks")
        assert code == 0 and all(row["error"] is None for row in rows.values())
        assert rows["c_outside.png"]["clip"] != rows["a.png"]["clip"] == rows["b_inside.png"]["clip"]


def test_ensemble_z_is_written_only_when_a_prompt_has_two_scored_images(tmp_path, tiny_rewards, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 20)]):
        Image.new("RGB", (32, 32), colour).save(folder / f"{index}.png")
    code, rows = score_folder(folder, ["one", "two", "three", "four"], tiny_rewards, reward="clip,aesthetic")
    assert code == 0 and all("ensemble_z" not in row for row in rows.values())
    assert ("ensemble_z left out: it z-scores rewards within each prompt, and no prompt has two or more scored "
            "images") in capsys.readouterr().out
    code, rows = score_folder(folder, ["same", "same", "same", "other"], tiny_rewards, reward="clip,aesthetic")
    assert code == 0 and "left out" not in capsys.readouterr().out
    z = [rows[f"{index}.png"]["ensemble_z"] for index in range(4)]
    assert z[3] is None and abs(sum(z[:3])) < 1e-5 and max(abs(value) for value in z[:3]) > 0.1


def colour_folder(tmp_path, count: int = 3):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(count):
        Image.new("RGB", (40, 40), (200, 30 * index, 30)).save(folder / f"{index}.png")
    return folder


@pytest.mark.parametrize("value, message", [
    ("clip=2,hpsv21=1", "--ensemble-weights 'hpsv21=1': 'hpsv21' is not one of the rewards; use NAME=W with NAME one "
                        "of ['clip', 'aesthetic'], e.g. clip=2"),
    ("2", "--ensemble-weights '2': no reward name; use NAME=W with NAME one of ['clip', 'aesthetic'], e.g. clip=2"),
    ("clip=abc", "--ensemble-weights 'clip=abc': the weight 'abc' is not a finite number >= 0; use NAME=W with W such "
                 "as 2 or 0.5, e.g. clip=2"),
    ("clip=1,aesthetic=-1", "--ensemble-weights 'aesthetic=-1': the weight '-1' is not a finite number >= 0"),
    ("clip=inf", "--ensemble-weights 'clip=inf': the weight 'inf' is not a finite number >= 0"),
    ("aesthetic=nan", "--ensemble-weights 'aesthetic=nan': the weight 'nan' is not a finite number >= 0"),
    ("clip=0,aesthetic=0", "--ensemble-weights 'clip=0,aesthetic=0': the weights sum to 0; give at least one of "
                           "['clip', 'aesthetic'] a weight above 0"),
])
def test_bad_ensemble_weights_are_a_one_line_error_naming_the_flag(tmp_path, tiny_rewards, capsys, value, message):
    folder = colour_folder(tmp_path)
    capsys.readouterr()
    code, rows = score_folder(folder, ["p", "p", "q"], tiny_rewards, "--ensemble-weights", value,
                              reward="clip,aesthetic")
    err = capsys.readouterr().err
    assert code == 2 and rows == {} and err.count("\n") == 1
    assert err.startswith(f"diffalign score: error: {message}")


def test_good_ensemble_weights_weigh_the_z_scores(tmp_path, tiny_rewards):
    folder = colour_folder(tmp_path)
    code, rows = score_folder(folder, ["p", "p", "p"], tiny_rewards, "--ensemble-weights", "clip=1, aesthetic=0,",
                              reward="clip,aesthetic")
    assert code == 0
    clip = torch.tensor([rows[f"{index}.png"]["clip"] for index in range(3)])
    z = torch.tensor([rows[f"{index}.png"]["ensemble_z"] for index in range(3)])
    torch.testing.assert_close(z, per_prompt_zscores(clip, ["p"] * 3))  # aesthetic weighs 0: clip's z-scores


@pytest.mark.parametrize("value, limit", [("1e3", 1000), ("1_000", 1000), ("1.6e3", 1600), ("1e9", 10**9),
                                          ("none", None)])
def test_max_image_pixels_takes_integers_written_as_in_configs(tmp_path, tiny_rewards, value, limit):
    folder = colour_folder(tmp_path, count=1)  # 40x40 = 1600 pixels
    code, rows = score_folder(folder, ["p"], tiny_rewards, "--max-image-pixels", value)
    error = rows["0.png"]["error"]
    if limit is not None and limit < 1600:
        assert code == 1 and f"over the {limit}-pixel limit" in error
    else:
        assert code == 0 and error is None


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "2.5e-1", "abc", "inf", "nan", "2__000"])
def test_max_image_pixels_refuses_what_is_not_a_pixel_count(tmp_path, tiny_rewards, capsys, value):
    folder = colour_folder(tmp_path, count=1)
    with pytest.raises(SystemExit) as exited:
        score_folder(folder, ["p"], tiny_rewards, "--max-image-pixels", value)
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"diffalign score: error: argument --max-image-pixels: '{value}' is not a pixel count: give a whole number "
        "of at least 1 (e.g. 100000000, 1e9 or 2_000_000), or none for no limit")
