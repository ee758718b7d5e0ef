"""read_preferences over small hand-made sources: Pick-a-Pic and chosen/rejected parquet, jsonl folders."""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffalign.config import DataConfig, load_config
from diffalign.data import FORMATS, DataError, open_image, read_preferences
from diffalign.errors import ConfigError

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def image_bytes(color=RED, fmt="PNG", mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (16, 16), color).save(buffer, format=fmt)
    return buffer.getvalue()


def color_of(source) -> tuple[int, int, int]:
    """The dominant channel of the decoded image, as a pure colour (JPEG shifts values slightly)."""
    pixel = np.asarray(open_image(source))[8, 8]
    return tuple(int(value > 127) * 255 for value in pixel)


def write_parquet(path: Path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def pickapic(tmp_path, labels, captions=None, jpg_0=None) -> str:
    """Rows whose preferred image (by label) is red and the other blue; ties are red/blue in source order."""
    n = len(labels)
    first = [image_bytes(RED if label != 0 else BLUE, "JPEG") for label in labels]
    second = [image_bytes(BLUE if label != 0 else RED, "JPEG") for label in labels]
    return write_parquet(tmp_path / "pap.parquet", {
        "caption": captions or [f"prompt {i}" for i in range(n)],
        "jpg_0": jpg_0 or first,
        "jpg_1": second,
        "label_0": pa.array(labels, type=pa.float64()),
        "label_1": pa.array([None if label is None else 1 - label for label in labels], type=pa.float64()),
        "extra": list(range(n)),  # unrelated columns are ignored
    })


def jsonl_folder(tmp_path, entries, lines=()) -> Path:
    folder = tmp_path / "pairs"
    folder.mkdir()
    Image.new("RGB", (16, 16), RED).save(folder / "red.png")
    Image.new("RGB", (16, 16), BLUE).save(folder / "blue.png")
    with open(folder / "metadata.jsonl", "w") as handle:
        for entry in entries:
            handle.write(json.dumps(entry) + "\n")
        for line in lines:
            handle.write(line + "\n")
    return folder


def pair(prompt="a cat", chosen="red.png", rejected="blue.png") -> dict:
    return {"prompt": prompt, "chosen_file_name": chosen, "rejected_file_name": rejected}


def test_pickapic_orders_winner_first_and_drops_ties_and_unknown_labels(tmp_path, capsys):
    source = pickapic(tmp_path, [1.0, 0.0, 0.5, 0.3, None])
    records, report = read_preferences(DataConfig(), source)
    assert [r.index for r in records] == [0, 1]
    for record in records:
        assert [color_of(image) for image in record.images] == [RED, BLUE]
        assert isinstance(record.images[0], bytes) and not record.tie
    assert report.kept == 2
    assert report.skipped == {"tie": 1, "unknown_label": 2}
    assert "kept 2 records, skipped 3" in capsys.readouterr().out


def test_kept_ties_stay_in_source_order(tmp_path):
    source = pickapic(tmp_path, [0.5, 0.0])
    records, report = read_preferences(DataConfig(drop_ties=False), source)
    assert [(r.index, r.tie) for r in records] == [(0, True), (1, False)]
    assert [color_of(image) for image in records[0].images] == [RED, BLUE]  # jpg_0 first, as stored
    assert report.total_skipped == 0


def test_string_label_is_unknown(tmp_path):
    source = write_parquet(tmp_path / "s.parquet", {
        "caption": ["a", "b"], "jpg_0": [image_bytes()] * 2, "jpg_1": [image_bytes(BLUE)] * 2, "label_0": ["x", "1"],
    })
    records, report = read_preferences(DataConfig(), source)
    assert records == [] and report.skipped == {"unknown_label": 2}


def test_chosen_rejected_parquet_directory_and_glob(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(2):
        write_parquet(folder / f"part-{shard}.parquet", {
            "prompt": [f"p{shard}"], "chosen": [image_bytes(GREEN)], "rejected": [image_bytes(BLUE)],
        })
    for source in (str(folder), str(folder / "*.parquet")):
        records, report = read_preferences(DataConfig(), source)
        assert sorted(r.prompt for r in records) == ["p0", "p1"]
        assert all([color_of(i) for i in r.images] == [GREEN, BLUE] for r in records)
    records, _ = read_preferences(DataConfig(format="chosen_rejected"), str(folder / "part-0.parquet"))
    assert len(records) == 1


def test_jsonl_folder_counts_bad_lines_missing_and_corrupt_files(tmp_path):
    folder = jsonl_folder(tmp_path, [pair(), pair(chosen="nope.png"), pair(rejected="broken.png"), pair("  "), pair(chosen=None)],
                          lines=["{not json", json.dumps(pair("last"))])
    (folder / "broken.png").write_bytes(image_bytes(BLUE)[:40])  # truncated PNG
    records, report = read_preferences(DataConfig(), str(folder))
    assert [(r.index, r.prompt) for r in records] == [(0, "a cat"), (6, "last")]
    assert records[0].images == [folder / "red.png", folder / "blue.png"]
    assert report.skipped == {"missing_image": 2, "corrupt_image": 1, "empty_prompt": 1, "bad_json": 1}
    assert "record 5" in report.examples["bad_json"][0]


def test_truncated_jpeg_bytes_and_empty_prompt_in_parquet(tmp_path):
    truncated = image_bytes(RED, "JPEG")[:-200]
    source = pickapic(tmp_path, [1.0, 1.0, 1.0, 1.0], captions=["ok", "bad image", "", None],
                      jpg_0=[image_bytes(RED, "JPEG"), truncated, image_bytes(RED, "JPEG"), image_bytes(RED, "JPEG")])
    records, report = read_preferences(DataConfig(), source)
    assert [r.prompt for r in records] == ["ok"]
    assert report.skipped == {"corrupt_image": 1, "empty_prompt": 2}


def test_strict_mode_raises_with_record_index(tmp_path):
    source = pickapic(tmp_path, [1.0, 1.0, 0.3])
    with pytest.raises(DataError, match=r"record 2: unknown_label"):
        read_preferences(DataConfig(strict=True), source)
    folder = jsonl_folder(tmp_path, [pair(), pair(chosen="nope.png")])
    with pytest.raises(DataError, match=r"record 1: missing_image"):
        read_preferences(DataConfig(strict=True), str(folder))


def test_schema_mismatch_names_expected_and_found_columns(tmp_path):
    source = write_parquet(tmp_path / "odd.parquet", {"text": ["a"], "image_a": [image_bytes()]})
    with pytest.raises(DataError) as error:
        read_preferences(DataConfig(), source)
    message = str(error.value)
    for name in ("caption, jpg_0, jpg_1, label_0", "chosen, rejected, prompt", "chosen_file_name", "'image_a'",
                 "data.format"):
        assert name in message
    chosen_rejected = write_parquet(tmp_path / "cr.parquet", {"prompt": ["a"], "chosen": [image_bytes()],
                                                               "rejected": [image_bytes()]})
    with pytest.raises(DataError, match="match no known schema"):
        read_preferences(DataConfig(format="pickapic"), chosen_rejected)
    folder = jsonl_folder(tmp_path, [{"text": "a", "file_name": "red.png"}])
    with pytest.raises(DataError, match="prompt, chosen_file_name, rejected_file_name"):
        read_preferences(DataConfig(), str(folder))


def test_missing_source_says_what_was_expected(tmp_path):
    for source in (str(tmp_path / "nothing.parquet"), str(tmp_path / "nothing" / "deep" / "dir"),
                   str(tmp_path / "*.parquet"), "not-a-path-or-hub-id"):
        with pytest.raises(DataError, match="metadata.jsonl, or a hub dataset id"):
            read_preferences(DataConfig(), source)
    with pytest.raises(DataError, match="needs a folder containing metadata.jsonl"):
        read_preferences(DataConfig(format="jsonl"), str(tmp_path))


def test_unreachable_hub_id_is_a_data_error():
    import os

    if os.environ.get("HF_HUB_OFFLINE") != "1":
        pytest.skip("needs HF_HUB_OFFLINE=1 (set by conftest) so that no network is touched")
    with pytest.raises(DataError, match="loading it as a hub dataset"):
        read_preferences(DataConfig(), "diffalign-test/no-such-dataset")


def test_max_samples_counts_kept_records(tmp_path):
    source = pickapic(tmp_path, [0.5, 1.0, 0.5, 0.0, 1.0, 1.0])
    records, report = read_preferences(DataConfig(max_samples=2), source)
    assert [r.index for r in records] == [1, 3]
    assert report.kept == 2 and report.skipped == {"tie": 2}


def test_datasets_image_feature_is_read_without_decoding(tmp_path):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    features = Features({"prompt": Value("string"), "chosen": ImageFeature(), "rejected": ImageFeature()})
    dataset = Dataset.from_dict({
        "prompt": ["a", "b"],
        "chosen": [Image.new("RGB", (16, 16), GREEN), {"bytes": image_bytes(GREEN), "path": None}],
        "rejected": [{"bytes": image_bytes(BLUE)[:30], "path": None}, {"bytes": image_bytes(BLUE), "path": None}],
    }, features=features)
    dataset.to_parquet(tmp_path / "img.parquet")
    records, report = read_preferences(DataConfig(), str(tmp_path / "img.parquet"))
    assert [r.prompt for r in records] == ["b"]  # the truncated one is counted, not a decode error from datasets
    assert report.skipped == {"corrupt_image": 1}
    assert [color_of(i) for i in records[0].images] == [GREEN, BLUE]


def test_rgba_and_16bit_grayscale_images_are_accepted(tmp_path):
    rgba = image_bytes((255, 0, 0, 128), mode="RGBA")
    gray16 = io.BytesIO()
    Image.fromarray(np.full((16, 16), 60000, dtype=np.uint16)).save(gray16, format="PNG")
    source = write_parquet(tmp_path / "modes.parquet", {
        "prompt": ["modes"], "chosen": [rgba], "rejected": [gray16.getvalue()],
    })
    records, report = read_preferences(DataConfig(), source)
    assert report.total_skipped == 0 and len(records) == 1
    chosen, rejected = (open_image(i) for i in records[0].images)
    assert chosen.mode == rejected.mode == "RGB"
    assert tuple(np.asarray(chosen)[0, 0]) == (255, 127, 127)  # half-transparent red over white
    assert np.asarray(rejected)[0, 0, 0] == round(60000 / 65535 * 255)  # rescaled, not clipped to 255


def test_streaming_a_parquet_table_reads_the_same_records(tiny_data_path, monkeypatch):
    from pathlib import Path

    import datasets

    from diffalign.config import DataConfig
    from diffalign.data import read_preferences

    parquet = str(Path(tiny_data_path).parent / "pairs.parquet")
    full, full_report = read_preferences(DataConfig(max_samples=10), parquet)
    loaded = []
    builder = datasets.DatasetBuilder

    def spy(method):
        def call(*args, **kwargs):
            loaded.append(method(*args, **kwargs))
            return loaded[-1]
        return call

    monkeypatch.setattr(builder, "as_dataset", spy(builder.as_dataset))
    monkeypatch.setattr(builder, "as_streaming_dataset", spy(builder.as_streaming_dataset))
    streamed, streamed_report = read_preferences(DataConfig(max_samples=10, streaming=True), parquet)
    assert isinstance(loaded[0], datasets.IterableDataset)  # really streamed, not downloaded
    assert [(r.index, r.prompt, r.images) for r in streamed] == [(r.index, r.prompt, r.images) for r in full]
    assert streamed_report.kept == full_report.kept == 10


def test_the_config_accepts_exactly_the_registered_data_formats():
    for name in FORMATS.names():
        assert load_config(None, [f"data.format={name}"]).data.format == name
        assert FORMATS.entry(name).description
    with pytest.raises(ConfigError, match="data.format"):
        load_config(None, ["data.format=parquet"])
