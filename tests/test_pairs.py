"""`diffalign pairs`: selection and KTO labelling by hand, every view read back by the training data pipeline,
resume after a kill, config checks, and the command line."""

import json
import shutil

import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.config import DataConfig
from diffalign.data import adapt_records, read_preferences
from diffalign.evaluation.pair_selection import PairSettings, build_views, kto_labels, select_pairs
from diffalign.evaluation.pairs import generate_pairs, read_groups
from diffalign.objectives import get_objective
from diffalign.rewards.ensemble import zscore_ensemble

PROMPTS = ["a square on a grey background", "a circle on a grey background", "a triangle on a grey background",
           "a square on a grey background"]  # a repeated prompt is its own group
K = 4
SETTINGS = PairSettings(images_per_prompt=K, seed=7, steps=2, guidance_scale=3.0, batch_size=5)  # batches span groups


# ---------------------------------------------------------------------------------------------- pure functions
def test_select_pairs_best_worst_all_margin_and_ties():
    scores = [0.2, 0.9, -0.1, 0.5]
    assert select_pairs(scores) == [(1, 2)]
    assert select_pairs(scores, margin=0.95) == [(1, 2)]
    assert select_pairs(scores, margin=1.05) == []
    assert select_pairs([0.5, 1.0, 0.0], margin=1.0) == []  # a gap equal to the margin is not above it
    assert select_pairs([0.3, 0.3, 0.3]) == []  # all tied: no preference
    assert select_pairs([0.5, 0.1, 0.5, 0.1]) == [(0, 1)]  # the first best and the first worst
    assert select_pairs(scores, "all") == [(1, 0), (0, 2), (3, 0), (1, 2), (1, 3), (3, 2)]
    assert select_pairs(scores, "all", margin=0.35) == [(1, 0), (1, 2), (1, 3), (3, 2)]  # gaps 0.7, 1.0, 0.4, 0.6
    assert select_pairs([1.0, 1.0, 0.0], "all") == [(0, 2), (1, 2)]  # the tied pair is dropped
    with pytest.raises(ValueError, match="best_worst or all"):
        select_pairs(scores, "some")


def test_kto_labels_fraction_ties_and_margin():
    scores = [0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.0]  # k = 8
    assert kto_labels(scores, 0.25) == [(0, 0), (1, 1), (6, 1), (7, 0)]  # 2 on each side, middle dropped
    assert kto_labels(scores, 0.1) == [(1, 1), (7, 0)]  # at least one each
    assert kto_labels([0.3, 0.1, 0.2], 0.5) == [(0, 1), (1, 0)]  # at most k // 2 per side
    assert kto_labels([2.0, 2.0, 1.0, 0.0], 0.25) == [(0, 1), (1, 1), (3, 0)]  # ties share the top label
    assert kto_labels([1.0, 1.0, 1.0, 0.0], 0.5) == [(0, 1), (1, 1), (2, 1), (3, 0)]  # a tie spanning both cuts
    assert kto_labels([2.0, 1.0, 1.0, 0.0], 0.5) == [(0, 1), (3, 0)]  # equal scores never get opposite labels
    assert kto_labels([0.5, 0.5, 0.5, 0.5]) == []
    assert kto_labels([0.0, 0.2, 0.1], margin=0.2) == []  # the whole group within the margin
    assert kto_labels([0.0, 0.3, 0.1], margin=0.2) == [(0, 0), (1, 1)]


def test_group_log_tolerates_only_a_truncated_last_line(tmp_path):
    line = json.dumps({"prompt_index": 0, "prompt": "a", "seeds": [0, 1], "file_names": ["x", "y"],
                       "scores": {"clip": [1.0, 2.0]}, "combined": [1.0, 2.0]})
    log = tmp_path / "groups.jsonl"
    log.write_text(line + "\n" + line[:30])
    assert [g.prompt for g in read_groups(log)] == ["a"]
    log.write_text(line + "\n" + line[:30] + "\n" + line + "\n")
    with pytest.raises(ValueError, match="line 2 is not a group record"):
        read_groups(log)


def test_settings_are_validated():
    for bad in (dict(images_per_prompt=1), dict(selection="best"), dict(format="parquet"), dict(margin=-1),
                dict(kto_fraction=0.6)):
        with pytest.raises(ValueError):
            PairSettings(**bad).validate()


# ---------------------------------------------------------------------------------------------- generation
class CountingPipe:
    """The real pipeline, counting the prompts it is asked to draw."""

    def __init__(self, pipe):
        self.pipe, self.prompts = pipe, []

    def set_progress_bar_config(self, **options):
        self.pipe.set_progress_bar_config(**options)

    def __call__(self, prompts, **options):
        self.prompts += list(prompts)
        return self.pipe(prompts, **options)


@pytest.fixture(scope="module")
def pipe(tiny_model_path):
    from diffalign.guidance import load_pipeline

    return load_pipeline(tiny_model_path)


@pytest.fixture(scope="module")
def rewards():
    from diffalign.rewards import build_reward
    from diffalign.rewards.tiny import tiny_reward_path

    return {name: build_reward(name, weights=str(tiny_reward_path(name))) for name in ("clip", "aesthetic")}


@pytest.fixture(scope="module")
def generated(tmp_path_factory, pipe, rewards):
    out = tmp_path_factory.mktemp("pairs") / "run"
    counting = CountingPipe(pipe)
    result = generate_pairs(counting, PROMPTS, rewards, SETTINGS, out, weights={"clip": 2.0}, setup={"model": "tiny"})
    assert len(counting.prompts) == len(PROMPTS) * K
    return result


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_groups_hold_seeds_scores_and_the_per_group_zscore_ensemble(generated, rewards, pipe):
    out = generated.out_dir
    groups = read_groups(out / "groups.jsonl")
    assert [g.prompt_index for g in groups] == [0, 1, 2, 3] and [g.prompt for g in groups] == PROMPTS
    assert groups[2].seeds == [7 + 2 * K + j for j in range(K)]
    assert groups[2].file_names == [f"images/00002_{j:02d}.png" for j in range(K)]
    for group in groups:
        raw = {name: torch.tensor(values) for name, values in group.scores.items()}
        expected = zscore_ensemble(raw, ["g"] * K, {"clip": 2.0})
        torch.testing.assert_close(torch.tensor(group.combined), expected)
    # the logged clip scores are the reward's own scores of the saved images
    images = [Image.open(out / name) for name in groups[1].file_names]
    direct = rewards["clip"].score(images, [groups[1].prompt] * K)
    torch.testing.assert_close(torch.tensor(groups[1].scores["clip"]), direct, atol=1e-4, rtol=1e-4)
    # image j of group i is the pipeline's image for seed + i * k + j, whatever the batch
    single = pipe(groups[3].prompt, num_inference_steps=2, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(groups[3].seeds[1])).images[0]
    saved = torch.tensor(list(Image.open(out / groups[3].file_names[1]).getdata()), dtype=torch.int16)
    assert (saved - torch.tensor(list(single.getdata()), dtype=torch.int16)).abs().max() <= 1


def test_every_view_is_read_by_the_training_data_pipeline(generated):
    out = generated.out_dir
    groups = read_groups(out / "groups.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["views"] == {"pairs": 4, "scored": 4, "ranked": 4, "kto": 8} and summary["flat_groups"] == 0
    assert (generated.groups, generated.pairs, generated.ranked, generated.kto) == (4, 4, 4, 8)
    cfg = DataConfig(strict=True)  # any unreadable line or image would fail here

    pairs, _ = read_preferences(cfg, str(out / "pairs"))
    assert len(adapt_records(pairs, get_objective("dpo").data_kind, "pairs")) == 4
    scored, _ = read_preferences(cfg, str(out / "scored"))
    scored = adapt_records(scored, get_objective("smpo").data_kind, "scored")
    assert len(scored) == 4 and all(r.scores[0] >= r.scores[1] for r in scored)
    for record, group in zip(scored, groups):  # best vs worst of each group, by the combined score
        assert record.scores == [max(group.combined), min(group.combined)]
        best = group.file_names[group.combined.index(max(group.combined))]
        assert record.images[0].resolve() == (out / best).resolve()
    ranked, _ = read_preferences(cfg, str(out / "ranked"))
    ranked = adapt_records(ranked, get_objective("rank_dpo").data_kind, "ranked")
    assert [len(r.images) for r in ranked] == [K] * 4 and [r.scores for r in ranked] == [g.combined for g in groups]
    kto, _ = read_preferences(cfg, str(out / "kto"))
    kto = adapt_records(kto, get_objective("kto").data_kind, "kto")
    assert len(kto) == 8 and sorted(r.labels[0] for r in kto) == [0.0] * 4 + [1.0] * 4
    top, _ = read_preferences(cfg, str(out))  # the folder itself is the pairs view, paths relative to it
    assert [[p.resolve() for p in r.images] for r in top] == [[p.resolve() for p in r.images] for r in pairs]
    assert lines(out / "pairs" / "metadata.jsonl")[0]["chosen_file_name"].startswith("../images/")


def test_dpo_trains_two_steps_on_the_pairs_view(generated, tmp_path):
    from conftest import ROOT, tiny_overrides

    from diffalign.config import load_config
    from diffalign.training.trainer import train

    cfg = load_config(ROOT / "configs" / "tiny_dpo.yaml", tiny_overrides(
        tmp_path / "run", **{"data.source": str(generated.out_dir / "pairs"), "train.max_steps": 2,
                             "train.batch_size": 2}))
    result = train(cfg)
    assert result.global_step == 2 and result.lora_path.is_file()


def test_summary_and_grid(generated):
    out = generated.out_dir
    summary = json.loads((out / "summary.json").read_text())
    groups = read_groups(out / "groups.jsonl")
    clip = [v for g in groups for v in g.scores["clip"]]
    assert summary["reward_means"]["clip"] == pytest.approx(sum(clip) / len(clip))
    assert summary["groups"] == 4 and summary["images"] == 16 and summary["generated_groups"] == 4
    assert Image.open(out / "overview" / "grid.png").size == (K * 128, 4 * (14 + 128 + 14))


def test_resume_generates_only_missing_groups_and_matches_the_uninterrupted_run(generated, pipe, rewards, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(generated.out_dir, out)
    log = (out / "groups.jsonl").read_text().splitlines(keepends=True)
    (out / "groups.jsonl").write_text(log[0] + log[1][: len(log[1]) // 2])  # killed while writing group 1
    (out / "images" / "00002_01.png").unlink()
    for view in ("pairs", "scored", "ranked", "kto"):
        shutil.rmtree(out / view)
    counting = CountingPipe(pipe)
    result = generate_pairs(counting, PROMPTS, rewards, SETTINGS, out, weights={"clip": 2.0}, setup={"model": "tiny"})
    # fixed windows of 5 images over all 16: group 1 starts in window 0, so every window is drawn again
    assert result.generated_groups == 3 and counting.prompts == [p for p in PROMPTS for _ in range(K)]
    assert [g.prompt_index for g in read_groups(out / "groups.jsonl")] == [0, 1, 2, 3]
    # a finished group whose image went missing is drawn again, and only it
    (out / "images" / "00000_02.png").unlink()
    counting.prompts.clear()
    result = generate_pairs(counting, PROMPTS, rewards, SETTINGS, out, weights={"clip": 2.0}, setup={"model": "tiny"})
    assert result.generated_groups == 1 and counting.prompts == [PROMPTS[0]] * K + [PROMPTS[1]]  # window 0 only
    for name in ("pairs", "scored", "ranked", "kto"):
        assert_same_entries(lines(out / name / "metadata.jsonl"), lines(generated.out_dir / name / "metadata.jsonl"))
    assert_same_entries(lines(out / "metadata.jsonl"), lines(generated.out_dir / "metadata.jsonl"))


def assert_same_entries(resumed, reference):
    """Exactly equal, scores included: resumed images are drawn in the same batches as the first run's."""
    assert resumed == reference


def test_another_config_is_refused_and_view_settings_rewrite_without_generating(generated, pipe, rewards, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(generated.out_dir, out)
    with pytest.raises(ValueError, match=r"another config \(generation: .*'seed': 7.*'seed': 8.*overwrite=True"):
        generate_pairs(pipe, PROMPTS, rewards, PairSettings(**{**vars(SETTINGS), "seed": 8}), out,
                       weights={"clip": 2.0}, setup={"model": "tiny"})
    with pytest.raises(ValueError, match="prompts_sha256"):
        generate_pairs(pipe, PROMPTS[:3], rewards, SETTINGS, out, weights={"clip": 2.0}, setup={"model": "tiny"})
    # selection, margin and format only shape the views: rewritten from groups.jsonl, nothing drawn
    counting = CountingPipe(pipe)
    view_settings = PairSettings(**{**vars(SETTINGS), "selection": "all", "margin": 0.5, "format": "ranked",
                                    "batch_size": 3})
    result = generate_pairs(counting, PROMPTS, rewards, view_settings, out, weights={"clip": 2.0},
                            setup={"model": "tiny"})
    assert counting.prompts == [] and result.generated_groups == 0
    groups = read_groups(out / "groups.jsonl")
    expected = sum(len(select_pairs(g.combined, "all", 0.5)) for g in groups)
    assert result.pairs == expected == len(lines(out / "pairs" / "metadata.jsonl"))
    assert build_views(groups, view_settings)[1]["views"]["pairs"] == expected
    assert "file_names" in lines(out / "metadata.jsonl")[0]  # the ranked view at the top
    # overwrite starts again
    result = generate_pairs(counting, PROMPTS[:2], rewards, SETTINGS, out, weights={"clip": 2.0}, overwrite=True)
    assert result.generated_groups == 2 and not (out / "images" / "00003_00.png").exists()


def test_pairs_command(tmp_path, tiny_model_path, capsys):
    from diffalign.rewards.tiny import tiny_reward_path

    out = tmp_path / "cli"
    args = ["pairs", "--model", tiny_model_path, "--prompt-set", "shapes", "--reward", "clip", "--weights",
            str(tiny_reward_path("clip")), "--images-per-prompt", "3", "--steps", "2", "--guidance", "3",
            "--batch-size", "4", "--format", "kto", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"data.source={out / 'pairs'}" in printed and "kto: 6 (label 1: 3, label 0: 3)" in printed
    assert len(lines(out / "pairs" / "metadata.jsonl")) == 3 and "label" in lines(out / "metadata.jsonl")[0]
    assert json.loads((out / "pairs_config.json").read_text())["setup"]["model"] == tiny_model_path
    assert main([*args[:-2], "--seed", "1", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args[:-2], "--seed", "1", "--repeat", "2", "--overwrite", "--out", str(out)]) == 0
    assert len(lines(out / "groups.jsonl")) == 6


def test_pairs_help_has_examples():
    from diffalign.cli import build_parser

    parser = build_parser()
    text = parser._subparsers._group_actions[0].choices["pairs"].format_help()
    assert "examples:" in text and "diffalign pairs --model tiny:sd15" in text and "data.source=" in text
