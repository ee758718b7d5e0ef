"""Self-NPO end to end: caption data (the ``images`` kind), training on every tiny family, and the trained LoRA
in stock diffusers. The pure functions and the step on a toy are in test_self_npo.py."""

import json
import math

import pytest
import torch
from conftest import ROOT, tiny_overrides
from PIL import Image

from diffalign.config import DataConfig, LoraConfig, ModelConfig, ObjectiveConfig, load_config
from diffalign.data import DATA_KINDS, DataError, PreferenceRecord, adapt_records, read_preferences
from diffalign.objectives.self_npo import SelfNPOParams
from diffalign.training.self_npo import self_npo_step


# ---------------------------------------------------------------------------------------------- data
def caption_folder(tmp_path, entries):
    folder = tmp_path / "captions"
    folder.mkdir()
    for name, colour in (("red.png", (255, 0, 0)), ("blue.png", (0, 0, 255))):
        Image.new("RGB", (16, 16), colour).save(folder / name)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return folder


def test_caption_jsonl_gives_unlabelled_single_images(tmp_path):
    folder = caption_folder(tmp_path, [
        {"prompt": "a red square", "file_name": "red.png"},
        {"prompt": "a blue square", "file_name": "blue.png", "label": 1},  # a caption file: the label is ignored
        {"prompt": "", "file_name": "red.png"},
        {"prompt": "x", "file_name": "nope.png"},
        {"prompt": "a pair", "chosen_file_name": "red.png", "rejected_file_name": "blue.png"},
    ])
    records, report = read_preferences(DataConfig(), str(folder))
    assert [(r.index, r.prompt, r.images, r.labels, r.scores) for r in records] == [
        (0, "a red square", [folder / "red.png"], None, None), (1, "a blue square", [folder / "blue.png"], None, None)]
    assert report.skipped == {"empty_prompt": 1, "missing_image": 1, "missing_field": 1}
    assert adapt_records(records, "images", str(folder)) == records
    with pytest.raises(DataError, match="single image without a label"):
        adapt_records(records, "labelled", str(folder))


def test_labelled_file_still_reports_a_missing_label(tmp_path):
    folder = caption_folder(tmp_path, [{"prompt": "a", "file_name": "red.png", "label": 1},
                                       {"prompt": "b", "file_name": "blue.png"}])
    records, report = read_preferences(DataConfig(), str(folder))
    assert [r.labels for r in records] == [[1.0]]
    assert "lacks ['label']" in report.examples["missing_field"][0]


def test_images_kind_splits_every_record_into_single_images():
    assert "images" in DATA_KINDS
    records = [
        PreferenceRecord(0, "pair", [b"w", b"l"]),
        PreferenceRecord(1, "tie", [b"a", b"b"], tie=True),
        PreferenceRecord(2, "ranked", [b"x", b"y", b"z"], scores=[1.0, 3.0, 2.0]),
        PreferenceRecord(3, "single", [b"s"], labels=[0.0]),
    ]
    adapted = adapt_records(records, "images", "src")
    assert [(r.index, r.prompt, r.images) for r in adapted] == [
        (0, "pair", [b"w"]), (0, "pair", [b"l"]), (1, "tie", [b"a"]), (1, "tie", [b"b"]),
        (2, "ranked", [b"x"]), (2, "ranked", [b"y"]), (2, "ranked", [b"z"]), (3, "single", [b"s"])]
    assert all(r.labels is None and r.scores is None and not r.tie for r in adapted)


def test_tiny_captions_spec():
    from diffalign.offline.specs import resolve_data_spec

    records, report = read_preferences(DataConfig(), resolve_data_spec("tiny:captions"))
    assert len(records) == 128 and report.total_skipped == 0
    assert all(len(r.images) == 1 and r.labels is None for r in records)
    assert {r.prompt.split()[1] for r in records} == {"red", "blue"}


# ---------------------------------------------------------------------------------------------- tiny model
@pytest.mark.parametrize("model, prediction_type", [("tiny:sd15", "epsilon"), ("tiny:sd2v", "v_prediction"),
                                                     ("tiny:sdxl", "epsilon"), ("tiny:sd3", "flow"),
                                                     ("tiny:sd35", "flow"), ("tiny:flux", "flow")])
def test_self_npo_lowers_its_loss_on_a_fixed_batch_of_the_tiny_model(model, prediction_type):
    from diffalign.data.records import open_image
    from diffalign.families import load_components
    from diffalign.offline.specs import resolve_data_spec
    from diffalign.training.lora import attach_lora
    from diffalign.training.reference import build_reference

    components = load_components(ModelConfig(pretrained=model))
    family, denoiser = components.family, components.denoiser
    if prediction_type == "flow":  # SD3 and FLUX: the velocity, t = 1000 sigma
        assert family.flow_matching
    else:
        assert components.noise_scheduler.config.prediction_type == prediction_type
    records, _ = read_preferences(DataConfig(), resolve_data_spec("tiny:captions"))
    records = records[:4]
    pixels = torch.stack([family.preprocess_image(open_image(r.images[0]), 32) for r in records])
    latents = family.encode_images(components, pixels)
    latents = latents.view(4, 1, *latents.shape[1:])
    cond = family.encode_prompts(components, [r.prompt for r in records])
    if family.needs_image_sizes:  # SDXL: each image's time ids, kept in the teacher's unconditional branch
        cond.update(family.image_cond(components, torch.tensor([32.0, 32.0, 0.0, 0.0]).expand(4, 1, 4)))
    cond.update(family.run_cond(components, 4, "cpu"))  # FLUX.1-dev's guidance, kept in the teacher's uncond
    empty = family.encode_prompts(components, [""])
    attach_lora(denoiser, LoraConfig(), family.lora_targets(denoiser))
    params = SelfNPOParams()
    reference = build_reference("ema", ObjectiveConfig(ema_decay=params.ema_decay, ema_update_every=1), True,
                                denoiser, "cpu", torch.float32)
    optimizer = torch.optim.AdamW([p for p in denoiser.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(4):
        generator = torch.Generator().manual_seed(0)  # same t_s, noise, t' and z every step: a fixed batch
        out = self_npo_step(family=family, components=components, model=denoiser, reference=reference,
                            latents=latents, cond=cond, empty_cond=empty, generator=generator, device="cpu",
                            params=params)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        reference.update(denoiser, step + 1)
        losses.append(out.loss.item())
    assert all(math.isfinite(loss) for loss in losses)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 1e-3, losses
    assert any(shadow.abs().sum() > 0 for name, shadow in reference.shadow.items() if "lora_B" in name)  # EMA moved


def test_train_tiny_config_writes_a_lora_that_stock_diffusers_loads(tmp_path, tiny_model_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from diffalign.training import setup, trainer

    seen = {}
    build = setup.build_reference

    def spy(strategy, objective_cfg, *args):
        seen.update(strategy=strategy, decay=objective_cfg.ema_decay, every=objective_cfg.ema_update_every)
        return build(strategy, objective_cfg, *args)

    monkeypatch.setattr(setup, "build_reference", spy)
    cfg = load_config(ROOT / "configs/tiny_self_npo.yaml",
                      tiny_overrides(tmp_path / "run", **{"train.max_steps": 3, "objective.self_npo.ema_decay": 0.9}))
    result = trainer.train(cfg)
    assert seen == {"strategy": "ema", "decay": 0.9, "every": 1}
    assert result.global_step == 3 and result.skipped_steps == 0
    assert {"loss", "t_start", "t_end", "t_student"} <= set(result.metrics)
    assert result.metrics["t_start"] - 200 <= result.metrics["t_end"] <= result.metrics["t_start"]
    run = result.output_dir
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    assert "| reference | ema |" in (run / "README.md").read_text()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None)
    pipe.load_lora_weights(str(run))
    torch.manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 77, 32)
    with torch.no_grad():
        reloaded = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        trained = result.denoiser.float()(x, t, encoder_hidden_states=ctx).sample
        pipe.unet.disable_lora()
        base = pipe.unet(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(base, trained, atol=1e-5)

    # and it is accepted as the negative LoRA of NPO guidance, where it drives the negative branch
    from diffalign.guidance import load_pipeline

    guided = load_pipeline(tiny_model_path, npo=str(run))
    guided.set_progress_bar_config(disable=True)
    guided("a square", num_inference_steps=2, guidance_scale=3.0, output_type="latent")
    assert {(branch, tuple(adapters)) for _, branch, adapters in guided.adapter_router.trace} == {
        ("negative", ("npo",)), ("conditional", ())}
