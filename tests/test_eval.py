"""`diffalign eval`: setups parsed by hand, a tiny end-to-end run whose report agrees with its per-image scores,
an identical setup that ties every image, and the command line."""

import json

import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.evaluation.report import parse_setup, parse_setups, run_eval, with_base
from diffalign.evaluation.winrate import compare
from diffalign.guidance.sample import SampleSettings

PROMPTS = ["a square on a grey background", "a circle on a grey background"]
SETTINGS = SampleSettings(num_images=2, seed=3, steps=2, guidance_scale=3.0, batch_size=3)


def test_parse_setup_by_hand():
    assert parse_setup("dpo:lora=runs/dpo") == ("dpo", {"lora": "runs/dpo"})
    assert parse_setup("guided:lora=runs/dpo, npo=runs/npo,npo_merge_weight=0.5,lora_scale=2") == (
        "guided", {"lora": "runs/dpo", "npo": "runs/npo", "npo_merge_weight": 0.5, "lora_scale": 2.0})
    assert parse_setup("plain") == ("plain", {}) and parse_setup("plain:") == ("plain", {})
    assert parse_setup("fast:scheduler=dpm,segments=seg.yaml") == ("fast", {"scheduler": "dpm", "segments": "seg.yaml"})
    with pytest.raises(ValueError, match="unknown key 'lr'; valid keys: lora, npo, npo_merge_weight, segments, "
                                         "lora_scale, npo_scale, scheduler"):
        parse_setup("dpo:lr=3")
    with pytest.raises(ValueError, match="lora_scale='high' is not a float"):
        parse_setup("dpo:lora_scale=high")
    with pytest.raises(ValueError, match="unknown scheduler 'fast'"):
        parse_setup("dpo:scheduler=fast")
    with pytest.raises(ValueError, match="'lora' is not key=value"):
        parse_setup("dpo:lora")
    with pytest.raises(ValueError, match="names a folder"):
        parse_setup("my run:lora=x")


def test_repeated_setups_and_a_default_scheduler():
    assert parse_setups(["a:lora=x", "b:scheduler=ddim"]) == {"a": {"lora": "x"}, "b": {"scheduler": "ddim"}}
    assert parse_setups(["a:lora=x", "b:scheduler=ddim"], scheduler="dpm") == {
        "base": {"scheduler": "dpm"}, "a": {"scheduler": "dpm", "lora": "x"}, "b": {"scheduler": "ddim"}}
    with pytest.raises(ValueError, match="setup 'a' is given twice"):
        parse_setups(["a:lora=x", "a:lora=y"])


def test_base_comes_first_and_is_added_when_missing():
    assert list(with_base({"dpo": {"lora": "x"}})) == ["base", "dpo"]
    assert with_base({"dpo": {}, "base": {"scheduler": "ddim"}}) == {"base": {"scheduler": "ddim"}, "dpo": {}}
    with pytest.raises(ValueError, match="unknown key 'rank'"):
        with_base({"dpo": {"rank": 4}})


@pytest.fixture(scope="module")
def rewards():
    from diffalign.rewards import build_reward
    from diffalign.rewards.tiny import tiny_reward_path

    return {name: build_reward(name, weights=str(tiny_reward_path(name))) for name in ("clip", "aesthetic")}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_path, rewards):
    from diffalign.offline.lora import build_tiny_lora

    root = tmp_path_factory.mktemp("eval")
    lora = build_tiny_lora(root / "lora", seed=5, std=0.2)
    setups = {"lora": {"lora": str(lora)}, "same": {}}
    return run_eval(tiny_model_path, setups, PROMPTS, rewards, SETTINGS, root / "out", resamples=500)


def score_rows(report):
    return [json.loads(line) for line in report.paths["scores"].read_text().splitlines()]


def test_report_numbers_are_those_of_the_per_image_scores(evaluated):
    rows = score_rows(evaluated)
    assert len(rows) == 3 * len(PROMPTS) * SETTINGS.num_images
    assert [r["setup"] for r in rows[::4]] == ["base", "lora", "same"]
    assert [r["seed"] for r in rows[:4]] == [3, 4, 5, 6] and rows[2]["prompt"] == PROMPTS[1]
    assert all((evaluated.out_dir / r["file"]).is_file() for r in rows)
    report = json.loads(evaluated.paths["report"].read_text())
    assert report["prompts"] == 2 and list(report["setups"]) == ["base", "lora", "same"]
    assert report["setups"]["same"] == {} and report["settings"]["seed"] == 3
    for reward in ("clip", "aesthetic"):
        by_setup = {name: {(r["prompt_index"], r["image_index"]): r[reward] for r in rows if r["setup"] == name}
                    for name in ("base", "lora", "same")}
        keys = sorted(by_setup["base"])
        base = [by_setup["base"][key] for key in keys]
        for name in ("base", "lora", "same"):
            values = [by_setup[name][key] for key in keys]
            stats = report["rewards"][reward][name]
            assert stats["mean"] == pytest.approx(sum(values) / len(values)) and stats["n"] == len(values)
            if name == "base":
                assert stats["win_rate"] is None
                continue
            wins = sum(a > b for a, b in zip(values, base))
            ties = sum(a == b for a, b in zip(values, base))
            win = stats["win_rate"]
            assert (win["wins"], win["ties"], win["n"]) == (wins, ties, len(values))
            assert win["rate"] == pytest.approx((wins + 0.5 * ties) / len(values))
            again = compare(torch.tensor(values, dtype=torch.float64), torch.tensor(base, dtype=torch.float64),
                            resamples=500)
            assert (win["low"], win["high"]) == pytest.approx((again.low, again.high))


def test_identical_setup_ties_everything_and_the_lora_changes_images(evaluated):
    for reward in ("clip", "aesthetic"):
        same = evaluated.table[reward]["same"]["win_rate"]
        assert (same["rate"], same["low"], same["high"], same["ties"], same["wins"]) == (0.5, 0.5, 0.5, 4, 0)
    rows = score_rows(evaluated)
    base = [r["clip"] for r in rows if r["setup"] == "base"]
    assert [r["clip"] for r in rows if r["setup"] == "lora"] != base  # the LoRA was active


def test_report_files(evaluated):
    text = evaluated.paths["markdown"].read_text()
    assert "### clip" in text and "### aesthetic" in text
    for name in ("base", "lora", "same"):
        assert f"| {name} |" in text
    assert "| 0.500 | [0.500, 0.500] | 0/4/4 |" in text
    rows = min(8, len(PROMPTS) * SETTINGS.num_images)
    assert Image.open(evaluated.paths["grid"]).size == (3 * 128, 14 + rows * (14 + 128 + 14))
    chart = Image.open(evaluated.paths["winrate"])
    assert chart.width == 700 and chart.height >= 150  # grows with the number of setups and rewards
    samples = [json.loads(line) for line in (evaluated.out_dir / "samples" / "lora" / "samples.jsonl").read_text()
               .splitlines()]
    assert samples[0]["setup"] == "lora" and samples[0]["lora"].endswith("lora")


def test_eval_command(tmp_path, tiny_model_path, capsys):
    from diffalign.offline.lora import build_tiny_lora
    from diffalign.rewards.tiny import tiny_reward_path

    lora = build_tiny_lora(tmp_path / "lora", seed=6)
    out = tmp_path / "out"
    args = ["eval", "--model", tiny_model_path, "--prompts", "shapes", "--limit", "2", "--reward", "clip",
            "--weights", str(tiny_reward_path("clip")), "--steps", "2", "--guidance", "3", "--resamples", "200",
            "--scheduler", "euler", "--out", str(out)]
    assert main([*args, "--setup", f"dpo:lora={lora},lora_scale=2"]) == 0
    printed = capsys.readouterr().out
    assert "| dpo |" in printed and f"{out / 'report.json'}" in printed and f"{out / 'winrate.png'}" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["setups"] == {"base": {"scheduler": "euler"},
                                "dpo": {"lora": str(lora), "lora_scale": 2.0, "scheduler": "euler"}}
    assert report["prompts"] == 2 and report["rewards"]["clip"]["dpo"]["n"] == 2
    assert main([*args, "--setup", "dpo:rank=4"]) == 2
    assert "valid keys: lora, npo" in capsys.readouterr().err


def test_eval_help_has_examples():
    from diffalign.cli import MAIN_EXAMPLES, build_parser

    parser = build_parser()
    text = parser._subparsers._group_actions[0].choices["eval"].format_help()
    assert "examples:" in text and "--setup dpo:lora=runs/tiny_dpo" in text and "parti:<Category>" in text
    assert "diffalign eval" in MAIN_EXAMPLES and "diffalign pairs" in MAIN_EXAMPLES
