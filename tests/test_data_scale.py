"""Data at scale on the tiny model: records that point, the index without a cache, streamed training with exact
resume, training killed with SIGKILL and resumed, Pick-a-Pic's are_different, decoding in worker processes."""

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT, kill_and_resume, tiny_overrides
from safetensors.torch import load_file
from test_readers import BLUE, RED, color_of, image_bytes

from diffalign.config import DataConfig, load_config
from diffalign.data import DataError, read_preferences
from diffalign.data.build import build_index
from diffalign.data.dataset import IndexedDataset
from diffalign.data.records import TableImage
from diffalign.data.shards import current_umask
from diffalign.training.trainer import train


def tiny_parquet(tiny_data_path) -> str:
    return str(Path(tiny_data_path).parent / "pairs.parquet")


def lora(run: Path) -> dict:
    return load_file(str(run / "pytorch_lora_weights.safetensors"))


def assert_same_lora(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-7, rtol=0)


def test_are_different_false_rows_are_skipped_as_identical_images(tmp_path):
    source = tmp_path / "pap.parquet"
    pq.write_table(pa.table({
        "caption": ["a", "b", "c"], "jpg_0": [image_bytes(RED, "JPEG")] * 3, "jpg_1": [image_bytes(BLUE, "JPEG")] * 3,
        "label_0": [1.0, 1.0, 0.5], "are_different": [True, False, False]}), source)
    records, report = read_preferences(DataConfig(drop_ties=False), str(source))
    assert [r.prompt for r in records] == ["a"]
    assert report.skipped == {"identical_images": 2}
    assert "are_different=false" in report.examples["identical_images"][0]


def test_a_first_shard_without_kept_records_and_its_reuse(tmp_path):
    from diffalign.config import Config
    from diffalign.families import load_components

    source = tmp_path / "pap.parquet"
    labels = [0.5, 0.5, 0.5, 1.0, 0.0, 1.0, 1.0, 0.0]  # rows 0-2, the whole first shard, are ties
    pq.write_table(pa.table({
        "caption": [f"p{i}" for i in range(8)], "jpg_0": [image_bytes(RED, "JPEG")] * 8,
        "jpg_1": [image_bytes(BLUE, "JPEG")] * 8, "label_0": labels}), source)
    cfg = Config()
    cfg.data.cache_dir, cfg.data.cache_shard_rows = str(tmp_path / "features"), 3
    components = load_components(cfg.model)
    for _ in range(2):  # built, then reused
        index = build_index(cfg.data, cfg.model, "pair", components, str(source), show_progress=False)
        assert len(index) == 5 and index.flips == 2 and index.report.skipped == {"tie": 3}
        assert index.latents(0, True).shape == (2, 4, 8, 8)
        assert index.stats["images_per_process"] == [10]
    assert {oct(file.stat().st_mode & 0o777) for file in index.folder.iterdir()} == {oct(0o666 & ~current_umask())}


def test_strict_build_stops_at_the_first_bad_row_whatever_the_reason(tmp_path):
    from diffalign.config import Config

    good, broken = image_bytes(RED, "JPEG"), image_bytes(RED, "JPEG")[:40]
    source = tmp_path / "pap.parquet"
    pq.write_table(pa.table({
        "caption": [f"p{i}" for i in range(8)], "jpg_0": [good, good, broken, good, good, good, good, good],
        "jpg_1": [image_bytes(BLUE, "JPEG")] * 8, "label_0": [1.0] * 5 + [0.7, 1.0, 1.0]}), source)
    cfg = Config()
    cfg.data.cache_dir, cfg.data.strict = str(tmp_path / "features"), True
    with pytest.raises(DataError, match=r"record 2: corrupt_image: jpg_0 of row 2: "):  # not row 5's label
        build_index(cfg.data, cfg.model, "pair", None, str(source), show_progress=False)


def test_table_records_point_at_their_cells_and_workers_decode_them(tiny_data_path, tmp_path):
    from diffalign.data.decoding import checked_records
    from diffalign.data.readers import open_rows
    from diffalign.data.records import SkipReport

    cfg, source = DataConfig(drop_ties=False), tiny_parquet(tiny_data_path)
    for workers in (0, 2):
        report = SkipReport()
        kept = list(checked_records(open_rows(cfg, source), cfg, report, num_workers=workers))
        assert len(kept) == 68 and report.total_skipped == 0
        assert all(isinstance(image, TableImage) for item in kept for image in item.record.images)
        assert [item.seq for item in kept] == list(range(68))  # source order, whatever the workers
    in_memory, _ = read_preferences(cfg, source)  # the list API materialises the bytes
    assert isinstance(in_memory[0].images[0], bytes)
    assert [color_of(i) for i in in_memory[0].images] == [color_of(i) for i in kept[0].record.images]


def test_table_cells_read_the_same_across_files_and_after_remapping(tmp_path, monkeypatch):
    """A table of three cache files: every cell read through ``MappedTable`` equals the Arrow data, before and after
    the files it came from are mapped again (every 4 reads here), and only the files read from are re-mapped.
    ``load_split`` reads the parquet files (without pyarrow's pre-buffering) to the same data."""
    import datasets

    from diffalign.data import records
    from diffalign.data.tables import load_split

    monkeypatch.setattr(records, "REMAP_EVERY", 4)
    parts = []
    for part in range(3):  # three parquet files, each loaded to its own Arrow cache file, then concatenated
        pq.write_table(pa.table({"caption": [f"p{part}-{row}" for row in range(5)],
                                 "jpg_0": [bytes([part, row]) * 3 for row in range(5)]}), tmp_path / f"{part}.parquet")
        parts.append(load_split("parquet", "train", False, data_files=[str(tmp_path / f"{part}.parquet")],
                                cache_dir=str(tmp_path / f"hf{part}")))
    dataset = datasets.concatenate_datasets(parts)
    reference = [bytes([part, row]) * 3 for part in range(3) for row in range(5)]
    assert len(dataset.cache_files) == 3 and dataset["jpg_0"] == reference
    key = records.register_table(dataset)
    table = records._TABLES[key]
    assert table.starts == [0, 5, 10, 15]
    first = list(table.parts)
    order = [12, 0, 7, 3, 14, 1, 9, 13, 2, 5, 11, 4, 6, 8, 10]
    cells = [records.encoded_image(TableImage(key, row, "jpg_0")) for row in order * 2]
    assert cells == [reference[row] for row in order * 2]
    assert all(part is not original for part, original in zip(table.parts, first))  # each file was re-mapped
    fresh = records.MappedTable(dataset)
    before = list(fresh.parts)
    monkeypatch.setitem(records._TABLES, key, fresh)
    for row in (0, 1, 2, 3):  # four reads, all from the first file: only it is mapped again
        records.encoded_image(TableImage(key, row, "jpg_0"))
    assert [now is then for now, then in zip(fresh.parts, before)] == [False, True, True]


def test_index_without_cache_trains_like_the_cached_one_and_is_reused(tiny_data_path, tmp_path):
    cfg = load_config(ROOT / "configs/tiny_dpo.yaml", tiny_overrides(tmp_path / "run"))
    cfg.data.cache_dir = str(tmp_path / "features")
    from diffalign.families import load_components

    components = load_components(cfg.model)
    cached = build_index(cfg.data, cfg.model, "pair", components, tiny_data_path, show_progress=False)
    plain = build_index(cfg.data, cfg.model, "pair", None, tiny_data_path, show_progress=False)
    assert plain.cached is False and len(plain) == len(cached) == 64
    assert plain.folder.parent.name == "records"
    record = plain.record(5)
    assert isinstance(record.images[0], Path) and record.prompt
    item = IndexedDataset(plain, 2, 0, False, components.family, components.resolution)[(5, 0)]
    latents = components.family.encode_images(components, item["pixels"])
    torch.testing.assert_close(latents, cached.latents(5, False))
    again = build_index(cfg.data, cfg.model, "pair", None, tiny_data_path, show_progress=False)
    assert again.folder == plain.folder


def stream_cfg(tmp_path, name, source, **extra):
    values = {"data.streaming": "true", "data.source": source, "data.num_workers": 1, "train.max_steps": 12,
              "train.checkpointing_steps": 5, "train.gradient_accumulation_steps": 2, "data.random_flip": "true",
              **extra}
    return load_config(ROOT / "configs/tiny_dpo.yaml", tiny_overrides(tmp_path / name, **values))


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_streamed_run_resumes_where_it_stopped(tiny_data_path, tmp_path, kind):
    source = tiny_parquet(tiny_data_path) if kind == "parquet" else tiny_data_path
    full = train(stream_cfg(tmp_path, "full", source))
    state = json.loads((full.output_dir / "checkpoint-10" / "training_state.json").read_text())
    # 64 kept pairs: 8 steps of 2 x 4 per epoch, so step 10 is 2 steps (16 records) into the second epoch
    epoch, rows, items = state["stream"]["positions"][0]
    assert epoch == 1 and rows >= 16 and items == 0
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    import shutil

    shutil.copytree(full.output_dir / "checkpoint-10", resumed_dir / "checkpoint-10")
    resumed = train(stream_cfg(tmp_path, "resumed", source, **{"train.resume": "latest"}))
    assert resumed.global_step == 12
    assert_same_lora(lora(full.output_dir), lora(resumed.output_dir))
    for run in (full, resumed):  # the resumed run reports the skips counted before it too
        info = json.loads((run.output_dir / "run_info.json").read_text())
        assert info["data"]["kept"] == 64 and info["data"]["skipped"] == ({"tie": 4} if kind == "parquet" else {})


def test_max_samples_bounds_a_stream(tiny_data_path, tmp_path):
    result = train(stream_cfg(tmp_path, "few", tiny_data_path, **{"data.max_samples": 9, "train.max_steps": 3,
                                                                 "train.gradient_accumulation_steps": 1}))
    info = json.loads((result.output_dir / "run_info.json").read_text())
    assert info["data"]["kept"] == 9 and result.global_step == 3  # 9 records: 2 batches of 4 per epoch


def test_training_killed_with_sigkill_resumes_to_the_uninterrupted_lora(tmp_path, tiny_data_path):
    overrides = {"train.max_steps": 40, "train.checkpointing_steps": 4, "train.batch_size": 4,
                 "data.cache_dir": str(tmp_path / "features"), "data.source": tiny_data_path}

    def command(run: Path, **extra) -> list[str]:  # every part in a fresh process with one thread: same arithmetic
        return [sys.executable, "-m", "diffalign", "train", str(ROOT / "configs/tiny_dpo.yaml"),
                *tiny_overrides(run, **overrides, **extra)]

    killed = tmp_path / "killed"
    kill_and_resume(command, tmp_path / "full", killed, "checkpoint-8")
    assert json.loads((killed / "run_info.json").read_text())["global_step"] == 40
    assert_same_lora(lora(tmp_path / "full"), lora(killed))
