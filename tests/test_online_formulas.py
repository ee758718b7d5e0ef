"""Online RL formulas, each against an independent computation.

- Sampling: the DDIM grid and DDIM-with-eta transition against diffusers' ``DDIMScheduler`` (epsilon and v, every
  kind of step, the final alpha); ``gaussian_log_prob`` against ``torch.distributions.Normal``; the Flow-GRPO SDE
  (and its ODE) and DDIM (eta 0 and 1) carry N(0, 1) noise to 1-D Gaussian data with the exact denoiser, while a
  drift without its score correction does not; ``sample_trajectory`` on tiny SD1.5 / SD3 with CFG: stored
  log-probabilities against diffusers' step (SD) or the paper's SDE written out (SD3), deterministic steps
  outside the window, per-image generators (repeatable, independent of the batch).
- Advantages: group / global std, DDPO's per-prompt tracker (min count, buffer, JSON round trip), sigmoid
  preferences and win rates, pairwise matrices, NFT's optimality, Pref-GRPO's explicit preferences, by hand.
- Losses: GRPO's clipped surrogate, its metrics and its gradient at ratio 1; the Gaussian KL; DiffusionNFT's loss
  written out, and the sign of its gradient (r = 1 pulls the x0 estimate to the data, r = 0 pushes it away).
"""

import json
import math
from statistics import fmean, pstdev
from types import SimpleNamespace

import numpy
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from diffalign.config import ModelConfig
from diffalign.errors import ConfigError
from diffalign.families import load_components
from diffalign.families.sd import StableDiffusionFamily
from diffalign.objectives.online import GRPOParams, NFTParams, PrefGRPOParams, ScoredRound
from diffalign.offline.models import sd15_scheduler_config
from diffalign.offline.specs import resolve_model_spec
from diffalign.online.advantages import (
    PromptStatTracker,
    group_advantages,
    optimality,
    pair_indices,
    preferences_from_pairs,
    sigmoid_preferences,
    win_rates,
)
from diffalign.online.losses import gaussian_kl, grpo_loss, nft_loss
from diffalign.online.sampling import (
    Gaussian,
    SamplerSettings,
    ddim_transition,
    flow_sde_transition,
    gaussian_log_prob,
    sample_trajectory,
    sampling_grid,
    transition,
)

F64 = torch.float64


def sd_components(**overrides):
    return SimpleNamespace(noise_scheduler=DDPMScheduler.from_config({**sd15_scheduler_config(), **overrides}))


# ---------------------------------------------------------------------------------------------- DDIM vs diffusers
# SD1.5's leading spacing; trailing (10 divides 1000); the final alpha 1, also where the last step's previous
# timestep is 0 (600 leading steps: timesteps 600 ... 1), which takes alphas_cumprod[0], not the final alpha
@pytest.mark.parametrize("config, steps", [({}, 7), ({"timestep_spacing": "trailing"}, 10),
                                           ({"timestep_spacing": "trailing"}, 7),  # uneven: t - T // S, not the grid
                                           ({"timestep_spacing": "linspace"}, 10),
                                           ({"set_alpha_to_one": True}, 7), ({"set_alpha_to_one": True}, 600)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_transition_is_diffusers_ddim_step_with_eta(config, steps, prediction_type, eta):
    overrides = {"prediction_type": prediction_type, **config}
    family, components = StableDiffusionFamily(), sd_components(**overrides)
    grid = sampling_grid(family, components, steps)
    reference = DDIMScheduler.from_config({**sd15_scheduler_config(), **overrides})
    reference.set_timesteps(steps)
    assert torch.equal(grid.timesteps, reference.timesteps.long())
    generator = torch.Generator().manual_seed(0)
    settings = SamplerSettings(steps=steps, eta=eta)
    for i in (0, steps // 2, steps - 1):  # the last step goes to the final level
        x, pred = (torch.randn(3, 4, 2, 2, generator=generator) for _ in range(2))
        t, prev_t = int(grid.timesteps[i]), int(grid.timesteps[i]) - 1000 // steps
        index = torch.full((3,), i)
        noisy = transition(family, components, grid, settings, x, pred, index, torch.ones(3, dtype=torch.bool))
        expected = reference.step(pred, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        torch.testing.assert_close(noisy.mean, expected, rtol=1e-5, atol=1e-5)
        std = eta * reference._get_variance(t, prev_t).sqrt()
        # 1 - alpha^2 / alpha'^2 cancels between adjacent timesteps: float32 levels give ~1e-5 relative there
        torch.testing.assert_close(noisy.std, std.float().expand(3, 1, 1, 1), rtol=1e-4, atol=1e-7)
        plain = transition(family, components, grid, settings, x, pred, index, torch.zeros(3, dtype=torch.bool))
        torch.testing.assert_close(plain.mean, reference.step(pred, t, x, eta=0.0).prev_sample, rtol=1e-5, atol=1e-5)
        assert torch.equal(plain.std, torch.zeros(3, 1, 1, 1))


def test_gaussian_log_prob_is_the_element_mean_of_the_normal_log_density():
    generator = torch.Generator().manual_seed(1)
    mean, sample = (torch.randn(5, 3, 2, 4, generator=generator, dtype=F64) for _ in range(2))
    std = torch.rand(5, 1, 1, 1, generator=generator, dtype=F64) + 0.05
    expected = torch.distributions.Normal(mean, std).log_prob(sample).mean(dim=(1, 2, 3))
    got = gaussian_log_prob(sample, Gaussian(mean, std))
    assert got.shape == (5,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- marginals
# Data x0 ~ N(M, S^2). With N = 20000 chains the standard errors of the final mean and std are S / sqrt(N) = 0.0035
# and S / sqrt(2N) = 0.0025; both samplers are first order, and their bias at these step counts (measured with
# 200000 chains, halving as the steps double) is < 0.004 (flow, 200 steps) and 0.016 on the std (DDIM eta 1,
# 200 steps). Tolerances: 4 standard errors plus that bias. A drift without its score term misses by > 0.5.
M, S, CHAINS = 0.7, 0.5, 20_000


def flow_chain(noise_level: float, steps: int, shift: float, drop_score_term: bool = False) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps. (v, x_t) are jointly Gaussian: E[v] = -M, Cov(v, x_t) = t - (1 - t) S^2,
    Var(x_t) = (1 - t)^2 S^2 + t^2, so E[v | x_t] = -M + Cov / Var (x_t - (1 - t) M), finite at t = 0 and 1."""
    generator = torch.Generator().manual_seed(2)
    u = torch.linspace(1, 0, steps + 1, dtype=F64)
    ts = shift * u / (1 + (shift - 1) * u)
    x = torch.randn(CHAINS, 1, 1, 1, generator=generator, dtype=F64)
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = -M + (t - (1 - t) * S**2) / ((1 - t) ** 2 * S**2 + t**2) * (x - (1 - t) * M)
        x0_hat, eps_hat = x - t * v, x + (1 - t) * v
        step = flow_sde_transition(x, x0_hat, eps_hat, t, t_next, noise_level, float(ts[1]))
        mean = flow_sde_transition(x, x0_hat, eps_hat, t, t_next, 0.0, float(ts[1])).mean if drop_score_term \
            else step.mean
        x = mean + step.std * torch.randn(x.shape, generator=generator, dtype=F64)
    return x


@pytest.mark.parametrize("noise_level, shift", [(0.7, 1.0), (0.7, 3.0), (0.0, 1.0)])
def test_flow_sde_carries_noise_to_the_data_distribution(noise_level, shift):
    x = flow_chain(noise_level, 200, shift)
    assert x.mean().item() == pytest.approx(M, abs=0.015)
    assert x.std().item() == pytest.approx(S, abs=0.015)
    if noise_level:  # the same noise without the sigma_t^2 / (2 t) correction: clearly not the data
        assert flow_chain(noise_level, 200, shift, drop_score_term=True).std().item() > S + 0.5


def ddim_chain(eta: float, steps: int, drop_noise_correction: bool = False) -> tuple[torch.Tensor, float, float]:
    """SD1.5's levels (alpha^2 + sigma^2 = 1); E[eps | x_t] = sigma / (alpha^2 S^2 + sigma^2) (x_t - alpha M).
    Starts from the exact marginal at the first level; returns the final x and its level."""
    grid = sampling_grid(StableDiffusionFamily(), sd_components(), steps)
    alpha, sigma = torch.cat([grid.alpha, grid.alpha_next[-1:]]).double(), torch.cat([grid.sigma, grid.sigma_next[-1:]]).double()
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha))
    torch.testing.assert_close(grid.alpha_next[:-1], grid.alpha[1:])  # evenly spaced: step i reaches step i + 1
    generator = torch.Generator().manual_seed(3)
    x = alpha[0] * M + (alpha[0] ** 2 * S**2 + sigma[0] ** 2).sqrt() * torch.randn(CHAINS, 1, 1, 1, generator=generator,
                                                                                    dtype=F64)
    for i in range(steps):
        a, s, a_next, s_next = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
        eps_hat = s / (a**2 * S**2 + s**2) * (x - a * M)
        x0_hat = (x - s * eps_hat) / a
        step = ddim_transition(x0_hat, eps_hat, a, s, a_next, s_next, eta)
        mean = ddim_transition(x0_hat, eps_hat, a, s, a_next, s_next, 0.0).mean if drop_noise_correction \
            else step.mean
        x = mean + step.std * torch.randn(x.shape, generator=generator, dtype=F64)
    return x, float(alpha[-1]), float(sigma[-1])


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_ddim_with_eta_carries_noise_to_the_data_distribution(eta):
    x, a_end, s_end = ddim_chain(eta, 200)
    assert a_end == pytest.approx(math.sqrt(1 - 0.00085), rel=1e-6)  # the final alpha: alphas_cumprod[0]
    assert x.mean().item() == pytest.approx(a_end * M, abs=0.015)
    assert x.std().item() == pytest.approx(math.sqrt(a_end**2 * S**2 + s_end**2), abs=0.03)
    if eta:  # eta's noise on top of the deterministic mean (no sqrt(sigma'^2 - s^2) direction): clearly off
        assert ddim_chain(eta, 200, drop_noise_correction=True)[0].std().item() > S + 0.5


# ---------------------------------------------------------------------------------------------- trajectories
@pytest.fixture(scope="module", params=["tiny:sd15", "tiny:sd3", "tiny:flux"])
def tiny(request):
    components = load_components(ModelConfig(pretrained=resolve_model_spec(request.param)))
    components.denoiser.eval()
    return components.family, components


def sample(family, components, settings, prompts, seeds):
    cond, uncond = family.encode_prompts(components, prompts), family.encode_prompts(components, [""] * len(prompts))
    for values in (cond, uncond):  # FLUX.1-dev's embedded guidance value, in both branches
        values.update(family.run_cond(components, len(prompts), "cpu"))
    grid = sampling_grid(family, components, settings.steps)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return sample_trajectory(family, components, components.denoiser, grid, settings, cond, uncond, generators,
                             "cpu", torch.float32), cond, uncond


def reference_step(family, components, cond, uncond, steps, i, x, noise_level, guidance):
    """The step's mean and std from CFG as two separate calls, then diffusers' DDIM step (SD) or the Flow-GRPO
    SDE in its reference form (SD3: x (1 + s^2 dt / 2t) + v (1 + s^2 (1 - t) / 2t) dt, s = a sqrt(t / (1 - t)),
    at t = 1 the second sigma replacing the t of the denominator only, as yifan123/flow_grpo does:
    s = a sqrt(1 / (1 - sigma_1)))."""
    config, model = components.noise_scheduler.config, components.denoiser
    scheduler = (FlowMatchEulerDiscreteScheduler if family.flow_matching else DDIMScheduler).from_config(config)
    if family.name == "flux":  # as FluxPipeline sets them: linspace(1, 1/S, S), shifted with mu of the image tokens
        mu = calculate_shift((x.shape[-1] // 2) * (x.shape[-2] // 2), config.base_image_seq_len,
                             config.max_image_seq_len, config.base_shift, config.max_shift)
        scheduler.set_timesteps(sigmas=list(numpy.linspace(1.0, 1 / steps, steps)), mu=mu)
    else:
        scheduler.set_timesteps(steps)
    t = scheduler.timesteps[i].expand(len(x))
    p_cond, p_uncond = (family.predict(model, x, t, c) for c in (cond, uncond))
    pred = p_uncond + guidance * (p_cond - p_uncond)
    if not family.flow_matching:
        t, prev_t = int(t[0]), int(t[0]) - config.num_train_timesteps // steps
        mean = scheduler.step(pred, t, x, eta=noise_level, variance_noise=torch.zeros_like(x)).prev_sample
        return mean, noise_level * scheduler._get_variance(t, prev_t).sqrt()
    sigma, sigma_next = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])
    dt, t_denominator = sigma_next - sigma, float(scheduler.sigmas[1]) if sigma == 1 else sigma
    s = noise_level * math.sqrt(sigma / (1 - t_denominator))
    mean = x * (1 + s**2 * dt / (2 * sigma)) + pred * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, torch.tensor(s * math.sqrt(-dt))


@pytest.mark.parametrize("window", [(1, 5), (0, 3)])  # deterministic last or first step, stochastic other
def test_sample_trajectory_log_probs_are_the_densities_of_its_own_steps(tiny, window):
    family, components = tiny
    settings = SamplerSettings(steps=5, guidance_scale=3.0, eta=1.0, noise_level=0.7, window=window)
    traj, cond, uncond = sample(family, components, settings, ["a red cube", "a blue ball"], [5, 6])
    shape = traj.latents.shape[2:]
    assert traj.latents.shape[:2] == (2, 6) and traj.log_probs.shape == (2, 5)
    for k, seed in enumerate((5, 6)):  # chain k's initial noise is the first draw of its own generator
        assert torch.equal(traj.latents[k, 0], torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
    noise = settings.eta if not family.flow_matching else settings.noise_level
    with torch.no_grad():
        for i in range(5):
            x, x_next = traj.latents[:, i], traj.latents[:, i + 1]
            stochastic = window[0] <= i < window[1]
            mean, std = reference_step(family, components, cond, uncond, 5, i, x, noise * stochastic, 3.0)
            if stochastic:
                expected = torch.distributions.Normal(mean.double(), std.double()).log_prob(x_next.double())
                torch.testing.assert_close(traj.log_probs[:, i].double(), expected.mean(dim=(1, 2, 3)),
                                           rtol=0, atol=1e-4)
                assert (x_next - mean).abs().max() > 1e-3  # noise was drawn
            else:
                assert torch.equal(traj.log_probs[:, i], torch.zeros(2))
                torch.testing.assert_close(x_next, mean, rtol=1e-5, atol=1e-5)


def test_chains_repeat_with_their_generators_and_ignore_their_batch(tiny):
    family, components = tiny
    settings = SamplerSettings(steps=4, guidance_scale=3.0)
    prompts, seeds = ["a", "b cat", "c dog on grass", "d"], [10, 11, 12, 13]
    first, again = (sample(family, components, settings, prompts, seeds)[0] for _ in range(2))
    assert torch.equal(first.latents, again.latents) and torch.equal(first.log_probs, again.log_probs)
    alone = sample(family, components, settings, prompts[2:3], seeds[2:3])[0]
    # float32 rounding of a batch of 4 vs 1 (about 1e-6 relative; tiny SD1.5's latents reach 15 with CFG 3)
    torch.testing.assert_close(alone.latents[0], first.latents[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone.log_probs[0], first.log_probs[2], rtol=1e-5, atol=1e-5)
    assert (first.latents[1] - first.latents[2]).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------- advantages
def test_group_advantages_by_hand():
    rewards = [1.0, 2.0, 4.0, 0.5, 0.5, 0.5, -3.0, 0.0, 9.0]
    groups = [rewards[0:3], rewards[3:6], rewards[6:9]]
    by_hand = [(r - fmean(g)) / (pstdev(g) + 1e-4) for g in groups for r in g]
    got = group_advantages(torch.tensor(rewards), 3)
    torch.testing.assert_close(got.double(), torch.tensor(by_hand, dtype=F64), rtol=1e-6, atol=1e-6)
    assert got[3:6].abs().max() == 0  # equal rewards: 0, not NaN
    assert got.view(3, 3).sum(dim=1).abs().max() < 1e-5
    global_std = pstdev(rewards)
    by_hand = [(r - fmean(g)) / (global_std + 1e-4) for g in groups for r in g]
    torch.testing.assert_close(group_advantages(torch.tensor(rewards), 3, "global").double(),
                               torch.tensor(by_hand, dtype=F64), rtol=1e-6, atol=1e-6)
    assert torch.equal(GRPOParams(std="global").advantages(ScoredRound(torch.tensor(rewards), list("abcdefghi"), 3),
                                                           None), group_advantages(torch.tensor(rewards), 3, "global"))


def test_prompt_stat_tracker_switches_to_its_buffer_and_round_trips_through_json():
    tracker = PromptStatTracker(buffer_size=4, min_count=3)
    prompts = ["a", "a", "b"]

    def check(rewards, stats):  # stats: prompt -> the values its mean and std come from
        got = tracker.advantages(prompts, torch.tensor(rewards))
        by_hand = [(r - fmean(stats[p])) / (pstdev(stats[p]) + 1e-4) for p, r in zip(prompts, rewards)]
        torch.testing.assert_close(got.double(), torch.tensor(by_hand, dtype=F64), rtol=1e-6, atol=1e-6)

    check([1.0, 2.0, 5.0], {"a": [1.0, 2.0, 5.0], "b": [1.0, 2.0, 5.0]})  # a: 2 seen, b: 1 -> the round's
    check([3.0, 4.0, 6.0], {"a": [1.0, 2.0, 3.0, 4.0], "b": [3.0, 4.0, 6.0]})  # a: 4 -> its buffer; b: 2 -> round
    check([7.0, 8.0, 9.0], {"a": [3.0, 4.0, 7.0, 8.0], "b": [5.0, 6.0, 9.0]})  # a keeps its last 4; b: 3 -> buffer
    state = json.loads(json.dumps(tracker.state_dict()))
    restored = PromptStatTracker(buffer_size=4, min_count=3)
    restored.load_state_dict(state)
    assert state["buffers"] == {"a": [3.0, 4.0, 7.0, 8.0], "b": [5.0, 6.0, 9.0]}
    following = torch.tensor([0.0, 10.0, 2.0])
    assert torch.equal(restored.advantages(prompts, following), tracker.advantages(prompts, following))
    params = GRPOParams(stat_buffer=4, stat_min_count=3)  # the objective routes through its tracker
    assert torch.equal(params.advantages(ScoredRound(following, prompts, 3), params.tracker()),
                       PromptStatTracker(4, 3).advantages(prompts, following))


def test_sigmoid_preferences_win_rates_pairs_and_optimality_by_hand():
    def sig(z):
        return 1 / (1 + math.exp(-z))

    rewards, temperature = [0.0, 1.0, 3.0], 2.0
    p = [[sig((ri - rj) / temperature) for rj in rewards] for ri in rewards]
    preferences = sigmoid_preferences(torch.tensor(rewards), 3, temperature)
    torch.testing.assert_close(preferences[0], torch.tensor(p, dtype=F64))
    wins = [(sum(p[i]) - p[i][i]) / 2 for i in range(3)]
    torch.testing.assert_close(win_rates(preferences).double(), torch.tensor(wins, dtype=F64), rtol=1e-6, atol=1e-7)
    first, second = pair_indices(3)
    assert first.tolist() == [0, 0, 1] and second.tolist() == [1, 2, 2]
    probabilities = torch.tensor([[0.9, 0.2, 0.6], [0.5, 0.1, 0.3]])
    matrix = preferences_from_pairs(probabilities, 3)
    torch.testing.assert_close(matrix + matrix.transpose(1, 2), torch.ones(2, 3, 3, dtype=F64))
    assert torch.equal(matrix.diagonal(dim1=1, dim2=2), torch.full((2, 3), 0.5, dtype=F64))
    assert matrix[0, 0, 1].item() == pytest.approx(0.9) and matrix[0, 2, 1].item() == pytest.approx(0.4)
    advantages = torch.tensor([-10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 10.0])
    assert optimality(advantages, 5.0).tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_pref_grpo_uses_explicit_preferences_and_nft_the_optimality_of_global_advantages():
    rewards = torch.tensor([3.0, 2.0, 1.0])  # the rewards rank 0 > 1 > 2; the judge says the opposite
    preferences = preferences_from_pairs(torch.tensor([[0.2, 0.1, 0.3]]), 3)
    wins = [(0.2 + 0.1) / 2, (0.8 + 0.3) / 2, (0.9 + 0.7) / 2]
    by_hand = [(w - fmean(wins)) / (pstdev(wins) + 1e-4) for w in wins]
    got = PrefGRPOParams().advantages(ScoredRound(rewards, ["p"] * 3, 3, preferences), None)
    torch.testing.assert_close(got.double(), torch.tensor(by_hand, dtype=F64), rtol=1e-5, atol=1e-6)
    assert got[2] > got[1] > got[0]
    from_rewards = PrefGRPOParams().advantages(ScoredRound(rewards, ["p"] * 3, 3), None)
    assert from_rewards[0] > from_rewards[1] > from_rewards[2]
    rewards = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0, 12.0])
    a = [(r - m) / (pstdev(rewards.tolist()) + 1e-4) for r, m in zip(rewards.tolist(), [1.0] * 3 + [11.0] * 3)]
    expected = [min(max(x, -0.5), 0.5) / 1.0 + 0.5 for x in a]
    got = NFTParams(advantage_clip=0.5).advantages(ScoredRound(rewards, list("aaabbb"), 3), None)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=F64), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- losses
def test_grpo_loss_and_metrics_by_hand():
    ratios = [1.5, 0.5, 1.1, 0.9, 1.5, 0.5, 1.0]
    advantages = torch.tensor([2.0, 2.0, -1.0, 1.0, -3.0, -3.0, 7.0])  # the last is clipped to 5
    old = torch.randn(7, generator=torch.Generator().manual_seed(4), dtype=F64)
    log_prob = old + torch.tensor(ratios, dtype=F64).log()
    # per sample max(-A r, -A clip(r, 0.8, 1.2)): A > 0 gains nothing past 1.2 and pays in full below 0.8, A < 0
    # the reverse; inside the range both terms agree
    per_sample = [-2 * 1.2, -2 * 0.5, 1.1, -0.9, 3 * 1.5, 3 * 0.8, -5.0]
    loss, metrics = grpo_loss(log_prob, old, advantages, clip_range=0.2, advantage_clip=5.0)
    assert loss.item() == pytest.approx(fmean(per_sample), rel=1e-6)
    assert metrics["clip_fraction"].item() == pytest.approx(4 / 7)
    assert metrics["ratio_mean"].item() == pytest.approx(fmean(ratios), rel=1e-6)
    assert metrics["ratio_max"].item() == pytest.approx(1.5, rel=1e-6)
    assert metrics["approx_kl"].item() == pytest.approx(0.5 * fmean([math.log(r) ** 2 for r in ratios]), rel=1e-5)
    # on-policy (the first epoch): ratio exactly 1, d loss / d log_prob = -clip(A) / N
    current = old.clone().requires_grad_()
    loss, metrics = grpo_loss(current, old, advantages, clip_range=1e-4, advantage_clip=5.0)
    assert metrics["ratio_mean"].item() == 1.0 and metrics["ratio_max"].item() == 1.0
    assert metrics["clip_fraction"].item() == 0.0 and metrics["approx_kl"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(current.grad, -advantages.clamp(-5, 5).double() / 7)


def test_gaussian_kl_by_hand():
    mean = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]])
    reference = torch.tensor([[[[0.5, 2.0]]], [[[1.0, 1.0]]]])
    std = torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)
    expected = [(0.25 / 0.5 + 0.0) / 2, (1 / 8 + 4 / 8) / 2]  # mean of d^2 / (2 s^2)
    torch.testing.assert_close(gaussian_kl(mean, reference, std), torch.tensor(expected))


def nft_setup(seed=7):
    generator = torch.Generator().manual_seed(seed)
    x0, eps, pred, old = (torch.randn(4, 2, 3, 3, generator=generator, dtype=F64) for _ in range(4))
    alpha = torch.tensor([0.9, 0.6, 0.3, 0.8], dtype=F64).view(4, 1, 1, 1)
    sigma = (1 - alpha**2).sqrt()
    x_t = alpha * x0 + sigma * eps
    return x0, x_t, pred, old, alpha, sigma, (lambda p: (x_t - sigma * p) / alpha)


def test_nft_loss_is_the_written_out_formula():
    x0, x_t, pred, old, alpha, sigma, clean = nft_setup()
    r, beta, c = torch.tensor([1.0, 0.0, 0.3, 0.8], dtype=F64), 0.7, 5.0
    terms = []
    for n in range(4):
        positive = beta * pred[n] + (1 - beta) * old[n]
        negative = old[n] + beta * (old[n] - pred[n])
        e_pos = (x_t[n] - sigma[n] * positive) / alpha[n] - x0[n]
        e_neg = (x_t[n] - sigma[n] * negative) / alpha[n] - x0[n]
        terms.append((r[n] * (e_pos**2).mean() / e_pos.abs().mean()
                      + (1 - r[n]) * (e_neg**2).mean() / e_neg.abs().mean()) / beta)
    loss, metrics = nft_loss(pred, old, x0, r, beta, c, clean)
    assert loss.item() == pytest.approx(c * fmean([float(term) for term in terms]), rel=1e-5)
    assert metrics["old_deviation"].item() == pytest.approx(((pred - old) ** 2).mean().item(), rel=1e-5)
    assert metrics["optimality_mean"].item() == pytest.approx(r.mean().item(), rel=1e-6)


def test_nft_gradient_at_the_old_policy_moves_x0_by_2r_minus_1_along_the_error():
    x0, x_t, pred, _, alpha, sigma, clean = nft_setup(8)
    r, c = torch.tensor([1.0, 0.0, 0.5, 0.8], dtype=F64), 5.0
    pred = pred.clone().requires_grad_()
    loss, _ = nft_loss(pred, pred.detach().clone(), x0, r, 1.0, c, clean)
    loss.backward()
    # p+ = p- = p: d/dp [r |e|^2 / w - (1 - r) |e|^2 / w] with de/dp = -sigma / alpha, |.|^2 a mean of K elements
    error = clean(pred.detach()) - x0
    weight = error.abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = c / 4 * (2 * r - 1).view(4, 1, 1, 1) * 2 * error / (18 * weight) * (-sigma / alpha)
    torch.testing.assert_close(pred.grad, expected, rtol=1e-4, atol=1e-7)
    stepped = clean(pred.detach() - 1e-2 * pred.grad)
    before, after = (error**2).mean(dim=(1, 2, 3)), ((stepped - x0) ** 2).mean(dim=(1, 2, 3))
    assert after[0] < before[0] and after[1] > before[1] and after[3] < before[3]  # r = 1 and 0.8 pull, r = 0 pushes
    assert pred.grad[2].abs().max() < 1e-6  # r = 1/2: no signal


def test_a_ddim_grid_past_the_training_timesteps_is_refused():
    with pytest.raises(ConfigError, match="online.sample_steps=1000 puts a DDIM step past"):
        sampling_grid(StableDiffusionFamily(), sd_components(), 1000)
