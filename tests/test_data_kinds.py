"""Scored pairs, labelled singles and ranked sets from jsonl folders and tables, and adapt_records."""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffalign.config import DataConfig, load_config
from diffalign.data import DataError, PreferenceRecord, adapt_records, open_image, read_preferences

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)
COLORS = {"red": RED, "blue": BLUE, "green": GREEN, "white": WHITE}


def image_bytes(color=RED, fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buffer, format=fmt)
    return buffer.getvalue()


def color_of(source) -> tuple[int, int, int]:
    pixel = np.asarray(open_image(source))[8, 8]
    return tuple(int(value > 127) * 255 for value in pixel)


def colors(record) -> list[tuple[int, int, int]]:
    return [color_of(image) for image in record.images]


def folder_with(tmp_path, entries, lines=()) -> Path:
    """A folder with red/blue/green/white PNGs, a truncated broken.png and metadata.jsonl."""
    folder = tmp_path / "data"
    folder.mkdir(parents=True)
    for name, color in COLORS.items():
        Image.new("RGB", (16, 16), color).save(folder / f"{name}.png")
    (folder / "broken.png").write_bytes(image_bytes(BLUE)[:40])
    with open(folder / "metadata.jsonl", "w") as handle:
        for entry in entries:
            handle.write(json.dumps(entry) + "\n")
        for line in lines:
            handle.write(line + "\n")
    return folder


def pair(prompt="a cat", chosen="red.png", rejected="blue.png", **extra) -> dict:
    return {"prompt": prompt, "chosen_file_name": chosen, "rejected_file_name": rejected, **extra}


def single(label, prompt="a dog", file_name="red.png") -> dict:
    return {"prompt": prompt, "file_name": file_name, "label": label}


def ranked(scores, names=("red.png", "blue.png", "green.png"), prompt="a fox") -> dict:
    return {"prompt": prompt, "file_names": list(names), "scores": scores}


def write_parquet(path: Path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


# ---------------------------------------------------------------------------------------------- jsonl
def test_jsonl_scored_pairs_keep_scores_and_need_both(tmp_path):
    folder = folder_with(tmp_path, [
        pair(chosen_score=0.9, rejected_score=0.2),
        pair(),  # a pair without scores is still a pair
        pair(chosen_score=0.5),  # only one score
        pair(chosen_score="high", rejected_score=0.1),
        pair(chosen_score=1, rejected_score=float("nan")),  # json.dumps writes NaN, json.loads reads it
        pair(chosen_score=None, rejected_score=0.1),
        pair(chosen="green.png", chosen_score=-1, rejected_score=3),  # the human choice wins over the scores
    ])
    records, report = read_preferences(DataConfig(), str(folder))
    assert [(r.index, r.scores) for r in records] == [(0, [0.9, 0.2]), (1, None), (6, [-1.0, 3.0])]
    assert [colors(r) for r in records] == [[RED, BLUE], [RED, BLUE], [GREEN, BLUE]]
    assert all(r.labels is None and not r.tie for r in records)
    assert report.skipped == {"missing_field": 1, "bad_scores": 3}
    assert "chosen_score" in report.examples["missing_field"][0]


def test_jsonl_labelled_singles(tmp_path):
    folder = folder_with(tmp_path, [
        single(1), single(0, file_name="blue.png"), single(True), single(False), single(1.0), single(0.0),
        single(0.5), single("1"), single(None), single(2),
        single(1, prompt=""), single(1, file_name="broken.png"), single(0, file_name="nope.png"),
    ])
    records, report = read_preferences(DataConfig(), str(folder))
    assert [(r.index, r.labels) for r in records] == [(0, [1.0]), (1, [0.0]), (2, [1.0]), (3, [0.0]), (4, [1.0]),
                                                      (5, [0.0])]
    assert all(len(r.images) == 1 and r.scores is None and r.prompt == "a dog" for r in records)
    assert records[1].images == [folder / "blue.png"]
    assert report.skipped == {"unknown_label": 4, "empty_prompt": 1, "corrupt_image": 1, "missing_image": 1}


def test_jsonl_ranked_sets_keep_the_given_order(tmp_path):
    folder = folder_with(tmp_path, [
        ranked([0.1, 0.7, 0.3]),
        ranked([2, 1, 3, 0], names=("white.png", "red.png", "blue.png", "green.png")),
        ranked([0.1, 0.2]),  # two scores for three images
        ranked([0.1, "x", 0.3]),
        ranked([0.1, None, 0.3]),
        ranked([0.5], names=("red.png",)),  # a ranking needs two images
        ranked("0.1 0.2 0.3"),
        ranked([1, 2, 3], names=("red.png", "broken.png", "blue.png")),
        {"prompt": "a fox", "file_names": "red.png", "scores": [1, 2]},
        ranked([True, 0, 1]),  # booleans are not scores
    ])
    records, report = read_preferences(DataConfig(), str(folder))
    assert [r.index for r in records] == [0, 1]
    assert records[0].scores == [0.1, 0.7, 0.3] and colors(records[0]) == [RED, BLUE, GREEN]
    assert records[1].scores == [2.0, 1.0, 3.0, 0.0] and colors(records[1]) == [WHITE, RED, BLUE, GREEN]
    assert all(r.labels is None and not r.tie for r in records)
    assert report.skipped == {"bad_scores": 7, "corrupt_image": 1}


def test_jsonl_ranking_of_two_is_read_winner_first(tmp_path):
    folder = folder_with(tmp_path, [ranked([0.2, 0.8], names=("red.png", "blue.png")),
                                    ranked([0.5, 0.5], names=("red.png", "blue.png"))])
    records, _ = read_preferences(DataConfig(), str(folder))
    assert colors(records[0]) == [BLUE, RED] and records[0].scores == [0.8, 0.2] and not records[0].tie
    assert colors(records[1]) == [RED, BLUE] and records[1].tie  # equal scores: the order carries no preference


def test_jsonl_first_valid_line_decides_the_kind(tmp_path):
    folder = folder_with(tmp_path, [single(1), pair(), ranked([1, 2, 3]), single(0), {"prompt": "x"}],
                         lines=["[1, 2]"])
    records, report = read_preferences(DataConfig(), str(folder))
    assert [r.index for r in records] == [0, 3]
    assert report.skipped == {"missing_field": 3, "bad_json": 1}  # a JSON list is a bad line, not a missing field
    assert "line 6 of" in report.examples["bad_json"][0] and "a list of 2, not a JSON object" in \
        report.examples["bad_json"][0]
    assert "is a pair entry, but the first entry made this a file of labelled entries" in \
        report.examples["missing_field"][0]
    assert "lacks ['file_name', 'label']" in report.examples["missing_field"][2]
    # bad JSON before the first object does not decide anything
    other = tmp_path / "other"
    other.mkdir()
    (other / "metadata.jsonl").write_text("{oops\n" + json.dumps(ranked([1, 2], names=("a.png", "b.png"))) + "\n")
    records, report = read_preferences(DataConfig(), str(other))
    assert records == [] and report.skipped == {"bad_json": 1, "missing_image": 1}


def test_jsonl_schema_error_lists_every_kind_and_format_can_require_one(tmp_path):
    folder = folder_with(tmp_path, [{"text": "a", "image": "red.png"}])
    with pytest.raises(DataError) as error:
        read_preferences(DataConfig(), str(folder))
    for keys in ("prompt, chosen_file_name, rejected_file_name", "prompt, file_name, label",
                 "prompt, file_names, scores", "chosen_score", "labelled, ranked"):
        assert keys in str(error.value)
    labelled = folder_with(tmp_path / "l", [single(1)])
    records, _ = read_preferences(DataConfig(format="labelled"), str(labelled))
    assert records[0].labels == [1.0]
    with pytest.raises(DataError, match="data.format=ranked needs metadata.jsonl lines with prompt, file_names"):
        read_preferences(DataConfig(format="ranked"), str(labelled))


def test_strict_mode_names_the_record_for_new_shapes(tmp_path):
    folder = folder_with(tmp_path, [ranked([1, 2, 3]), ranked([1, 2])])
    with pytest.raises(DataError, match=r"record 1: bad_scores"):
        read_preferences(DataConfig(strict=True), str(folder))
    labelled = folder_with(tmp_path / "l", [single(1), single("yes")])
    with pytest.raises(DataError, match=r"record 1: unknown_label"):
        read_preferences(DataConfig(strict=True), str(labelled))


def test_max_samples_counts_kept_records_of_any_kind(tmp_path):
    folder = folder_with(tmp_path, [ranked([1, 1, "x"]), ranked([1, 2, 3]), ranked([3, 2, 1]), ranked([1, 3, 2])])
    records, report = read_preferences(DataConfig(max_samples=2), str(folder))
    assert [r.index for r in records] == [1, 2] and report.skipped == {"bad_scores": 1}


# ---------------------------------------------------------------------------------------------- tables
def test_chosen_rejected_table_with_score_columns(tmp_path):
    source = write_parquet(tmp_path / "scored.parquet", {
        "prompt": ["a", "b", "c", "d"],
        "chosen": [image_bytes(RED)] * 4,
        "rejected": [image_bytes(BLUE)] * 4,
        "chosen_score": pa.array([0.9, None, float("inf"), 1.0], type=pa.float64()),
        "rejected_score": pa.array([0.1, 0.2, 0.0, 2.0], type=pa.float64()),
    })
    records, report = read_preferences(DataConfig(), source)
    assert [(r.prompt, r.scores) for r in records] == [("a", [0.9, 0.1]), ("d", [1.0, 2.0])]
    assert all(colors(r) == [RED, BLUE] for r in records)
    assert report.skipped == {"bad_scores": 2}
    unscored = write_parquet(tmp_path / "plain.parquet", {"prompt": ["a"], "chosen": [image_bytes()],
                                                           "rejected": [image_bytes(BLUE)]})
    assert read_preferences(DataConfig(), unscored)[0][0].scores is None
    half = write_parquet(tmp_path / "half.parquet", {"prompt": ["a"], "chosen": [image_bytes()],
                                                      "rejected": [image_bytes(BLUE)], "chosen_score": [1.0]})
    with pytest.raises(DataError, match="only one of chosen_score, rejected_score"):
        read_preferences(DataConfig(), half)


def test_labelled_table(tmp_path):
    source = write_parquet(tmp_path / "labelled.parquet", {
        "prompt": ["a", "b", "c", "d", "e"],
        "image": [image_bytes(RED), image_bytes(BLUE), image_bytes(GREEN), image_bytes(RED)[:30], None],
        "label": pa.array([1, 0, 2, 1, 0], type=pa.int64()),
        "extra": [1, 2, 3, 4, 5],
    })
    records, report = read_preferences(DataConfig(), source)
    assert [(r.prompt, r.labels, colors(r)) for r in records] == [("a", [1.0], [RED]), ("b", [0.0], [BLUE])]
    assert report.skipped == {"unknown_label": 1, "corrupt_image": 1, "missing_image": 1}
    booleans = write_parquet(tmp_path / "bools.parquet", {"prompt": ["a", "b"], "image": [image_bytes()] * 2,
                                                           "label": [True, False]})
    records, _ = read_preferences(DataConfig(format="labelled"), booleans)
    assert [r.labels for r in records] == [[1.0], [0.0]]


def test_ranked_table_of_binary_lists(tmp_path):
    source = write_parquet(tmp_path / "ranked.parquet", {
        "prompt": ["a", "b", "c", "d"],
        "images": [[image_bytes(RED), image_bytes(BLUE), image_bytes(GREEN)], [image_bytes(GREEN), image_bytes(RED)],
                   [image_bytes(RED), image_bytes(BLUE)], None],
        "scores": [[0.3, 0.9, 0.1], [1.0, 2.0, 3.0], [float("nan"), 1.0], [1.0, 2.0]],
    })
    records, report = read_preferences(DataConfig(format="ranked"), source)
    assert [(r.prompt, r.scores) for r in records] == [("a", [0.3, 0.9, 0.1])]
    assert colors(records[0]) == [RED, BLUE, GREEN]
    assert report.skipped == {"bad_scores": 3}


def test_image_list_feature_is_read_without_decoding(tmp_path):
    from datasets import Dataset, Features, Sequence, Value
    from datasets import Image as ImageFeature

    features = Features({"prompt": Value("string"), "images": Sequence(ImageFeature()),
                         "scores": Sequence(Value("float64"))})
    dataset = Dataset.from_dict({
        "prompt": ["broken", "fine"],
        "images": [[image_bytes(RED), {"bytes": image_bytes(BLUE)[:30], "path": None}, image_bytes(GREEN)],
                   [Image.new("RGB", (16, 16), GREEN), {"bytes": image_bytes(RED), "path": None}, image_bytes(BLUE)]],
        "scores": [[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]],
    }, features=features)
    dataset.to_parquet(tmp_path / "images.parquet")
    records, report = read_preferences(DataConfig(), str(tmp_path / "images.parquet"))
    assert [r.prompt for r in records] == ["fine"]  # the truncated one is counted, not a decode error from datasets
    assert report.skipped == {"corrupt_image": 1}
    assert colors(records[0]) == [GREEN, RED, BLUE] and records[0].scores == [3.0, 1.0, 2.0]
    assert all(isinstance(image, bytes) for image in records[0].images)


def test_labelled_image_feature_is_read_without_decoding(tmp_path):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    features = Features({"prompt": Value("string"), "image": ImageFeature(), "label": Value("int64")})
    Dataset.from_dict({
        "prompt": ["a", "b"], "image": [{"bytes": image_bytes()[:30], "path": None}, Image.new("RGB", (16, 16), BLUE)],
        "label": [1, 0],
    }, features=features).to_parquet(tmp_path / "single.parquet")
    records, report = read_preferences(DataConfig(), str(tmp_path / "single.parquet"))
    assert [(r.prompt, r.labels, colors(r)) for r in records] == [("b", [0.0], [BLUE])]
    assert report.skipped == {"corrupt_image": 1}


def test_table_schema_error_and_config_accept_new_formats(tmp_path):
    source = write_parquet(tmp_path / "odd.parquet", {"text": ["a"], "picture": [image_bytes()]})
    with pytest.raises(DataError) as error:
        read_preferences(DataConfig(), source)
    for name in ("image, label, prompt", "images, scores, prompt", "'picture'", "labelled, ranked"):
        assert name in str(error.value)
    labelled = write_parquet(tmp_path / "l.parquet", {"prompt": ["a"], "image": [image_bytes()], "label": [1]})
    with pytest.raises(DataError, match="match no known schema"):
        read_preferences(DataConfig(format="ranked"), labelled)
    for fmt in ("labelled", "ranked"):
        assert load_config(None, [f"data.format={fmt}"]).data.format == fmt


# ---------------------------------------------------------------------------------------------- adapt_records
def record(index, images, scores=None, labels=None, tie=False, prompt=None) -> PreferenceRecord:
    return PreferenceRecord(index=index, prompt=prompt or f"p{index}", images=list(images), labels=labels,
                            scores=scores, tie=tie)


PAIRS = [record(0, [b"w0", b"l0"]), record(1, [b"w1", b"l1"], tie=True)]
SCORED = [record(0, [b"w0", b"l0"], [0.9, 0.1]), record(1, [b"w1", b"l1"], [0.2, 0.7])]
SINGLES = [record(0, [b"a"], labels=[1.0]), record(1, [b"b"], labels=[0.0])]
RANKED = [record(0, [b"a", b"b", b"c"], [0.2, 0.9, 0.1]), record(1, [b"d", b"e", b"f"], [0.5, 0.5, 0.5]),
          record(2, [b"g", b"h", b"i"], [3.0, 1.0, 3.0])]


def test_unknown_data_kind_is_a_value_error():
    with pytest.raises(ValueError, match="unknown data kind 'triplet'"):
        adapt_records(PAIRS, "triplet", "src")


def test_pair_kind(capsys):
    assert adapt_records(PAIRS, "pair", "src") == PAIRS
    assert adapt_records(SCORED, "pair", "src") == SCORED  # scores kept, order untouched
    pairs = adapt_records(RANKED, "pair", "src")
    assert [(r.index, r.images, r.scores) for r in pairs] == [(0, [b"b", b"c"], [0.9, 0.1]),
                                                              (2, [b"g", b"h"], [3.0, 1.0])]
    assert all(r.prompt == f"p{r.index}" for r in pairs)
    assert "turned 2 ranked sets into best-vs-worst pairs; dropped 1" in capsys.readouterr().out
    # a ranking of two with equal scores (read as a tie) has no best and worst either
    two = [record(0, [b"a", b"b"], [0.5, 0.5], tie=True), record(1, [b"c", b"d"], [0.6, 0.5])]
    assert adapt_records(two, "pair", "src") == two[1:]
    with pytest.raises(DataError) as error:
        adapt_records(SINGLES, "pair", "my/source")
    message = str(error.value)
    for part in ("data.source=my/source", "pairwise", "2 labelled single images", "chosen_file_name",
                 "chosen, rejected, prompt", "file_names, scores", "kto"):
        assert part in message
    with pytest.raises(DataError, match="no records are left"):
        adapt_records(RANKED[1:2], "pair", "src")
    assert adapt_records([], "pair", "src") == []


def test_scored_pair_kind():
    assert adapt_records(SCORED, "scored_pair", "src") == SCORED
    assert [r.scores for r in adapt_records(RANKED, "scored_pair", "src")] == [[0.9, 0.1], [3.0, 1.0]]
    with pytest.raises(DataError) as error:
        adapt_records(SCORED + PAIRS, "scored_pair", "pap.parquet")
    message = str(error.value)
    for part in ("data.source=pap.parquet", "scored_pair", "2 of 4 pairs have no scores", "jsonl keys chosen_score",
                 "table columns chosen_score and rejected_score", "file_names, scores"):
        assert part in message
    with pytest.raises(DataError, match="labelled single images"):
        adapt_records(SINGLES, "scored_pair", "src")


def test_labelled_kind(capsys):
    assert adapt_records(SINGLES, "labelled", "src") == SINGLES
    singles = adapt_records(PAIRS + SCORED[1:], "labelled", "src")
    assert [(r.index, r.prompt, r.images, r.labels) for r in singles] == [
        (0, "p0", [b"w0"], [1.0]), (0, "p0", [b"l0"], [0.0]), (1, "p1", [b"w1"], [1.0]), (1, "p1", [b"l1"], [0.0])]
    assert "dropped 1 kept ties" in capsys.readouterr().out
    with pytest.raises(DataError) as error:
        adapt_records(RANKED, "labelled", "ranked.parquet")
    message = str(error.value)
    for part in ("data.source=ranked.parquet", "'labelled'", "3 ranked sets", "file_name, label",
                 "image, label, prompt", "chosen_file_name"):
        assert part in message
    with pytest.raises(DataError, match="no records are left"):
        adapt_records(PAIRS[1:], "labelled", "src")


def test_ranked_kind():
    assert adapt_records(RANKED, "ranked", "src") == RANKED
    assert adapt_records(SCORED, "ranked", "src") == SCORED  # rankings of two
    with pytest.raises(DataError) as error:
        adapt_records(PAIRS, "ranked", "pairs/")
    message = str(error.value)
    for part in ("data.source=pairs/", "'ranked'", "2 of 2 records have no scores", "scores",
                 "file_names, scores", "chosen_score"):
        assert part in message
    with pytest.raises(DataError) as error:
        adapt_records(RANKED + SCORED + RANKED, "ranked", "mixed")
    message = str(error.value)
    for part in ("data.source=mixed", "equal image counts", "K=2: 2 records", "K=3: 6 records", "K=3 sets"):
        assert part in message
    with pytest.raises(DataError, match="2 labelled single images"):
        adapt_records(SINGLES, "ranked", "src")


def test_read_then_adapt_fails_before_training(tmp_path):
    """What the trainer does: read, then adapt to the objective's kind; missing fields fail right there."""
    folder = folder_with(tmp_path, [pair(), pair(chosen="green.png")])
    records, _ = read_preferences(DataConfig(), str(folder))
    with pytest.raises(DataError, match=f"data.source={folder}: .* 2 of 2 pairs have no scores"):
        adapt_records(records, "scored_pair", str(folder))
    singles = adapt_records(records, "labelled", str(folder))
    assert [(colors(r), r.labels) for r in singles] == [([RED], [1.0]), ([BLUE], [0.0]), ([GREEN], [1.0]),
                                                        ([BLUE], [0.0])]
