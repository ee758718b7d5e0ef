"""RankDPO: ranked preference optimization (Karthik et al., 2024, "Scalable Ranked Preference Optimization for
Text-to-Image Generation").

Paper: https://arxiv.org/abs/2410.18013. There is no public code: this is reconstructed from the paper.

Intuition: with K images per prompt ranked by reward models, use every ordered pair as a Diffusion-DPO pair, and
weight each pair LambdaLoss-style (DCG-like) by how much swapping the two would change the ranking quality: pairs
near the top and pairs far apart in score count more.

For one record with scores s, policy errors L and reference errors R over its K images:

    rank_i  = 1-based position in a stable descending sort of s (1 = best)
    psi_i   = #{j : s_j < s_i} / (K - 1)                       (normalised win count)
    Delta_ij = |2**psi_i - 2**psi_j| * |1/log(1 + rank_i) - 1/log(1 + rank_j)|     (natural log)
    term_ij  = -logsigmoid(0.5 * beta * ((R_i - R_j) - (L_i - L_j)))               (i the better image)
    loss(record) = sum over pairs with s_i > s_j of Delta_ij * term_ij

and the batch loss is the mean over records. The sum is not normalised (as written in the paper), so the loss
scale grows with K. Pairs with equal scores get no term (a tie is no preference; their stable-sort ranks differ
only by input order). A record whose scores are all equal contributes 0.

Reconstruction choices: 0.5-factor beta convention of dpo.py with default beta = 5000 (the paper builds on
Diffusion-DPO); natural log in the discount (the base only rescales Delta by a constant).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.objectives.base import (
    Objective,
    ObjectiveInputError,
    ObjectiveInputs,
    ObjectiveOutput,
    check_positive,
    register_objective,
)
from diffalign.objectives.dpo import dpo_losses


@dataclass
class RankDPOParams:
    beta: float = 5000.0  # 0.5-factor convention, as dpo.py

    def __post_init__(self):
        check_positive(self, "beta")


def rank_dpo_weights(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) scores -> (valid, Delta), both (B, K, K); valid[b, i, j] is s_i > s_j, Delta is 0 elsewhere."""
    batch, k = scores.shape
    valid = scores[:, :, None] > scores[:, None, :]
    psi = valid.sum(-1).to(scores.dtype) / max(k - 1, 1)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    positions = torch.arange(1, k + 1, device=scores.device).expand(batch, k)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    gain = 2.0**psi
    discount = 1.0 / torch.log1p(ranks.to(scores.dtype))
    delta = (gain[:, :, None] - gain[:, None, :]).abs() * (discount[:, :, None] - discount[:, None, :]).abs()
    return valid, delta * valid


def rank_dpo_objective(inputs: ObjectiveInputs, params: RankDPOParams) -> ObjectiveOutput:
    if inputs.ref_err is None:
        raise ObjectiveInputError("RankDPO needs reference errors")
    if inputs.scores is None:
        raise ObjectiveInputError("RankDPO needs reward scores for every image of each record")
    policy, ref = inputs.policy_err, inputs.ref_err
    if inputs.scores.shape != policy.shape:
        raise ObjectiveInputError(f"scores shape {tuple(inputs.scores.shape)} != errors shape {tuple(policy.shape)}")
    valid, delta = rank_dpo_weights(inputs.scores.detach().to(policy.dtype))
    # every ordered pair (i, j) as a DPO pair with i in the winner slot; only s_i > s_j keep a weight
    terms, logits = dpo_losses(policy[:, :, None], policy[:, None, :], ref[:, :, None], ref[:, None, :], params.beta)
    loss = (delta * terms).sum(dim=(1, 2)).mean()

    logits = logits.detach()
    n_valid = valid.sum()
    hits = ((logits > 0).to(policy.dtype) + 0.5 * (logits == 0).to(policy.dtype)) * valid
    neutral = torch.full((), 0.5, dtype=policy.dtype, device=policy.device)
    metrics = {
        # over valid pairs only; 0.5 when the batch has none
        "implicit_acc": torch.where(n_valid > 0, hits.sum() / n_valid.clamp(min=1), neutral),
        "valid_pairs": n_valid.to(policy.dtype) / policy.shape[0],  # per record
        "pair_weight": delta.sum() / n_valid.clamp(min=1),  # mean Delta over valid pairs
        "policy_mse": policy.detach().mean(),
        "ref_mse": ref.detach().mean(),
    }
    return ObjectiveOutput(loss=loss, metrics=metrics)


register_objective(
    Objective(
        name="rank_dpo",
        params_cls=RankDPOParams,
        loss_fn=rank_dpo_objective,
        images_per_record=None,
        data_kind="ranked",
        description="RankDPO: DPO over all ranked pairs of K images, LambdaLoss (DCG) pair weights",
        source="Karthik et al. 2024, arXiv 2410.18013 (reconstructed; no public code)",
    )
)
