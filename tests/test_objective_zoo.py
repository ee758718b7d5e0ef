"""NPO, SDPO, MaPO, KTO, SmPO and RankDPO against formulas written out here, on hand-made tensors."""

import math

import pytest
import torch

from diffalign.config import ConfigError
from diffalign.objectives import ObjectiveInputs, available_objectives, get_objective
from diffalign.objectives.mapo import mapo_odds
from diffalign.objectives.sdpo import sdpo_lambda

F64 = torch.float64
LOG2 = math.log(2)


def t(values, requires_grad=False):
    return torch.tensor(values, dtype=F64, requires_grad=requires_grad)


def neg_logsigmoid(x):
    """-log(sigmoid(x)), stable for either sign."""
    return math.log1p(math.exp(-x)) if x >= 0 else -x + math.log1p(math.exp(x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def run(name, inputs, **params):
    objective = get_objective(name)
    return objective(inputs, objective.parse_params(params))


# ---------------------------------------------------------------- NPO


def test_npo_is_dpo_with_winner_and_loser_swapped():
    # L_w=0.10, L_l=0.30, R_w=0.20, R_l=0.25; swapped logits = (R_l - R_w) - (L_l - L_w) = 0.05 - 0.20 = -0.15
    out = run("npo", ObjectiveInputs(policy_err=t([[0.10, 0.30]]), ref_err=t([[0.20, 0.25]])), beta=10.0)
    assert out.loss.item() == pytest.approx(neg_logsigmoid(0.5 * 10.0 * -0.15), rel=1e-12)
    # the policy prefers the preferred image: as a *negative* model it is wrong on this pair
    assert out.metrics["implicit_acc"].item() == 0.0
    assert out.metrics["policy_mse_w"].item() == pytest.approx(0.10)  # data roles kept in the MSE names


def test_npo_hinge_variant_and_default_beta():
    assert get_objective("npo").parse_params({}).beta == 1000.0
    out = run("npo", ObjectiveInputs(policy_err=t([[0.10, 0.30]]), ref_err=t([[0.20, 0.25]])), beta=10.0, variant="hinge")
    assert out.loss.item() == pytest.approx(max(0.0, 1 - 0.5 * 10.0 * -0.15))


def test_npo_gradient_pushes_towards_the_dispreferred_image():
    inputs = ObjectiveInputs(policy_err=t([[0.3, 0.3]], requires_grad=True), ref_err=t([[0.3, 0.3]]))
    out = run("npo", inputs, beta=100.0)
    assert out.loss.item() == pytest.approx(LOG2)
    out.loss.backward()
    # descent raises the preferred image's error and lowers the dispreferred one's: the reverse of DPO
    assert inputs.policy_err.grad[0, 0] < 0 < inputs.policy_err.grad[0, 1]
    better_winner = run("npo", ObjectiveInputs(policy_err=t([[0.2, 0.3]]), ref_err=t([[0.3, 0.3]])), beta=100.0)
    assert better_winner.loss.item() > LOG2


# ---------------------------------------------------------------- SDPO


def residual_pair(r_w, r_l):
    return torch.stack([r_w, r_l], dim=1)  # (B, 2, C, H, W)


def test_sdpo_lambda_is_one_when_winner_and_loser_disagree():
    r_w = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert sdpo_lambda(residual_pair(r_w, -r_w), mu=0.5).item() == 1.0
    orthogonal = torch.zeros_like(r_w)  # dot = 0: not > 0, so unconstrained
    assert sdpo_lambda(residual_pair(r_w, orthogonal), mu=0.9).item() == 1.0


def test_sdpo_lambda_below_one_when_they_agree():
    r_w = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    # r_l = r_w: lambda = (1 - mu) * |gA|^2 / (|gA|^2 + 1e-9)
    assert sdpo_lambda(residual_pair(r_w, r_w), mu=0.5).item() == pytest.approx(0.5, rel=1e-6)
    assert sdpo_lambda(residual_pair(r_w, 3 * r_w), mu=0.0).item() == pytest.approx(1 / 3, rel=1e-6)
    # a loser far smaller than the winner would give a cap above 1: clamped
    assert sdpo_lambda(residual_pair(r_w, 0.1 * r_w), mu=0.0).item() == 1.0
    assert sdpo_lambda(residual_pair(r_w, r_w), mu=1.0).item() == 0.0


def test_sdpo_lambda_matches_hand_formula_and_stays_in_unit_interval():
    gen = torch.Generator().manual_seed(2)
    for mu in (0.0, 0.3, 0.9):
        for _ in range(20):
            r_w = torch.randn(2, 4, 3, 3, generator=gen, dtype=F64)
            r_l = 0.7 * r_w + torch.randn(2, 4, 3, 3, generator=gen, dtype=F64)
            lam = sdpo_lambda(residual_pair(r_w, r_l), mu).item()
            n = r_w.numel()
            g_a, g_b = 2 * r_w / n, 2 * r_l / n
            dot = (g_a * g_b).sum().item()
            expected = 1.0 if dot <= 0 else min(1.0, max(0.0, (1 - mu) * (g_a * g_a).sum().item() / (dot + 1e-9)))
            assert lam == pytest.approx(expected, rel=1e-9)
            assert 0.0 <= lam <= 1.0


def test_sdpo_forward_equals_dpo_and_only_the_loser_gradient_is_scaled():
    gen = torch.Generator().manual_seed(3)
    r_w = torch.randn(2, 4, 2, 2, generator=gen, dtype=F64)
    residuals = residual_pair(r_w, 2 * r_w)  # lambda = 1/2 with mu = 0
    policy_values, ref = [[0.10, 0.30], [0.25, 0.20]], t([[0.20, 0.25], [0.22, 0.21]])
    sdpo_policy, dpo_policy = t(policy_values, requires_grad=True), t(policy_values, requires_grad=True)
    sdpo = run("sdpo", ObjectiveInputs(policy_err=sdpo_policy, ref_err=ref, residuals=residuals), beta=20.0, mu=0.0)
    dpo = run("dpo", ObjectiveInputs(policy_err=dpo_policy, ref_err=ref), beta=20.0)
    assert sdpo.loss.item() == pytest.approx(dpo.loss.item(), rel=1e-12)
    (g_sdpo,) = torch.autograd.grad(sdpo.loss, sdpo_policy)
    (g_dpo,) = torch.autograd.grad(dpo.loss, dpo_policy)
    lam = sdpo.metrics["sdpo_lambda"].item()
    assert lam == pytest.approx(0.5, rel=1e-6)
    torch.testing.assert_close(g_sdpo[:, 0], g_dpo[:, 0])
    torch.testing.assert_close(g_sdpo[:, 1], lam * g_dpo[:, 1])
    # and the by-hand DPO value, for good measure
    expected = sum(neg_logsigmoid(0.5 * 20.0 * ((rw - rl) - (lw - ll)))
                   for (lw, ll), (rw, rl) in zip(policy_values, ref.tolist())) / 2
    assert sdpo.loss.item() == pytest.approx(expected, rel=1e-12)


def test_sdpo_zero_margin_and_requirements():
    residuals = torch.ones(1, 2, 1, 2, 2, dtype=F64)
    out = run("sdpo", ObjectiveInputs(policy_err=t([[0.3, 0.3]]), ref_err=t([[0.3, 0.3]]), residuals=residuals))
    assert out.loss.item() == pytest.approx(LOG2)
    assert get_objective("sdpo").needs_residuals
    with pytest.raises(ValueError, match="residuals"):
        run("sdpo", ObjectiveInputs(policy_err=t([[0.3, 0.3]]), ref_err=t([[0.3, 0.3]])))


# ---------------------------------------------------------------- MaPO


def f_mapo(m, s=0.5):
    return s * m / (math.exp(s * m) - 1)


def test_mapo_matches_formula_without_a_reference():
    policy = [[0.10, 0.30], [0.40, 0.35]]
    out = run("mapo", ObjectiveInputs(policy_err=t(policy), ref_err=None))
    ratio = [-neg_logsigmoid(1000 * (f_mapo(lw) - f_mapo(ll))) for lw, ll in policy]
    expected = (0.10 + 0.40) / 2 - 0.1 * sum(ratio) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["margin_acc"].item() == 0.5
    assert out.metrics["ratio_logsigmoid"].item() == pytest.approx(sum(ratio) / 2, rel=1e-12)
    assert get_objective("mapo").needs_reference is False


def test_mapo_never_reads_reference_errors():
    policy = t([[0.10, 0.30]])
    without = run("mapo", ObjectiveInputs(policy_err=policy))
    with_nan_ref = run("mapo", ObjectiveInputs(policy_err=policy, ref_err=t([[float("nan"), float("nan")]])))
    assert with_nan_ref.loss.item() == without.loss.item()


def test_mapo_odds_limit_at_zero_and_near_it():
    zero = torch.zeros(3, dtype=F64, requires_grad=True)
    values = mapo_odds(zero, 0.5)
    assert torch.equal(values, torch.ones(3, dtype=F64))
    values.sum().backward()
    torch.testing.assert_close(zero.grad, torch.full((3,), -0.25, dtype=F64))  # d/dm f = -s/2 at 0
    for m in (1e-5, 1.9e-4, 2.1e-4, 1e-3, 0.1, 2.0, 50.0):
        assert mapo_odds(t([m]), 0.5).item() == pytest.approx(f_mapo(m), rel=1e-10)
    assert mapo_odds(t([1e4]), 0.5).item() == 0.0  # exp overflow -> 0, not nan


def test_mapo_gradient_direction():
    inputs = ObjectiveInputs(policy_err=t([[0.3, 0.3]], requires_grad=True))
    out = run("mapo", inputs)
    assert out.loss.item() == pytest.approx(0.3 + 0.1 * LOG2)  # zero margin: logsigmoid(0) = -log 2
    out.loss.backward()
    assert inputs.policy_err.grad[0, 0] > 0 > inputs.policy_err.grad[0, 1]


# ---------------------------------------------------------------- KTO


KTO_L, KTO_R, KTO_Y = [0.10, 0.30, 0.20, 0.25], [0.15, 0.28, 0.24, 0.27], [1, 0, 1, 0]  # g = .05 -.02 .04 .02


def kto_inputs(policy=KTO_L, ref=KTO_R, labels=KTO_Y, requires_grad=False, **kw):
    col = lambda values: [[v] for v in values]  # noqa: E731
    return ObjectiveInputs(policy_err=t(col(policy), requires_grad), ref_err=t(col(ref)),
                           labels=torch.tensor(col(labels)), **kw)


def kto_by_hand(policy, ref, labels, beta, z=None, lam_d=1.0, lam_u=1.0):
    g = [r - p for p, r in zip(policy, ref)]
    z = max(sum(g) / len(g), 0.0) if z is None else z
    terms = [(lam_d if y == 1 else lam_u) * (1 - sigmoid((2 * y - 1) * beta * (gi - z))) for gi, y in zip(g, labels)]
    return sum(terms) / len(terms), z


def test_kto_matches_formula():
    out = run("kto", kto_inputs(), beta=50.0, lambda_desirable=2.0)
    expected, z = kto_by_hand(KTO_L, KTO_R, KTO_Y, 50.0, lam_d=2.0)
    assert z == pytest.approx(0.0225)  # mean g > 0: the reference point is active
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["kl_reference_point"].item() == pytest.approx(z)
    objective = get_objective("kto")
    assert objective.images_per_record == 1 and objective.data_kind == "labelled"


def test_kto_reference_point_is_clamped_at_zero():
    policy = [0.30, 0.30, 0.30, 0.30]  # g = R - L all negative: mean < 0 -> z = 0
    ref = [0.20, 0.25, 0.28, 0.10]
    out = run("kto", kto_inputs(policy, ref), beta=50.0)
    expected, z = kto_by_hand(policy, ref, KTO_Y, 50.0)
    assert z == 0.0 and out.metrics["kl_reference_point"].item() == 0.0
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)


def test_kto_reference_point_uses_global_mean():
    seen = []

    def fixed_global_mean(tensor):
        seen.append(tensor.shape)
        return torch.tensor(0.05, dtype=F64)

    local = run("kto", kto_inputs(), beta=50.0)
    global_ = run("kto", kto_inputs(global_mean=fixed_global_mean), beta=50.0)
    assert seen, "global_mean was not called"
    assert global_.metrics["kl_reference_point"].item() == pytest.approx(0.05)
    assert global_.loss.item() == pytest.approx(kto_by_hand(KTO_L, KTO_R, KTO_Y, 50.0, z=0.05)[0], rel=1e-12)
    assert abs(global_.loss.item() - local.loss.item()) > 1e-3
    negative = run("kto", kto_inputs(global_mean=lambda tensor: torch.tensor(-0.3, dtype=F64)), beta=50.0)
    assert negative.metrics["kl_reference_point"].item() == 0.0


def test_kto_gradient_lowers_desirable_and_raises_undesirable_errors():
    inputs = kto_inputs(requires_grad=True)
    run("kto", inputs, beta=50.0).loss.backward()
    grad = inputs.policy_err.grad[:, 0]
    assert (grad[torch.tensor(KTO_Y) == 1] > 0).all()  # descent lowers the error of liked images
    assert (grad[torch.tensor(KTO_Y) == 0] < 0).all()  # and raises it on disliked ones


def test_kto_policy_equal_reference_and_one_sided_batches():
    same = [0.2, 0.3, 0.25, 0.1]
    out = run("kto", kto_inputs(same, same), beta=50.0)
    assert out.loss.item() == pytest.approx(0.5)  # g = z = 0: 1 - sigmoid(0) for every image
    only_liked = run("kto", kto_inputs(labels=[1, 1, 1, 1]), beta=50.0)
    metrics = only_liked.metrics
    assert metrics["n_undesirable"].item() == 0 and metrics["reward_undesirable"].item() == 0.0
    assert metrics["reward_desirable"].item() == pytest.approx(sum(r - p for p, r in zip(KTO_L, KTO_R)) / 4)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_kto_label_validation():
    with pytest.raises(ValueError, match="labels"):
        run("kto", ObjectiveInputs(policy_err=t([[0.1]]), ref_err=t([[0.1]])))
    with pytest.raises(ValueError, match="0 or 1"):
        run("kto", kto_inputs(labels=[1, 2, 0, 0]))


# ---------------------------------------------------------------- SmPO


def smpo_by_hand(policy, ref, scores, beta, scale=10.0, lo=0.11544, hi=0.28202):
    total = 0.0
    for (lw, ll), (rw, rl), (sw, sl) in zip(policy, ref, scores):
        nw, nl = (sw - lo) / (hi - lo), (sl - lo) / (hi - lo)
        p_w = math.exp(nw) / (math.exp(nw) + math.exp(nl))
        total += neg_logsigmoid(-0.5 * beta * (2 * p_w - 1) * scale * ((lw - ll) - (rw - rl)))
    return total / len(policy)


def test_smpo_matches_formula():
    policy, ref, scores = [[0.10, 0.30], [0.25, 0.20]], [[0.20, 0.25], [0.22, 0.21]], [[0.25, 0.15], [0.20, 0.19]]
    out = run("smpo", ObjectiveInputs(policy_err=t(policy), ref_err=t(ref), scores=t(scores)), beta=5.0)
    assert out.loss.item() == pytest.approx(smpo_by_hand(policy, ref, scores, 5.0), rel=1e-12)
    assert get_objective("smpo").data_kind == "scored_pair"


def test_smpo_equal_scores_give_log2_and_no_gradient():
    policy = t([[0.10, 0.30]], requires_grad=True)
    out = run("smpo", ObjectiveInputs(policy_err=policy, ref_err=t([[0.20, 0.25]]), scores=t([[0.2, 0.2]])))
    assert out.loss.item() == LOG2
    out.loss.backward()
    assert torch.equal(policy.grad, torch.zeros_like(policy))


def test_smpo_gradient_follows_the_scores_and_their_strength():
    def grad(scores):
        policy = t([[0.3, 0.3]], requires_grad=True)
        run("smpo", ObjectiveInputs(policy_err=policy, ref_err=t([[0.3, 0.3]]), scores=t([scores])), beta=5.0)\
            .loss.backward()
        return policy.grad[0]

    weak, strong, reversed_ = grad([0.21, 0.20]), grad([0.27, 0.12]), grad([0.15, 0.25])
    assert weak[0] > 0 > weak[1]  # lower the preferred image's error
    assert strong[0] > weak[0] > 0  # a clearer preference pulls harder
    assert reversed_[0] < 0 < reversed_[1]  # scores against the label: towards the higher-scored image


def test_smpo_needs_scores():
    with pytest.raises(ValueError, match="scores"):
        run("smpo", ObjectiveInputs(policy_err=t([[0.1, 0.2]]), ref_err=t([[0.1, 0.2]])))


# ---------------------------------------------------------------- RankDPO


def rank_dpo_by_hand(policy, ref, scores, beta):
    total = 0.0
    for lvals, rvals, svals in zip(policy, ref, scores):
        k = len(svals)
        order = sorted(range(k), key=lambda i: -svals[i])  # Python's sort is stable
        rank = {image: position + 1 for position, image in enumerate(order)}
        psi = [sum(sj < si for sj in svals) / (k - 1) for si in svals]
        for i in range(k):
            for j in range(k):
                if svals[i] > svals[j]:
                    delta = abs(2 ** psi[i] - 2 ** psi[j]) * abs(1 / math.log(1 + rank[i]) - 1 / math.log(1 + rank[j]))
                    logits = (rvals[i] - rvals[j]) - (lvals[i] - lvals[j])
                    total += delta * neg_logsigmoid(0.5 * beta * logits)
    return total / len(policy)


def test_rank_dpo_matches_formula_with_shuffled_scores_and_ties():
    policy = [[0.20, 0.10, 0.30, 0.25], [0.15, 0.22, 0.18, 0.30]]
    ref = [[0.22, 0.15, 0.26, 0.24], [0.17, 0.20, 0.21, 0.27]]
    scores = [[0.5, 0.9, 0.1, 0.3], [0.3, 0.3, 0.7, 0.1]]  # second record has a tie
    out = run("rank_dpo", ObjectiveInputs(policy_err=t(policy), ref_err=t(ref), scores=t(scores)), beta=20.0)
    assert out.loss.item() == pytest.approx(rank_dpo_by_hand(policy, ref, scores, 20.0), rel=1e-12)
    assert out.metrics["valid_pairs"].item() == pytest.approx((6 + 5) / 2)  # the tied pair gets no term


def test_rank_dpo_two_images_is_weighted_dpo():
    out = run("rank_dpo", ObjectiveInputs(policy_err=t([[0.10, 0.30]]), ref_err=t([[0.20, 0.25]]),
                                          scores=t([[1.0, 0.0]])), beta=10.0)
    delta = 1.0 * (1 / math.log(2) - 1 / math.log(3))  # |2^1 - 2^0| * |1/ln 2 - 1/ln 3|
    assert out.loss.item() == pytest.approx(delta * neg_logsigmoid(0.5 * 10.0 * 0.15), rel=1e-12)
    assert out.metrics["implicit_acc"].item() == 1.0


def test_rank_dpo_all_equal_scores_give_zero_loss_and_no_pairs():
    policy = t([[0.1, 0.2, 0.3]], requires_grad=True)
    out = run("rank_dpo", ObjectiveInputs(policy_err=policy, ref_err=t([[0.3, 0.2, 0.1]]), scores=t([[0.4, 0.4, 0.4]])))
    assert out.loss.item() == 0.0
    assert out.metrics["valid_pairs"].item() == 0.0 and out.metrics["implicit_acc"].item() == 0.5
    out.loss.backward()
    assert torch.equal(policy.grad, torch.zeros_like(policy))


def test_rank_dpo_gradient_lowers_the_best_image_error():
    policy = t([[0.3, 0.3, 0.3]], requires_grad=True)
    inputs = ObjectiveInputs(policy_err=policy, ref_err=t([[0.3, 0.3, 0.3]]), scores=t([[0.2, 0.9, 0.5]]))
    out = run("rank_dpo", inputs, beta=100.0)
    out.loss.backward()
    grad = policy.grad[0]
    assert grad[1] > 0 > grad[0]  # best (score 0.9) pushed down, worst (0.2) pushed up
    lowered = t([[0.3, 0.29, 0.3]])
    better = run("rank_dpo", ObjectiveInputs(policy_err=lowered, ref_err=t([[0.3, 0.3, 0.3]]),
                                             scores=t([[0.2, 0.9, 0.5]])), beta=100.0)
    assert better.loss.item() < out.loss.item()
    objective = get_objective("rank_dpo")
    assert objective.images_per_record is None and objective.data_kind == "ranked"


# ---------------------------------------------------------------- all objectives


def sample_inputs(name):
    policy = t([[0.10, 0.30], [0.25, 0.20]], requires_grad=True)
    ref = t([[0.20, 0.25], [0.22, 0.21]])
    if name in ("sft", "kto"):
        policy = t([[0.10], [0.25]], requires_grad=True)
        return ObjectiveInputs(policy_err=policy, ref_err=t([[0.2], [0.2]]), labels=torch.tensor([[1], [0]]))
    return ObjectiveInputs(policy_err=policy, ref_err=ref, scores=t([[0.25, 0.15], [0.20, 0.19]]),
                           residuals=torch.randn(2, 2, 4, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(0)))


EXPECTED = {  # name: (needs_reference, images_per_record, data_kind, needs_residuals)
    "dpo": (True, 2, "pair", False),
    "sft": (False, 1, "pair", False),
    "npo": (True, 2, "pair", False),
    "sdpo": (True, 2, "pair", True),
    "mapo": (False, 2, "pair", False),
    "kto": (True, 1, "labelled", False),
    "smpo": (True, 2, "scored_pair", False),
    "rank_dpo": (True, None, "ranked", False),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_registry_fields_defaults_and_detached_scalar_metrics(name):
    assert name in available_objectives()
    objective = get_objective(name)
    fields = (objective.needs_reference, objective.images_per_record, objective.data_kind, objective.needs_residuals)
    assert fields == EXPECTED[name]
    params = objective.parse_params({})
    assert isinstance(params, objective.params_cls)
    if name not in ("dpo", "sft"):
        assert objective.description and objective.source
    out = objective(sample_inputs(name), params)
    assert out.loss.ndim == 0 and out.loss.requires_grad and torch.isfinite(out.loss)
    for key, value in out.metrics.items():
        assert isinstance(value, torch.Tensor) and value.ndim == 0, key
        assert not value.requires_grad and torch.isfinite(value), key


@pytest.mark.parametrize(("name", "typo", "meant"), [
    ("npo", "betta", "beta"), ("sdpo", "muu", "mu"), ("mapo", "temprature", "temperature"),
    ("kto", "lambda_desirabel", "lambda_desirable"), ("smpo", "smoothing_scal", "smoothing_scale"),
    ("rank_dpo", "bta", "beta"),
])
def test_unknown_param_names_the_closest(name, typo, meant):
    with pytest.raises(ConfigError, match=f"Did you mean '{meant}'"):
        get_objective(name).parse_params({typo: 1.0})


@pytest.mark.parametrize(("name", "raw", "message"), [
    ("npo", {"variant": "squared"}, "variant"), ("sdpo", {"mu": 1.5}, "mu"), ("mapo", {"temperature": 0}, "temperature"),
    ("kto", {"beta": -1}, "beta"), ("smpo", {"score_min": 0.3}, "score_max"), ("rank_dpo", {"beta": 0}, "beta"),
])
def test_invalid_param_values_are_config_errors(name, raw, message):
    with pytest.raises(ConfigError, match=message):
        get_objective(name).parse_params(raw)
