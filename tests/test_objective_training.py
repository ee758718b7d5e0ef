"""Every objective lowers its own loss on a fixed batch of each tiny family, through the real training step."""

import math

import pytest
import torch

from diffalign.config import Config
from diffalign.objectives import ObjectiveInputs, available_objectives, get_objective
from diffalign.training.reference import build_reference
from diffalign.training.step import denoising_errors

OBJECTIVES = ["dpo", "sft", "npo", "sdpo", "mapo", "kto", "smpo", "rank_dpo"]


def test_every_objective_is_registered():
    assert set(OBJECTIVES) <= set(available_objectives())


# eps and v targets; SDXL's conditioning; SD3's flow-matching velocity and transformer; SD3.5's dual attention;
# FLUX's packed latents and embedded guidance
@pytest.fixture(scope="module", params=["tiny:sd15", "tiny:sd2v", "tiny:sdxl", "tiny:sd3", "tiny:sd35", "tiny:flux"])
def fixed_batch(request, tiny_data_path):
    """Latents of 8 red-vs-blue pairs, a third image per record for rankings, and their conditioning."""
    from diffalign.data import read_preferences
    from diffalign.data.records import open_image
    from diffalign.families import load_components
    from diffalign.rewards.toy import redness

    cfg = Config()
    cfg.model.pretrained = request.param
    components = load_components(cfg.model)
    records, _ = read_preferences(cfg.data, tiny_data_path)
    records = records[:8]
    family = components.family
    images = [[open_image(s) for s in r.images] for r in records]
    pixels = torch.stack([torch.stack([family.preprocess_image(im, 32) for im in pair]) for pair in images])
    latents = family.encode_images(components, pixels.flatten(0, 1))
    latents = latents.view(8, 2, *latents.shape[1:])
    scores = torch.tensor([[redness(im) for im in pair] for pair in images])
    cond = family.encode_prompts(components, [r.prompt for r in records])
    return components, latents, scores, cond


def objective_batch(name, latents, scores):
    """The latents and targets each kind of objective trains on, built from the same pairs."""
    if name == "kto":  # unpaired: the winners labelled desirable, the losers undesirable
        return torch.cat([latents[:, :1], latents[:, 1:]]), {"labels": torch.tensor([[1.0]] * 8 + [[0.0]] * 8)}
    if name == "rank_dpo":  # 3 images per prompt: winner, loser, flipped winner (scored in between)
        third = latents[:, :1].flip(-1)
        middle = (scores[:, :1] + scores[:, 1:]) / 2
        return torch.cat([latents, third], dim=1), {"scores": torch.cat([scores, middle], dim=1)}
    if name == "smpo":
        return latents, {"scores": scores}
    return latents, {}


@pytest.mark.parametrize("name", OBJECTIVES)
def test_objective_lowers_its_loss_on_a_fixed_batch(name, fixed_batch):
    from diffalign.families import load_components
    from diffalign.training.lora import attach_lora

    batch_components, latents, scores, cond = fixed_batch
    cfg = Config()
    cfg.model.pretrained = batch_components.pretrained
    components = load_components(cfg.model)  # a fresh denoiser per objective
    attach_lora(components.denoiser, cfg.lora, components.family.lora_targets(components.denoiser))
    objective = get_objective(name)
    params = objective.parse_params({})
    if hasattr(params, "beta") and name != "mapo":
        params.beta = 500.0 if name != "kto" else 50.0  # tiny random model: errors ~1, keep logits in range
    reference = build_reference("lora_disabled" if objective.needs_reference else "none", cfg.objective, True,
                                components.denoiser, "cpu", torch.float32)
    batch_latents, extra = objective_batch(name, latents, scores)
    k = objective.images_per_record or batch_latents.shape[1]
    batch_latents = batch_latents[:, :k]
    batch_cond = {key: value[: len(batch_latents)] if len(batch_latents) <= 8
                  else value.repeat(2, *[1] * (value.ndim - 1))
                  for key, value in cond.items()}
    if components.family.needs_image_sizes:  # SDXL: per-image time ids; every tiny image is 32x32, uncropped
        sizes = torch.tensor([32.0, 32.0, 0.0, 0.0]).expand(*batch_latents.shape[:2], 4)
        batch_cond.update(components.family.image_cond(components, sizes))
    batch_cond.update(components.family.run_cond(components, len(batch_latents), "cpu"))  # FLUX.1-dev's guidance
    optimizer = torch.optim.AdamW([p for p in components.denoiser.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(10):
        generator = torch.Generator().manual_seed(0)  # same noise and timesteps every step: a fixed batch
        errors = denoising_errors(components.family, components, components.denoiser, batch_latents, batch_cond,
                                  generator, "cpu", reference, None, with_residuals=objective.needs_residuals)
        inputs = ObjectiveInputs(errors.policy, errors.reference, residuals=errors.residuals, **extra)
        loss = objective(inputs, params).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    if name in ("dpo", "npo", "sdpo", "smpo"):  # LoRA B starts at 0: policy == reference, the loss is log 2
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < losses[0] - 1e-3 * max(1.0, abs(losses[0])), losses
