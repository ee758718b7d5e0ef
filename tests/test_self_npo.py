"""Self-NPO: the pure functions against their formulas, the family's noise levels and prediction split (epsilon,
v, sample), and the teacher's DDIM chain on a toy; end to end: test_self_npo_training.py."""

import contextlib

import pytest
import torch

from diffalign.config import (
    Config,
    ConfigError,
    LoraConfig,
    ObjectiveConfig,
    resolve_reference,
)
from diffalign.families.sd import StableDiffusionFamily
from diffalign.objectives import get_objective
from diffalign.objectives.self_npo import (
    SelfNPOParams,
    ddim_step,
    guided_prediction,
    pseudo_huber,
    renoise_variance_exploding,
)
from diffalign.training.self_npo import ddim_grid, self_npo_step, teacher_targets

F64 = torch.float64
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def exact_prediction(prediction_type: str, x0, eps, alpha, sigma):
    """What a perfect denoiser outputs at x_t = alpha x0 + sigma eps."""
    return {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}[prediction_type]


def schedule(t):
    """alpha_t, sigma_t of the SD1.5 schedule at t (an int or a list), as (N, 1, 1, 1) tensors."""
    from diffusers import DDPMScheduler

    from diffalign.offline.models import sd15_scheduler_config

    alphas_cumprod = DDPMScheduler.from_config(sd15_scheduler_config()).alphas_cumprod.to(F64)
    a = alphas_cumprod[t]
    return a.sqrt().view(-1, 1, 1, 1), (1 - a).sqrt().view(-1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------- pure functions
def test_pseudo_huber_matches_formula_and_limits():
    pred = torch.tensor([[0.5, -2.0], [0.0, 3.0]], dtype=F64)
    target = torch.tensor([[0.0, 1.0], [0.25, -1.0]], dtype=F64)
    c = 0.3
    d = pred - target
    assert pseudo_huber(pred, target, c).item() == pytest.approx((torch.sqrt(d**2 + c**2) - c).mean().item())
    # c -> 0: the mean absolute error; small residuals: quadratic, d^2 / 2c
    assert pseudo_huber(pred, target, 1e-6).item() == pytest.approx(d.abs().mean().item(), abs=1e-5)
    tiny = torch.full((4,), 1e-4, dtype=F64)
    assert pseudo_huber(tiny, torch.zeros(4, dtype=F64), 0.1).item() == pytest.approx(1e-8 / 0.2, rel=1e-3)
    assert pseudo_huber(target, target, 0.001).item() == 0.0


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_split_prediction_recovers_x0_and_eps_and_ddim_steps_along_the_noising_line(prediction_type):
    generator = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(3, 4, 3, 3, generator=generator, dtype=F64) for _ in range(2))
    (alpha, sigma), (a_p, s_p) = schedule([1, 599, 999]), schedule([0, 399, 959])  # almost clean to almost noise
    x_t = alpha * x0 + sigma * eps
    pred = exact_prediction(prediction_type, x0, eps, alpha, sigma)
    x0_hat, eps_hat = StableDiffusionFamily().split_prediction(ToyComponents(prediction_type), pred, x_t, alpha, sigma)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)
    torch.testing.assert_close(ddim_step(x0_hat, eps_hat, a_p, s_p), a_p * x0 + s_p * eps)


def test_split_prediction_refuses_an_unknown_prediction_type():
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="unsupported prediction_type 'flow'"):
        StableDiffusionFamily().split_prediction(ToyComponents("flow"), x, x, torch.ones(1), torch.ones(1))


def test_noise_levels_are_the_square_roots_of_the_scaled_linear_schedule_by_hand():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2  # SD1.5: scaled_linear, 1000 steps
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    family, components = StableDiffusionFamily(), ToyComponents()
    t = torch.tensor([0, 1, 39, 500, 998, 999])
    alpha, sigma = family.noise_levels(components, t)
    assert alpha.dtype == sigma.dtype == torch.float32 and alpha.shape == sigma.shape == (6,)
    assert alpha.device.type == sigma.device.type == "cpu"
    # the scheduler's betas are float32: 1e-5 relative at t = 0, where sigma = sqrt(beta_0)
    torch.testing.assert_close(alpha.double(), alphas_cumprod[t].sqrt(), rtol=5e-5, atol=0)
    torch.testing.assert_close(sigma.double(), (1 - alphas_cumprod[t]).sqrt(), rtol=5e-5, atol=0)
    assert family.num_train_timesteps(components) == 1000


def test_guided_prediction_and_that_guiding_raw_predictions_guides_x0_and_eps_alike():
    cond, uncond = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    torch.testing.assert_close(guided_prediction(cond, uncond, -1.0), uncond)
    torch.testing.assert_close(guided_prediction(cond, uncond, 0.0), cond)
    torch.testing.assert_close(guided_prediction(cond, uncond, -5.0), cond - 5.0 * (cond - uncond))
    torch.testing.assert_close(guided_prediction(cond, uncond, 6.5), uncond + 7.5 * (cond - uncond))  # CFG 7.5
    # the weights sum to 1 and the split is affine in the prediction: guide first or split first, the same
    generator = torch.Generator().manual_seed(5)
    x_t, p_cond, p_uncond = (torch.randn(2, 4, 2, 2, generator=generator, dtype=F64) for _ in range(3))
    alpha, sigma = schedule(599)
    for prediction_type in PREDICTION_TYPES:
        family, components = StableDiffusionFamily(), ToyComponents(prediction_type)
        (x0_c, eps_c), (x0_u, eps_u) = (family.split_prediction(components, p, x_t, alpha, sigma)
                                        for p in (p_cond, p_uncond))
        x0_g, eps_g = family.split_prediction(components, guided_prediction(p_cond, p_uncond, -5.0), x_t, alpha, sigma)
        torch.testing.assert_close(x0_g, guided_prediction(x0_c, x0_u, -5.0))
        torch.testing.assert_close(eps_g, guided_prediction(eps_c, eps_u, -5.0))


def test_variance_exploding_renoise_formula_and_marginal():
    (a_e, s_e), (a_t, s_t) = schedule(200), schedule(700)
    x_prev = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    zero = torch.zeros_like(x_prev)
    torch.testing.assert_close(renoise_variance_exploding(x_prev, a_e, s_e, a_t, s_t, zero), x_prev * a_t / a_e)
    z = torch.randn_like(x_prev)
    nsr_e, nsr_t = s_e / a_e, s_t / a_t
    expected = (x_prev / a_e + torch.sqrt(nsr_t**2 - nsr_e**2) * z) * a_t
    torch.testing.assert_close(renoise_variance_exploding(x_prev, a_e, s_e, a_t, s_t, z), expected)
    # From a sample of q(x_e | x0), the result is a sample of q(x_t | x0): mean alpha_t x0, variance sigma_t^2.
    generator = torch.Generator().manual_seed(2)
    x0 = torch.full((200_000, 1, 1, 1), 0.7, dtype=F64)
    x_e = a_e * x0 + s_e * torch.randn(x0.shape, generator=generator, dtype=F64)
    x_t = renoise_variance_exploding(x_e, a_e, s_e, a_t, s_t, torch.randn(x0.shape, generator=generator, dtype=F64))
    assert x_t.mean().item() == pytest.approx((a_t * 0.7).item(), abs=0.01)
    assert x_t.var().item() == pytest.approx((s_t**2).item(), rel=0.01)


def test_params_defaults_validation_and_registration():
    objective = get_objective("self_npo")
    params = objective.parse_params({})
    assert (params.guidance_weight, params.grid_steps, params.teacher_steps, params.huber_c, params.ema_decay) == \
        (-1.0, 25, 5, 0.001, 0.999)
    assert objective.step == "self_npo" and objective.loss_fn is None and objective.needs_reference
    assert (objective.images_per_record, objective.data_kind) == (1, "images")
    for bad, match in (({"teacher_steps": 0}, "teacher_steps"), ({"huber_c": 0.0}, "huber_c"),
                       ({"ema_decay": 1.0}, "ema_decay"), ({"grid_steps": 0}, "grid_steps"),
                       ({"guidance": -1}, "Did you mean 'guidance_weight'")):
        with pytest.raises(ConfigError, match=match):
            objective.parse_params(bad)
    with pytest.raises(TypeError, match="training step procedure"):
        objective(None, params)


def test_reference_resolves_to_ema_and_none_is_refused():
    for lora in (True, False):
        cfg = Config(objective=ObjectiveConfig(name="self_npo"), lora=LoraConfig(enabled=lora))
        assert resolve_reference(cfg) == "ema"
    cfg = Config(objective=ObjectiveConfig(name="self_npo", reference="none"))
    with pytest.raises(ConfigError, match="needs a reference"):
        resolve_reference(cfg)
    assert resolve_reference(Config()) == "lora_disabled"  # other objectives unchanged


# ---------------------------------------------------------------------------------------------- the step, on a toy
class ToyFamily(StableDiffusionFamily):
    """SD's schedule and split; predict(model, x, t, cond) = model(x, t, cond): lets a test see every call."""

    def predict(self, model, x_t, timesteps, cond):
        return model(x_t, timesteps, cond)


class ToyComponents:
    def __init__(self, prediction_type="epsilon"):
        from diffusers import DDPMScheduler

        from diffalign.offline.models import sd15_scheduler_config

        self.noise_scheduler = DDPMScheduler.from_config({**sd15_scheduler_config(), "prediction_type": prediction_type})


class Recorder(torch.nn.Module):
    """A denoiser that records (t, cond) of every call; an oracle for x0 (its exact ``prediction_type`` output at
    x, with the eps that x implies) or, without x0, a constant map."""

    def __init__(self, x0=None, prediction_type="epsilon"):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.calls, self.x0, self.prediction_type = [], x0, prediction_type
        self.alpha, self.sigma = StableDiffusionFamily().noise_levels(ToyComponents(), torch.arange(1000))

    def forward(self, x, t, cond):
        self.calls.append((t.clone(), cond["c"][:, 0, 0].clone()))
        if self.x0 is None:
            return self.scale * 0.1 * x
        x0 = self.x0.repeat(len(x) // len(self.x0), 1, 1, 1).to(x.dtype)
        a, s = self.alpha[t].view(-1, 1, 1, 1).to(x.dtype), self.sigma[t].view(-1, 1, 1, 1).to(x.dtype)
        return self.scale * exact_prediction(self.prediction_type, x0, (x - a * x0) / s, a, s)


class Teacher:
    """A reference strategy whose pass is ``model`` itself."""

    def __init__(self, model):
        self.model = model

    @contextlib.contextmanager
    def model_for_pass(self, policy):
        yield self.model


def toy_inputs(batch=16):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 1, 4, 2, 2, generator=generator)
    cond, empty = {"c": torch.ones(batch, 3, 2)}, {"c": -torch.ones(1, 3, 2)}
    return latents, cond, empty


def test_teacher_runs_ddim_on_the_grid_down_to_t_e_and_predicts_x0_there():
    latents, cond, empty = toy_inputs(64)
    teacher = Recorder()
    params = SelfNPOParams()
    uncond = {"c": empty["c"].expand(64, 3, 2)}
    out = teacher_targets(ToyFamily(), ToyComponents(), teacher, latents[:, 0], cond, uncond,
                          torch.Generator().manual_seed(3), "cpu", params)
    grid, stride = ddim_grid(1000, 25)
    assert stride == 40 and grid[0] == 39 and grid[-1] == 999
    assert set(out.t_start.tolist()) <= set(grid.tolist()) and len(set(out.t_start.tolist())) > 5
    torch.testing.assert_close(out.t_end, torch.clamp(out.t_start - 200, min=0))
    assert (out.t_start < 200).any() and (out.t_start >= 200).any()  # both cases are exercised
    # 5 DDIM steps then the x0 prediction at t_e; with w = -1 only the empty prompt is evaluated
    assert len(teacher.calls) == 6
    for step, (t, c) in enumerate(teacher.calls):
        torch.testing.assert_close(t, torch.clamp(out.t_start - stride * step, min=0))
        assert (c == -1).all()
    assert torch.isfinite(out.target).all() and torch.isfinite(out.x_prev).all()


def test_guidance_weight_other_than_minus_one_batches_cond_and_uncond():
    latents, cond, empty = toy_inputs(4)
    teacher = Recorder()
    uncond = {"c": empty["c"].expand(4, 3, 2)}
    teacher_targets(ToyFamily(), ToyComponents(), teacher, latents[:, 0], cond, uncond,
                    torch.Generator().manual_seed(0), "cpu", SelfNPOParams(guidance_weight=-5.0, teacher_steps=2))
    assert len(teacher.calls) == 3
    assert all(c.tolist() == [1.0] * 4 + [-1.0] * 4 for _, c in teacher.calls)


def test_step_draws_everything_from_the_generator_and_samples_t_student_above_t_e():
    latents, cond, empty = toy_inputs(256)
    family, components = ToyFamily(), ToyComponents()

    def run(seed):
        student, teacher = Recorder(), Recorder()
        out = self_npo_step(family=family, components=components, model=student, reference=Teacher(teacher),
                            latents=latents, cond=cond, empty_cond=empty, generator=torch.Generator().manual_seed(seed),
                            device="cpu", params=SelfNPOParams())
        return out, student, teacher

    out, student, teacher = run(0)
    again, _, _ = run(0)
    other, _, _ = run(1)
    assert out.loss.item() == again.loss.item() and out.loss.item() != other.loss.item()
    assert out.loss.requires_grad and set(out.metrics) >= {"loss", "t_start", "t_end", "t_student"}
    (t_student, c), = student.calls  # one student call, with the caption
    assert (c == 1).all()
    t_end = teacher.calls[-1][0]
    assert (t_student > t_end).all() and (t_student <= 999).all()
    assert t_student.float().mean().item() == pytest.approx(out.metrics["t_student"].item())
    assert out.metrics["t_end"].item() == pytest.approx(t_end.float().mean().item())
    # roughly uniform on (t_e, 999]: the mean of (t' - t_e) / (999 - t_e) is about 1/2
    assert ((t_student - t_end).float() / (999 - t_end).float()).mean().item() == pytest.approx(0.5, abs=0.06)
    out.loss.backward()
    assert student.scale.grad is not None and teacher.scale.grad is None


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("teacher_steps, w", [(1, -5.0), (5, -1.0), (5, -5.0)])
def test_an_oracle_teacher_stays_on_its_noising_line_so_its_target_is_x0(prediction_type, teacher_steps, w):
    """With the exact prediction, every DDIM step keeps the starting noise: x_prev = alpha_e x0 + sigma_e eps."""
    latents, cond, empty = toy_inputs(64)
    x0 = latents[:, 0]
    teacher = Recorder(x0, prediction_type)
    uncond = {"c": empty["c"].expand(64, 3, 2)}
    params = SelfNPOParams(guidance_weight=w, teacher_steps=teacher_steps)
    out = teacher_targets(ToyFamily(), ToyComponents(prediction_type), teacher, x0, cond, uncond,
                          torch.Generator().manual_seed(6), "cpu", params)
    generator = torch.Generator().manual_seed(6)  # the step's first draws: the grid index, then the noise
    index = torch.randint(0, params.grid_steps, (64,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    torch.testing.assert_close(out.t_start, ddim_grid(1000, 25)[0][index])
    assert (out.t_end < out.t_start).all() and (out.t_start >= 999 - 40).any()  # the noisiest step is exercised
    alpha_e, sigma_e = (level.view(-1, 1, 1, 1) for level in ToyFamily().noise_levels(ToyComponents(), out.t_end))
    torch.testing.assert_close(out.x_prev, alpha_e * x0 + sigma_e * eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.target, x0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_an_oracle_student_of_an_oracle_teacher_has_no_loss_unless_its_prediction_is_misread(prediction_type):
    latents, cond, empty = toy_inputs(64)
    x0 = latents[:, 0]

    def loss(read_as):
        out = self_npo_step(family=ToyFamily(), components=ToyComponents(read_as), model=Recorder(x0, prediction_type),
                            reference=Teacher(Recorder(x0, prediction_type)), latents=latents, cond=cond,
                            empty_cond=empty, generator=torch.Generator().manual_seed(7), device="cpu",
                            params=SelfNPOParams())
        assert torch.isfinite(out.loss)
        return out.loss.item()

    assert loss(prediction_type) < 1e-5
    assert all(loss(other) > 0.05 for other in PREDICTION_TYPES if other != prediction_type)
