"""HPDv2 (HPSv2's Human Preference Dataset v2) as a data source: train.json pairs and test.json rankings.

The folders written here follow the published layout (tgxs002/HPSv2 README): ``train.json`` with ``prompt``,
``file_path`` and ``human_preference`` (1 = preferred), images under ``train/``; ``test.json`` with ``prompt``,
``image_path`` and ``rank`` (lower is better), images under ``test/``.
"""

import json
import math

import numpy as np
import pytest
from conftest import ROOT, tiny_overrides
from PIL import Image

from diffalign.config import ConfigError, DataConfig, load_config
from diffalign.data import DataError, adapt_records, open_image, read_preferences

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)
COLORS = {"red": RED, "blue": BLUE, "green": GREEN}


def color(source) -> tuple[int, int, int]:
    pixel = np.asarray(open_image(source))[4, 4]
    return tuple(int(value > 127) * 255 for value in pixel)


def hpd_folder(tmp_path, split: str, items: list, raw: bytes | None = None, indent=None):
    """``HPD/<split>.json`` and ``HPD/<split>/{red,blue,green}.png``."""
    folder = tmp_path / "HPD"
    (folder / split).mkdir(parents=True, exist_ok=True)
    for name, value in COLORS.items():
        Image.new("RGB", (16, 16), value).save(folder / split / f"{name}.png")
    text = raw if raw is not None else json.dumps(items, indent=indent).encode()
    (folder / f"{split}.json").write_bytes(text)
    return folder


def train_item(prompt, files, preference):
    return {"human_preference": preference, "prompt": prompt, "file_path": files, "user_hash": "u1"}


GOOD_TRAIN = [
    train_item("a red square", ["red.png", "blue.png"], [1, 0]),
    train_item("a red circle", ["blue.png", "red.png"], [0, 1]),  # preferred second: read winner first
    train_item("red again", ["blue.png", "red.png", "green.png"], [0, 1, 0]),  # K=3, one preferred: 2 pairs
]


def test_train_json_reads_as_pairs_winner_first_and_bad_items_are_counted(tmp_path):
    items = GOOD_TRAIN + [
        train_item("missing", ["red.png", "nope.png"], [1, 0]),
        train_item("wrong length", ["red.png", "blue.png"], [1, 0, 0]),
        train_item("nobody", ["red.png", "blue.png"], [0, 0]),
        train_item("both", ["red.png", "blue.png"], [1, 1]),
        train_item("one image", ["red.png"], [1]),
        train_item("", ["red.png", "blue.png"], [1, 0]),
        train_item(7, ["red.png", "blue.png"], [1, 0]),
        42,
        {"prompt": "no images", "human_preference": [1, 0]},
    ]
    folder = hpd_folder(tmp_path, "train", items, indent=1)
    records, report = read_preferences(DataConfig(), str(folder))  # data.format auto finds train.json
    assert [(r.index, r.prompt) for r in records] == [(0, "a red square"), (1, "a red circle"), (2, "red again"),
                                                      (2, "red again")]
    assert [[color(image) for image in r.images] for r in records] == [[RED, BLUE], [RED, BLUE], [RED, BLUE],
                                                                       [RED, GREEN]]
    assert all(r.scores == [1.0, 0.0] and not r.tie and r.labels is None for r in records)
    assert records[0].images == [folder / "train" / "red.png", folder / "train" / "blue.png"]
    assert report.skipped == {"missing_image": 2, "unknown_label": 1, "no_preference": 1, "tie": 1,
                              "empty_prompt": 1, "bad_text": 1, "bad_json": 1, "missing_field": 1}
    train_json = folder / "train.json"
    assert f"record 4: unknown_label: item 4 (line 52) of {train_json}: human_preference=[1, 0, 0]" in \
        report.examples["unknown_label"][0]
    assert f"item 9 (line 111) of {train_json}: prompt is a number (7), not text" in report.examples["bad_text"][0]
    assert "human_preference=[1, 1]: every image is preferred" in report.examples["tie"][0]
    assert "lacks ['file_path/image_path']" in report.examples["missing_field"][0]
    with pytest.raises(DataError, match=r"record 3: missing_image: no image at .*nope.png.*data.strict=true"):
        read_preferences(DataConfig(strict=True), str(folder))


def test_train_pairs_adapt_to_pairwise_labelled_and_ranked_objectives(tmp_path):
    folder = hpd_folder(tmp_path, "train", GOOD_TRAIN)
    records, _ = read_preferences(DataConfig(format="hpdv2"), str(folder / "train.json"))  # the file itself
    pairs = adapt_records(records, "pair", str(folder))
    assert pairs == records
    ranked = adapt_records(records, "ranked", str(folder))  # rankings of two, all the same K: rank_dpo takes them
    assert [len(r.images) for r in ranked] == [2, 2, 2, 2] and all(r.scores == [1.0, 0.0] for r in ranked)
    singles = adapt_records(records, "labelled", str(folder))
    assert [(color(r.images[0]), r.labels) for r in singles[:2]] == [(RED, [1.0]), (BLUE, [0.0])]


def test_test_json_reads_as_rankings(tmp_path):
    items = [
        {"prompt": "rank me", "image_path": ["blue.png", "red.png", "green.png"], "rank": [3, 1, 2],
         "raw_annotations": [{"rank": [3, 1, 2], "user_hash": "u"}]},
        {"prompt": "all equal", "image_path": ["blue.png", "red.png", "green.png"], "rank": [1, 1, 1]},
        {"prompt": "short", "image_path": ["blue.png", "red.png", "green.png"], "rank": [1, 2]},
        {"prompt": "two", "image_path": ["blue.png", "red.png", "green.png"], "rank": [2, 1, 2]},
    ]
    folder = hpd_folder(tmp_path, "test", items)
    with pytest.raises(DataError, match=r"holds test.json but no train.json \(data.split=train\); set data.split=test"):
        read_preferences(DataConfig(), str(folder))
    records, report = read_preferences(DataConfig(split="test"), str(folder))
    assert [(r.prompt, r.scores) for r in records] == [("rank me", [-3.0, -1.0, -2.0]), ("two", [-2.0, -1.0, -2.0])]
    assert [color(image) for image in records[0].images] == [BLUE, RED, GREEN]  # the given order, with scores
    assert report.skipped == {"tie": 1, "bad_scores": 1}
    assert "rank=[1, 2], expected one number per image for the 3 images" in report.examples["bad_scores"][0]
    assert adapt_records(records, "ranked", str(folder)) == records
    best_worst = adapt_records(records, "pair", str(folder))
    assert [[color(image) for image in r.images] for r in best_worst] == [[RED, BLUE], [RED, BLUE]]


def test_images_next_to_a_json_file_and_streamed_bad_bytes(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for name, value in COLORS.items():
        Image.new("RGB", (16, 16), value).save(folder / f"{name}.png")
    items = json.dumps([train_item("caf\u00e9", ["red.png", "blue.png"], [1, 0]),
                        train_item("fine", ["red.png", "blue.png"], [1, 0])]).encode()
    (folder / "prefs.json").write_bytes(items.replace(b"caf\\u00e9", b"caf\xff"))  # a raw bad byte in item 0
    records, report = read_preferences(DataConfig(), str(folder / "prefs.json"))
    assert [r.prompt for r in records] == ["fine"] and records[0].images[0] == folder / "red.png"
    assert report.skipped == {"bad_text": 1}
    assert f"item 0 (line 1) of {folder / 'prefs.json'}: prompt is not UTF-8 (byte 0xff at column 4)" in \
        report.examples["bad_text"][0]
    (folder / "prefs.json").write_bytes(items[:-40])  # cut short: a one-line error naming the item
    with pytest.raises(DataError, match=r"item 1 \(line 1\) of .*prefs.json is not valid JSON: .*cut short"):
        read_preferences(DataConfig(), str(folder / "prefs.json"))


def test_json_that_is_not_hpdv2_lists_the_formats(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps([{"caption": "x", "jpg_0": "a.png"}]))
    for fmt in ("auto", "hpdv2"):
        with pytest.raises(DataError, match=r"the keys of item 0 .* \['caption', 'jpg_0'\] match no known schema.*"
                                            r"hpdv2: a .json list of items with prompt, image_path"):
            read_preferences(DataConfig(format=fmt), str(path))
    path.write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(DataError, match=r"is not a JSON array.*data.format=hpdv2 expects.*metadata.jsonl"):
        read_preferences(DataConfig(), str(path))
    with pytest.raises(DataError, match="data.format=hpdv2 needs a .json list"):
        read_preferences(DataConfig(format="hpdv2"), str(tmp_path))
    assert load_config(ROOT / "configs/tiny_dpo.yaml", ["data.format=hpdv2"]).data.format == "hpdv2"
    with pytest.raises(ConfigError, match="hpdv2"):
        load_config(ROOT / "configs/tiny_dpo.yaml", ["data.format=hpdv3"])


@pytest.mark.parametrize("objective, split", [("dpo", "train"), ("rank_dpo", "test")])
def test_two_training_steps_on_hpdv2(tmp_path, objective, split):
    from diffalign.training.trainer import train

    if split == "train":
        folder = hpd_folder(tmp_path, "train", GOOD_TRAIN)
    else:
        folder = hpd_folder(tmp_path, "test", [
            {"prompt": "a red square", "image_path": ["blue.png", "red.png", "green.png"], "rank": [3, 1, 2]},
            {"prompt": "a red circle", "image_path": ["red.png", "green.png", "blue.png"], "rank": [1, 2, 3]}])
    cfg = load_config(ROOT / "configs/tiny_dpo.yaml", tiny_overrides(tmp_path / "run", **{
        "data.source": str(folder), "data.split": split, "objective.name": objective, "train.max_steps": 2,
        "train.batch_size": 2, "data.cache_dir": str(tmp_path / "features")}))
    result = train(cfg)
    assert result.global_step == 2 and math.isfinite(result.metrics["loss"])
    info = json.loads((result.output_dir / "run_info.json").read_text())
    assert info["data"] == {"kept": 4 if split == "train" else 2, "skipped": {}}
