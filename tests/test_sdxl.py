"""The SDXL family on its tiny model: prompt encoding as the stock pipeline's, per-image time ids that follow each
image's recorded original size and crop (cached and uncached data paths), and short training runs."""

import json

import pytest
import torch
from conftest import assert_cached_and_uncached_train_alike
from PIL import Image

from diffalign.config import Config
from diffalign.data import read_preferences
from diffalign.data.build import build_index
from diffalign.data.cache import model_fingerprint
from diffalign.data.dataset import IndexedDataset, RawPreferenceDataset, collate
from diffalign.families import load_components
from diffalign.offline.specs import resolve_model_spec
from diffalign.training.step import batch_tensors, expand_cond

# (width, height) of each image and its (orig_h, orig_w, crop_top, crop_left) at 32 px, worked out by hand:
# the shorter side is resized to 32, then the centre 32x32 square is cropped out of the resized image.
SIZES = {
    (48, 32): (32, 48, 0, 8),  # no resize; 16 spare columns, 8 each side
    (32, 64): (64, 32, 16, 0),  # no resize; 32 spare rows
    (80, 40): (40, 80, 0, 16),  # resized to 64x32, then 16 columns cut on the left
    (16, 24): (24, 16, 8, 0),  # enlarged to 32x48, then 8 rows cut on top
}
PAIRS = [((48, 32), (32, 64)), ((80, 40), (16, 24)), ((32, 64), (80, 40)), ((16, 24), (48, 32))]


@pytest.fixture(scope="module")
def sdxl_path() -> str:
    return resolve_model_spec("tiny:sdxl")


@pytest.fixture(scope="module")
def components(sdxl_path):
    cfg = Config()
    cfg.model.pretrained = sdxl_path
    return load_components(cfg.model)


@pytest.fixture(scope="module")
def odd_sized_pairs(tmp_path_factory):
    """Four pairs of non-square images of different sizes (jsonl folder), distinct pixels so no two hash alike."""
    folder = tmp_path_factory.mktemp("odd_pairs")
    entries = []
    for index, (chosen, rejected) in enumerate(PAIRS):
        names = []
        for side, size in (("chosen", chosen), ("rejected", rejected)):
            name = f"{index}_{side}_{size[0]}x{size[1]}.png"
            Image.new("RGB", size, (200 - 30 * index, 40 if side == "chosen" else 120, 60)).save(folder / name)
            names.append(name)
        entries.append({"prompt": f"shape {index}", "chosen_file_name": names[0], "rejected_file_name": names[1]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return str(folder)


def test_family_is_detected_and_encodes_prompts_as_the_stock_pipeline(components):
    assert components.family.name == "sdxl"
    pipe = components.family.build_pipeline(components)
    prompts = ["a red square on a grey background", "", "a blue circle"]
    ours = components.family.encode_prompts(components, prompts)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert ours["encoder_hidden_states"].shape == (3, 77, 64)  # 32 + 32 features: both encoders concatenated
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds)
    torch.testing.assert_close(ours["text_embeds"], pooled)


def test_expand_cond_orders_per_image_conditioning_like_the_latents():
    cond = {"text": torch.tensor([[1.0], [2.0]]), "time_ids": torch.tensor([[[10.0], [11.0]], [[20.0], [21.0]]])}
    flat = expand_cond(cond, 2, ("time_ids",))
    # [image 0 of every record; image 1 of every record]
    assert flat["text"].flatten().tolist() == [1.0, 2.0, 1.0, 2.0]
    assert flat["time_ids"].flatten().tolist() == [10.0, 20.0, 11.0, 21.0]


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
def test_time_ids_follow_each_images_original_size_and_crop(components, odd_sized_pairs, tmp_path, cached):
    cfg = Config()
    cfg.data.cache_dir = str(tmp_path / "features")
    records, _ = read_preferences(cfg.data, odd_sized_pairs)
    family = components.family
    if cached:
        index = build_index(cfg.data, cfg.model, "pair", components, odd_sized_pairs, show_progress=False)
        dataset = IndexedDataset(index, 2, seed=0, random_flip=True)
    else:
        dataset = RawPreferenceDataset(records, family, components.resolution, 2, seed=0, random_flip=True)
    expected = torch.tensor([[(*SIZES[size], 32, 32) for size in pair] for pair in PAIRS], dtype=torch.float32)
    flips = [dataset.flipped(epoch, p) for epoch in range(3) for p in range(4)]
    assert any(flips) and not all(flips)  # both orientations occur: a flip keeps its image's crop
    for epoch in range(3):
        batch = collate([dataset[(position, epoch)] for position in range(4)])
        assert batch["image_sizes"].shape == (4, 2, 4)
        latents, cond = batch_tensors(batch, family, components, "cpu", torch.float32, None, 0.0, torch.Generator())
        assert latents.shape == (4, 2, 4, 8, 8)
        torch.testing.assert_close(cond["time_ids"], expected)
        assert cond["text_embeds"].shape == (4, 32)  # per prompt, unlike the time ids


def test_time_ids_reach_the_unet(components):
    """Two images alike but for their recorded original size get different predictions."""
    family = components.family
    cond = family.encode_prompts(components, ["a square"] * 2)
    sizes = torch.tensor([[[32, 32, 0, 0]], [[64, 32, 16, 0]]])
    cond.update({name: value[:, 0] for name, value in family.image_cond(components, sizes).items()})
    x_t = torch.randn(1, 4, 8, 8).expand(2, -1, -1, -1)
    with torch.no_grad():
        pred = family.predict(components.denoiser, x_t, torch.tensor([500, 500]), cond)
    assert not torch.allclose(pred[0], pred[1], atol=1e-5)
    with pytest.raises(ValueError, match="time_ids"):
        family.predict(components.denoiser, x_t, torch.tensor([500, 500]), {k: cond[k] for k in cond if k != "time_ids"})


def test_two_dpo_steps_train_cached_and_uncached_alike(sdxl_path, odd_sized_pairs, tmp_path):
    # the same time ids either way: recorded in the cache, or read from the images each step
    assert_cached_and_uncached_train_alike("tiny_sdxl_dpo.yaml", tmp_path, **{"model.pretrained": sdxl_path,
                                                                             "data.source": odd_sized_pairs})


def test_separate_vae_option_loads_it_in_the_training_dtype_and_keys_the_cache(sdxl_path, components):
    assert components.vae_dtype == torch.float32  # SDXL's own VAE overflows in fp16: kept in fp32
    cfg = Config()
    cfg.model.pretrained, cfg.model.vae = sdxl_path, f"{sdxl_path}/vae"
    with_vae = load_components(cfg.model)
    assert with_vae.vae_dtype is None
    plain = Config().model
    plain.pretrained = sdxl_path
    assert model_fingerprint(cfg.model, sdxl_path, "sdxl") != model_fingerprint(plain, sdxl_path, "sdxl")
