"""The latent / text-embedding cache: computed once, reused, both orientations, keyed by model and resolution."""

import pytest
import torch

from diffalign.config import Config
from diffalign.data import read_preferences
from diffalign.data.cache import build_feature_cache, image_key
from diffalign.data.dataset import CachedPreferenceDataset, epoch_batches, flip_choice
from diffalign.data.records import open_image


@pytest.fixture(scope="module")
def setup(tiny_data_path, tmp_path_factory):
    from diffalign.families import load_components

    cfg = Config()
    cfg.data.cache_dir = str(tmp_path_factory.mktemp("features"))
    components = load_components(cfg.model)
    records, _ = read_preferences(cfg.data, tiny_data_path)
    return cfg, components, records[:6]


def test_cache_holds_exact_encodings_of_both_orientations(setup):
    cfg, components, records = setup
    cache, cached = build_feature_cache(records, components, cfg.data, cfg.model, show_progress=False)
    family = components.family
    image = open_image(records[0].images[1])
    for flipped in (False, True):
        expected = family.encode_images(components, family.preprocess_image(image, 32, flipped)[None])[0]
        torch.testing.assert_close(cache.load_latents(cached[0].image_keys[1], flipped), expected)
    text = cache.load_text(cached[0].prompt_key)
    torch.testing.assert_close(text["encoder_hidden_states"],
                               family.encode_prompts(components, [records[0].prompt])["encoder_hidden_states"][0])
    assert not torch.equal(cache.load_latents(cached[0].image_keys[1], False),
                           cache.load_latents(cached[0].image_keys[1], True))


def test_second_build_reuses_everything(setup, monkeypatch):
    cfg, components, records = setup
    cache, _ = build_feature_cache(records, components, cfg.data, cfg.model, show_progress=False)
    files = sorted(cache.root.rglob("*.safetensors"))
    unique_images = {image_key(source) for r in records for source in r.images}
    unique_prompts = {r.prompt for r in records}
    assert len(files) == len(unique_images) + len(unique_prompts)
    mtimes = [f.stat().st_mtime_ns for f in files]

    def fail(*args, **kwargs):
        raise AssertionError("encoded again although cached")

    monkeypatch.setattr(components.family, "encode_images", fail)
    monkeypatch.setattr(components.family, "encode_prompts", fail)
    build_feature_cache(records, components, cfg.data, cfg.model, show_progress=False)
    assert [f.stat().st_mtime_ns for f in sorted(cache.root.rglob("*.safetensors"))] == mtimes


def test_cache_key_depends_on_resolution_and_model(setup, tmp_path):
    cfg, components, records = setup
    cache_a, _ = build_feature_cache(records[:1], components, cfg.data, cfg.model, show_progress=False)
    components.resolution = 16
    try:
        cache_b, cached_b = build_feature_cache(records[:1], components, cfg.data, cfg.model, show_progress=False)
    finally:
        components.resolution = 32
    assert cache_a.latent_dir != cache_b.latent_dir
    assert cache_b.load_latents(cached_b[0].image_keys[0], False).shape[-1] == 4
    cfg_other = Config()
    cfg_other.model.revision = "other"
    cache_c, _cached = build_feature_cache(records[:1], components, cfg.data, cfg_other.model, show_progress=False)
    assert cache_c.root != cache_a.root


def test_dataset_flips_are_deterministic_per_epoch(setup):
    cfg, components, records = setup
    cache, cached = build_feature_cache(records, components, cfg.data, cfg.model, show_progress=False)
    dataset = CachedPreferenceDataset(cache, cached, 2, seed=0, random_flip=True)
    torch.testing.assert_close(dataset[(2, 0)]["latents"], dataset[(2, 0)]["latents"])
    flips = {(e, p, s): flip_choice(0, e, p, s) for e in range(4) for p in range(6) for s in range(2)}
    assert 0.2 < sum(flips.values()) / len(flips) < 0.8
    epoch, position = next((e, p) for (e, p, s), f in flips.items() if s == 0 and f != flips[(0, p, 0)])
    assert not torch.equal(dataset[(position, 0)]["latents"][0], dataset[(position, epoch)]["latents"][0])
    plain = CachedPreferenceDataset(cache, cached, 1, seed=0, random_flip=False)
    assert plain[(0, 3)]["latents"].shape[0] == 1  # images_per_record=1 (SFT) loads only the winner
    torch.testing.assert_close(plain[(0, 3)]["latents"][0], cache.load_latents(cached[0].image_keys[0], False))


def test_epoch_batches_split_one_permutation_across_processes():
    rank0 = epoch_batches(11, 2, 2, 0, epoch=0, seed=5)
    rank1 = epoch_batches(11, 2, 2, 1, epoch=0, seed=5)
    assert len(rank0) == len(rank1) == 2  # 11 // (2 x 2): the incomplete global batch is dropped
    seen = [p for batch in rank0 + rank1 for p, _ in batch]
    assert len(seen) == len(set(seen)) == 8
    assert epoch_batches(11, 2, 2, 0, epoch=0, seed=5) == rank0
    assert epoch_batches(11, 2, 2, 0, epoch=1, seed=5) != rank0
