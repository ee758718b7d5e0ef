"""Objectives against their formulas on hand-made tensors."""

import math

import pytest
import torch

from diffalign.config import ConfigError
from diffalign.objectives import ObjectiveInputs, available_objectives, get_objective
from diffalign.objectives.dpo import DPOParams, dpo_losses, implicit_accuracy


def pair_inputs(policy_w, policy_l, ref_w, ref_l, requires_grad=False):
    policy = torch.tensor([policy_w, policy_l], dtype=torch.float64).T.contiguous().requires_grad_(requires_grad)
    ref = torch.tensor([ref_w, ref_l], dtype=torch.float64).T.contiguous()
    return ObjectiveInputs(policy_err=policy, ref_err=ref)


def test_dpo_sigmoid_matches_formula_by_hand():
    # one pair: L_w=0.10, L_l=0.30, R_w=0.20, R_l=0.25 -> logits = (0.20-0.25) - (0.10-0.30) = 0.15
    inputs = pair_inputs([0.10], [0.30], [0.20], [0.25])
    out = get_objective("dpo")(inputs, DPOParams(beta=10.0))
    expected = -math.log(1 / (1 + math.exp(-0.5 * 10.0 * 0.15)))
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    assert out.metrics["implicit_acc"].item() == 1.0
    assert out.metrics["reward_margin"].item() == pytest.approx(0.5 * 10.0 * 0.15)


def test_dpo_is_mean_of_per_pair_losses_not_logsigmoid_of_mean():
    inputs = pair_inputs([0.1, 0.5], [0.3, 0.2], [0.2, 0.2], [0.25, 0.25])
    beta = 40.0
    logits = torch.tensor([(0.2 - 0.25) - (0.1 - 0.3), (0.2 - 0.25) - (0.5 - 0.2)], dtype=torch.float64)
    expected = (-torch.nn.functional.logsigmoid(0.5 * beta * logits)).mean()
    wrong = -torch.nn.functional.logsigmoid(0.5 * beta * logits.mean())
    out = get_objective("dpo")(inputs, DPOParams(beta=beta))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-9)
    assert abs(out.loss.item() - wrong.item()) > 1e-3
    assert out.metrics["implicit_acc"].item() == 0.5


def test_dpo_sign_lowering_winner_error_lowers_loss():
    base = get_objective("dpo")(pair_inputs([0.3], [0.3], [0.3], [0.3]), DPOParams(beta=100.0)).loss
    better = get_objective("dpo")(pair_inputs([0.2], [0.3], [0.3], [0.3]), DPOParams(beta=100.0)).loss
    worse_loser = get_objective("dpo")(pair_inputs([0.3], [0.2], [0.3], [0.3]), DPOParams(beta=100.0)).loss
    assert base.item() == pytest.approx(math.log(2))
    assert better < base < worse_loser
    # and the gradient pushes the winner's error down, the loser's error up
    inputs = pair_inputs([0.3], [0.3], [0.3], [0.3], requires_grad=True)
    get_objective("dpo")(inputs, DPOParams(beta=100.0)).loss.backward()
    assert inputs.policy_err.grad[0, 0] > 0 and inputs.policy_err.grad[0, 1] < 0


def test_diffusers_beta_convention_converts_by_factor_two():
    # diffusers' SD1.5 script: -logsigmoid(-beta_dpo * (model_diff - ref_diff)) with beta_dpo = 2500
    model_diff, ref_diff = torch.tensor([0.003, -0.001]), torch.tensor([0.001, 0.0])
    diffusers = -torch.nn.functional.logsigmoid(-2500 * (model_diff - ref_diff))
    ours, _ = dpo_losses(model_diff, torch.zeros(2), ref_diff, torch.zeros(2), beta=5000)
    torch.testing.assert_close(ours, diffusers)


def test_dpo_hinge_and_ipo_formulas():
    pw, pl, rw, rl = torch.tensor([0.1, 0.4]), torch.tensor([0.3, 0.2]), torch.tensor([0.2, 0.2]), torch.tensor([0.25, 0.25])
    logits = (rw - rl) - (pw - pl)
    beta = 8.0
    hinge, _ = dpo_losses(pw, pl, rw, rl, beta, "hinge")
    torch.testing.assert_close(hinge, torch.relu(1 - 0.5 * beta * logits))
    ipo, _ = dpo_losses(pw, pl, rw, rl, beta, "ipo")
    torch.testing.assert_close(ipo, (logits - 1 / (2 * 0.5 * beta)) ** 2)


def test_implicit_accuracy_counts_ties_half():
    assert implicit_accuracy(torch.tensor([1.0, -1.0, 0.0, 0.0])).item() == pytest.approx(0.5)
    assert implicit_accuracy(torch.tensor([1.0, 1.0, 0.0, -1.0])).item() == pytest.approx(0.625)


def test_sft_is_mean_winner_error_and_needs_no_reference():
    objective = get_objective("sft")
    assert not objective.needs_reference and objective.images_per_record == 1
    out = objective(ObjectiveInputs(policy_err=torch.tensor([[0.2], [0.4]])), objective.parse_params({}))
    assert out.loss.item() == pytest.approx(0.3)


def test_registry_and_param_validation():
    assert {"dpo", "sft"} <= set(available_objectives())
    with pytest.raises(ConfigError, match="Did you mean 'dpo'"):
        get_objective("dppo")
    with pytest.raises(ConfigError, match="Did you mean 'beta'"):
        get_objective("dpo").parse_params({"betta": 1.0})
    with pytest.raises(ConfigError, match="variant"):
        get_objective("dpo").parse_params({"variant": "squared"})
