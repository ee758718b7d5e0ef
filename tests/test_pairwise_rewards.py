"""Pairwise rewards (for Pref-GRPO): the toy judge's verdicts and margin, PickScore as a pairwise preference model on
tiny random weights, antisymmetry, and scalar consumers refusing a pairwise reward before any work."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.errors import ConfigError
from diffalign.evaluation.pair_selection import PairSettings
from diffalign.evaluation.pairs import generate_pairs
from diffalign.evaluation.report import run_eval
from diffalign.guidance.sample import SampleSettings
from diffalign.rewards import (
    REWARDS,
    PairwiseRewardModel,
    RewardModel,
    build_reward,
    is_pairwise,
    require_scalar,
)
from diffalign.rewards.scoring import ScoreRow, score_rows
from diffalign.rewards.tiny import build_tiny_reward
from diffalign.rewards.toy import redness

PAIRWISE = ["toy_redness_judge", "pickscore_pairwise"]
RED, BLUE, GREY = (255, 0, 0), (0, 0, 255), (128, 128, 128)


def square(rgb, size=(16, 16)):
    return Image.new("RGB", size, rgb)


def noise_images(count, seed=0, sizes=((32, 32), (48, 40), (33, 65))):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in
            (sizes[i % len(sizes)] for i in range(count))]


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory):
    return build_tiny_reward(tmp_path_factory.mktemp("rewards") / "pickscore", "pickscore", seed=3)


@pytest.fixture(scope="module")
def pickscores(tiny_pickscore):
    """(scalar pickscore, pickscore_pairwise) on the same tiny weights."""
    return build_reward("pickscore", weights=tiny_pickscore), build_reward("pickscore_pairwise", weights=tiny_pickscore)


def scalar_names():
    return sorted(name for name in REWARDS.names() if not is_pairwise(name))


# ---------------------------------------------------------------------------------------------- kinds
def test_is_pairwise_and_the_built_classes():
    assert [name for name in REWARDS.names() if is_pairwise(name)] == PAIRWISE
    assert not any(is_pairwise(name) for name in ("clip", "hpsv2", "hpsv21", "pickscore", "aesthetic", "toy_redness"))
    with pytest.raises(ConfigError, match="unknown reward 'toy_redness_jduge'. Did you mean 'toy_redness_judge'"):
        is_pairwise("toy_redness_jduge")
    judge = build_reward("toy_redness_judge")
    assert isinstance(judge, PairwiseRewardModel) and not isinstance(judge, RewardModel)
    assert judge.name == "toy_redness_judge" and not hasattr(judge, "score")
    assert isinstance(build_reward("toy_redness"), RewardModel)


# ---------------------------------------------------------------------------------------------- toy judge
def test_toy_judge_verdicts_on_hand_made_images():
    judge = build_reward("toy_redness_judge")
    red, blue, grey = square(RED), square(BLUE), square(GREY)
    got = judge.prefer([red, blue, red, grey, grey, red], [blue, red, red.copy(), grey, blue, grey], ["x"] * 6)
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (6,)
    assert got.tolist() == [1.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    assert judge.prefer([], [], []).shape == (0,)
    with pytest.raises(ValueError, match="one prompt per pair"):
        judge.prefer([red], [blue], ["x", "y"])


def test_toy_judge_margin_turns_small_gaps_into_ties():
    dark_red, red = square((128, 0, 0)), square(RED)
    gap = redness(red) - redness(dark_red)  # 127 / 255, about 0.498
    for margin, expected in [(0.0, 1.0), (gap - 0.01, 1.0), (gap + 0.01, 0.5), (1.0, 0.5)]:
        judge = build_reward("toy_redness_judge", margin=margin)
        assert judge.prefer([red, dark_red], [dark_red, red], ["x", "x"]).tolist() == [expected, 1 - expected]
    for bad in (-0.1, float("nan"), float("inf"), "wide"):
        with pytest.raises(ConfigError, match="margin must be a finite number >= 0"):
            build_reward("toy_redness_judge", margin=bad)
    with pytest.raises(ConfigError, match="no option 'margn'. Did you mean 'margin'"):
        build_reward("toy_redness_judge", margn=0.1)
    with pytest.raises(ConfigError, match="no weights"):
        build_reward("toy_redness_judge", weights="judge.pt")


@pytest.mark.parametrize("margin", [0.0, 0.01])
def test_toy_judge_is_antisymmetric_on_random_images(margin):
    judge = build_reward("toy_redness_judge", margin=margin)
    a, b = noise_images(12, seed=1), noise_images(12, seed=2)
    forward, backward = judge.prefer(a, b, ["x"] * 12), judge.prefer(b, a, ["x"] * 12)
    assert torch.equal(forward + backward, torch.ones(12))
    assert set(forward.tolist()) <= {0.0, 0.5, 1.0}
    assert torch.equal(judge.prefer(a, a, ["x"] * 12), torch.full((12,), 0.5))  # an image against itself ties


# ---------------------------------------------------------------------------------------------- pickscore
def test_pickscore_pairwise_is_sigmoid_of_the_score_difference(pickscores):
    scalar, pairwise = pickscores
    assert isinstance(pairwise, PairwiseRewardModel) and pairwise.device == scalar.device
    a, b = noise_images(4, seed=3), noise_images(4, seed=4)
    prompts = ["a red square", "a blue circle on grey", "", "a photo of a cat"]
    got = pairwise.prefer(a, b, prompts)
    expected = torch.sigmoid(scalar.score(a, prompts) - scalar.score(b, prompts))
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (4,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert ((got > 0) & (got < 1)).all()
    # the same as PickScore's softmax over the two candidates of one prompt
    assert got[0].item() == pytest.approx(scalar.pairwise_probability(a[0], b[0], prompts[0]), abs=1e-5)
    torch.testing.assert_close(got + pairwise.prefer(b, a, prompts), torch.ones(4), rtol=0, atol=1e-5)
    assert pairwise.prefer([], [], []).shape == (0,)
    with pytest.raises(ValueError, match="one prompt per pair"):
        pairwise.prefer(a, b[:3], prompts)


def test_pickscore_pairwise_makes_one_batched_score_call(pickscores):
    _, pairwise = pickscores
    calls = []
    score = pairwise.scorer.score
    pairwise.scorer.score = lambda images, prompts: calls.append(len(images)) or score(images, prompts)
    try:
        pairwise.prefer(noise_images(3), noise_images(3, seed=5), ["x", "y", "z"])
    finally:
        del pairwise.scorer.score
    assert calls == [6]


def test_pickscore_pairwise_options(tiny_pickscore):
    with pytest.raises(ConfigError, match="reward 'pickscore_pairwise' has no option 'procesor'"):
        build_reward("pickscore_pairwise", weights=tiny_pickscore, procesor="x")
    built = build_reward("pickscore_pairwise", weights=tiny_pickscore, processor_backend="pil")
    assert built.scorer.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- scalar consumers
def refusal(name, purpose):
    return (f"reward '{name}' is pairwise (it compares two images); {purpose} needs a scalar reward: choose one of "
            f"{', '.join(scalar_names())}")


def test_require_scalar_takes_names_or_built_rewards():
    require_scalar("clip", "x")
    require_scalar(["clip", "toy_redness"], "x")
    require_scalar({"custom": build_reward("toy_redness")}, "x")  # built rewards: judged by class, any name
    with pytest.raises(ConfigError) as refused:
        require_scalar(["clip", "pickscore_pairwise"], "ranking")
    assert str(refused.value) == refusal("pickscore_pairwise", "ranking")
    with pytest.raises(ConfigError, match="reward 'mine' is pairwise"):
        require_scalar({"mine": build_reward("toy_redness_judge")}, "ranking")


@pytest.mark.parametrize("command", [
    ["score", "--images", "no/such/folder"],
    ["pairs", "--model", "no/such/model", "--prompt", "a red square", "--out", "no/such/out"],
    ["eval", "--model", "no/such/model", "--prompts", "no/such/prompts.txt", "--out", "no/such/out"],
])
def test_commands_refuse_a_pairwise_reward_before_any_work(command, capsys):
    # the paths do not exist: the refusal comes before any of them is read
    assert main([*command, "--reward", "toy_redness,toy_redness_judge"]) == 2
    err = capsys.readouterr().err
    assert err == f"diffalign {command[0]}: error: {refusal('toy_redness_judge', f'diffalign {command[0]}')}\n"


def test_library_scorers_refuse_a_pairwise_reward_before_any_work(tmp_path):
    judge = {"toy_redness_judge": build_reward("toy_redness_judge")}
    with pytest.raises(ConfigError, match=r"is pairwise .*score_rows\) needs a scalar reward"):
        score_rows([ScoreRow(str(tmp_path / "missing.png"), "a red square")], judge, batch_size=4)
    with pytest.raises(ConfigError, match=r"is pairwise .*run_eval\) needs a scalar reward"):
        run_eval("no/such/model", {}, ["a red square"], judge, SampleSettings(num_images=1, steps=1),
                 tmp_path / "eval")
    with pytest.raises(ConfigError, match=r"is pairwise .*generate_pairs\) needs a scalar reward"):
        generate_pairs(None, ["a red square"], judge, PairSettings(images_per_prompt=2, steps=1), tmp_path / "pairs")
    assert not (tmp_path / "eval").exists() and not (tmp_path / "pairs").exists()
