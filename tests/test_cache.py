"""The feature cache: sharded, computed once, reused, both orientations, keyed by model and data, resumable."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from diffalign.config import Config
from diffalign.data import DataError, read_preferences
from diffalign.data.build import build_index
from diffalign.data.dataset import IndexedDataset, epoch_batches, flip_choice
from diffalign.data.records import open_image


@pytest.fixture(scope="module")
def setup(tiny_data_path, tmp_path_factory):
    from diffalign.families import load_components

    cfg = Config()
    cfg.data.cache_dir = str(tmp_path_factory.mktemp("features"))
    cfg.data.max_samples = 6
    components = load_components(cfg.model)
    records, _ = read_preferences(cfg.data, tiny_data_path)
    return cfg, components, records, tiny_data_path


def build(cfg, components, source, **settings):
    for name, value in settings.items():
        setattr(cfg.data, name, value)
    return build_index(cfg.data, cfg.model, "pair", components, source, show_progress=False)


def test_cache_holds_exact_encodings_of_both_orientations(setup):
    cfg, components, records, source = setup
    index = build(cfg, components, source)
    family = components.family
    image = open_image(records[0].images[1])
    for flipped in (False, True):
        expected = family.encode_images(components, family.preprocess_image(image, 32, flipped)[None])[0]
        torch.testing.assert_close(index.latents(0, flipped)[1], expected)
    torch.testing.assert_close(index.cond(0)["encoder_hidden_states"],
                               family.encode_prompts(components, [records[0].prompt])["encoder_hidden_states"][0])
    assert not torch.equal(index.latents(0, False), index.latents(0, True))
    assert len(index) == 6 and index.records["source_index"].tolist() == [r.index for r in records[:6]]


def test_second_build_reuses_everything(setup, monkeypatch):
    cfg, components, records, source = setup
    index = build(cfg, components, source)
    files = sorted(index.folder.rglob("*.safetensors"))
    assert len(files) == 3  # one image shard, one text shard, the index: not a file per image
    prompts = read_tensors_count(index)
    assert prompts == len({r.prompt for r in records[:6]})  # each prompt stored once
    mtimes = [f.stat().st_mtime_ns for f in files]

    def fail(*args, **kwargs):
        raise AssertionError("encoded again although cached")

    monkeypatch.setattr(components.family, "encode_images", fail)
    monkeypatch.setattr(components.family, "encode_prompts", fail)
    again = build(cfg, components, source)
    assert [f.stat().st_mtime_ns for f in sorted(again.folder.rglob("*.safetensors"))] == mtimes
    assert again.report.kept == index.report.kept == 6


def read_tensors_count(index) -> int:
    return sum(len(load_file(str(index.folder / name))["prompt_hash"]) for name in index.texts.names)


def test_cache_key_depends_on_resolution_model_and_data_settings(setup):
    cfg, components, records, source = setup
    index_a = build(cfg, components, source)
    components.resolution = 16
    try:
        index_b = build(cfg, components, source)
    finally:
        components.resolution = 32
    assert index_a.folder != index_b.folder and index_a.folder.parent == index_b.folder.parent
    assert index_b.latents(0, False).shape[-1] == 4
    cfg_other = Config()
    cfg_other.model.revision = "other"
    index_c = build_index(cfg.data, cfg_other.model, "pair", components, source, show_progress=False)
    assert index_c.folder.parent != index_a.folder.parent
    index_d = build(cfg, components, source, random_flip=False)
    try:
        assert index_d.folder != index_a.folder and index_d.flips == 1  # one orientation when flips are off
        torch.testing.assert_close(index_d.latents(0, True), index_a.latents(0, False))
    finally:
        cfg.data.random_flip = True


def test_dataset_flips_are_deterministic_per_epoch_and_shared_by_a_records_images(setup):
    cfg, components, records, source = setup
    index = build(cfg, components, source)
    dataset = IndexedDataset(index, 2, seed=0, random_flip=True)
    torch.testing.assert_close(dataset[(2, 0)]["latents"], dataset[(2, 0)]["latents"])
    flips = {(e, p): flip_choice(0, e, p) for e in range(4) for p in range(6)}
    assert 0.2 < sum(flips.values()) / len(flips) < 0.8
    epoch, position = next((e, p) for (e, p), f in flips.items() if f != flips[(0, p)])
    assert not torch.equal(dataset[(position, 0)]["latents"][0], dataset[(position, epoch)]["latents"][0])
    for e, p in flips:  # both images of a pair in the same orientation
        item = dataset[(p, e)]["latents"]
        torch.testing.assert_close(item, index.latents(p, flips[(e, p)]))
    plain = IndexedDataset(index, 1, seed=0, random_flip=False)
    assert plain[(0, 3)]["latents"].shape[0] == 1  # images_per_record=1 (SFT) loads only the winner
    torch.testing.assert_close(plain[(0, 3)]["latents"][0], index.latents(0, False)[0])


def test_epoch_batches_split_one_permutation_across_processes():
    rank0 = epoch_batches(11, 2, 2, 0, epoch=0, seed=5)
    rank1 = epoch_batches(11, 2, 2, 1, epoch=0, seed=5)
    assert len(rank0) == len(rank1) == 2  # 11 // (2 x 2): the incomplete global batch is dropped
    seen = [p for batch in rank0 + rank1 for p, _ in batch]
    assert len(seen) == len(set(seen)) == 8
    assert epoch_batches(11, 2, 2, 0, epoch=0, seed=5) == rank0
    assert epoch_batches(11, 2, 2, 0, epoch=1, seed=5) != rank0


def test_too_little_disk_stops_before_encoding_with_the_figures(setup, monkeypatch, tmp_path):
    import shutil

    cfg, components, _, source = setup
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    monkeypatch.setattr(components.family, "encode_images", lambda *a: pytest.fail("encoded without the disk"))
    original = cfg.data.cache_dir
    try:
        with pytest.raises(DataError, match=r"needs .* MiB more at .*only 0.0 MiB is free.*data.cache_dir"):
            build(cfg, components, source, cache_dir=str(tmp_path / "full"))
    finally:
        cfg.data.cache_dir = original


KILLED_BUILD = textwrap.dedent("""
    import sys, time
    from diffalign.config import Config
    from diffalign.data.build import build_index
    import diffalign.offline  # registers tiny:
    from diffalign.families import load_components
    cfg = Config()
    cfg.data.cache_dir, cfg.data.cache_shard_rows, cfg.data.num_workers = sys.argv[1], 8, 0
    components = load_components(cfg.model)
    encode = components.family.encode_images
    def slow(*args):  # slow enough to be killed between two shards
        time.sleep(0.4)
        return encode(*args)
    components.family.encode_images = slow
    build_index(cfg.data, cfg.model, "pair", components, sys.argv[2], show_progress=False)
""")


def test_build_killed_with_sigkill_resumes_to_the_same_cache(tiny_data_path, tmp_path):
    from diffalign.families import load_components

    cfg = Config()
    cfg.data.cache_shard_rows, cfg.data.num_workers = 8, 0
    components = load_components(cfg.model)
    cfg.data.cache_dir = str(tmp_path / "whole")
    whole = build_index(cfg.data, cfg.model, "pair", components, tiny_data_path, show_progress=False)
    assert len(whole.images.names) == 8  # 64 rows in shards of 8
    killed_dir = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(killed_dir), tiny_data_path], cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while len(list(killed_dir.rglob("images-*.safetensors"))) < 3 and time.time() < deadline:
        assert child.poll() is None, "the build ended before it could be killed"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    finished = len(list(killed_dir.rglob("images-*.safetensors")))
    assert 3 <= finished < 8 and not list(killed_dir.rglob("index.safetensors"))
    build_dir = next(killed_dir.rglob("images-*.safetensors")).parent
    (build_dir / ".images-1p-000-00007.safetensors.0123abcd.tmp").write_bytes(b"half written")  # as -9 leaves
    calls = []
    encode = components.family.encode_images
    components.family.encode_images = lambda *args: calls.append(len(args[1])) or encode(*args)
    try:
        cfg.data.cache_dir = str(killed_dir)
        resumed = build_index(cfg.data, cfg.model, "pair", components, tiny_data_path, show_progress=False)
    finally:
        components.family.encode_images = encode
    assert sum(calls) == (8 - finished) * 8 * 2 * 2  # the unfinished shards: 8 pairs each, both orientations
    assert resumed.images.names == whole.images.names
    assert not list(build_dir.glob(".*.tmp"))
    for name in [*whole.images.names, *whole.texts.names, "index.safetensors"]:
        ours, theirs = load_file(str(resumed.folder / name)), load_file(str(whole.folder / name))
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], equal_nan=True, rtol=0, atol=0)
