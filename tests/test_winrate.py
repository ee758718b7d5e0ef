"""Win rates and bootstrap intervals on hand-made paired scores."""

import pytest
import torch

from diffalign.evaluation import bootstrap_interval, compare


def test_win_rate_counts_ties_half_and_reports_means():
    result = compare(torch.tensor([2.0, 1.0, 3.0, 5.0]), torch.tensor([1.0, 1.0, 4.0, 0.0]))
    assert (result.rate, result.wins, result.ties, result.n) == (0.625, 2, 1, 4)
    assert result.mean_aligned == pytest.approx(2.75) and result.mean_base == pytest.approx(1.5)
    assert compare(torch.ones(5), torch.ones(5)).rate == 0.5  # identical setups: exactly even


def test_bootstrap_interval_contains_the_rate_narrows_with_n_and_is_deterministic():
    generator = torch.Generator().manual_seed(0)
    small = (torch.rand(40, generator=generator) < 0.8).float()
    large = (torch.rand(4000, generator=generator) < 0.8).float()
    low_s, high_s = bootstrap_interval(small, resamples=2000)
    low_l, high_l = bootstrap_interval(large, resamples=2000)
    assert low_s <= small.mean() <= high_s and low_l <= large.mean() <= high_l
    assert high_l - low_l < (high_s - low_s) / 5  # ~1/sqrt(100) of the width
    assert 0.5 < low_l  # 80% wins over 4000 pairs: the interval excludes an even split
    assert bootstrap_interval(small, resamples=2000) == (low_s, high_s)
    assert bootstrap_interval(torch.ones(10)) == (1.0, 1.0)


def test_normal_approximation_agrees_with_the_bootstrap():
    values = (torch.rand(2000, generator=torch.Generator().manual_seed(1)) < 0.7).float()
    low, high = bootstrap_interval(values, resamples=4000)
    p, n = values.mean().item(), values.numel()
    half_width = 1.96 * (p * (1 - p) / n) ** 0.5
    assert low == pytest.approx(p - half_width, abs=0.005) and high == pytest.approx(p + half_width, abs=0.005)


def test_mismatched_scores_are_refused():
    with pytest.raises(ValueError, match="one length"):
        compare(torch.ones(3), torch.ones(4))
