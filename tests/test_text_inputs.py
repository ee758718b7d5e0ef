"""Undecodable or malformed text in every reader: a counted skip naming the file and line, or a one-line error.

Each reader gets real files written here with a bad byte (0xff), a NUL, a byte-order mark, JSON that is not an
object, and prompts that are not strings; the good lines around them must still be read, in place.
"""

import codecs
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffalign.config import DataConfig
from diffalign.data import DataError, read_preferences
from diffalign.evaluation.pairs import read_groups
from diffalign.evaluation.prompts import load_prompts, read_prompts
from diffalign.rewards.scoring import collect_rows, read_prompt_map
from diffalign.text import TextError, json_array_items, read_text, text_lines, text_problem

RED, BLUE = (255, 0, 0), (0, 0, 255)


def png(color=RED) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def pair_line(prompt: str) -> bytes:
    return json.dumps({"prompt": prompt, "chosen_file_name": "red.png", "rejected_file_name": "blue.png"}).encode()


def write_lines(path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_text_lines_decode_each_line_strictly_and_name_file_line_and_column(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(codecs.BOM_UTF8 + b"one\r\ntw\xffo\nth\x00ree\n\xc3\xa9t\xc3\xa9")
    lines = list(text_lines(path))
    assert [(line.number, line.text) for line in lines] == [(1, "one"), (2, None), (3, None), (4, "été")]
    assert lines[1].problem == f"line 2 of {path} is not UTF-8 (byte 0xff at column 3)"
    assert lines[2].problem.startswith(f"line 3 of {path} has a NUL character at column 3")
    assert text_problem(42) == "prompt is a number (42), not text"
    assert text_problem(["a"]) == "prompt is a list of 1, not text"
    assert text_problem(None) == "prompt is null, not text"
    assert text_problem("a\ud800") == "prompt has a lone surrogate \\ud800 at column 2 (a broken \\u escape)"
    assert text_problem("a cat") is None
    with pytest.raises(TextError, match=r"line 2 of .* is not UTF-8 \(byte 0xff at column 3\); save the file"):
        read_text(path)


def test_json_array_items_streams_across_chunk_boundaries(tmp_path):
    items = [{"prompt": f"p{i} é", "image_path": [f"{i}.jpg", "b.jpg"], "n": 10 ** 12 + i} for i in range(300)]
    path = tmp_path / "a.json"
    for indent in (None, 2):
        path.write_text(json.dumps(items, indent=indent, ensure_ascii=False), encoding="utf-8")
        for chunk in (1, 7, 4096):  # a chunk of one character splits every number, string and escape
            assert [item for _, _, item in json_array_items(path, chunk_chars=chunk)] == items
    path.write_bytes(b'[{"prompt": "a\xffb"}, 7]')  # a bad byte inside a string spoils only that item
    (_, where, first), (_, _, second) = json_array_items(path, chunk_chars=3)
    assert where == f"item 0 (line 1) of {path}" and second == 7
    assert text_problem(first["prompt"]) == "prompt is not UTF-8 (byte 0xff at column 2)"
    for text, message in [(b'{"a": 1}', "is not a JSON array"), (b'[{"a": 1}, {"b": ', "item 1 .* is not valid JSON"),
                          (b'[1 2]', "expected ',' or ']' after item 0"), (b'[1]\n[2]', "more text after"),
                          (b'[1,\n\xff]', r"item 1 \(line 2\) .* not UTF-8 \(byte 0xff outside a string\)")]:
        path.write_bytes(text)
        with pytest.raises(TextError, match=message):
            list(json_array_items(path, chunk_chars=2))


def test_jsonl_metadata_with_a_bad_caption_byte_skips_that_line_only(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "red.png").write_bytes(png(RED))
    (folder / "blue.png").write_bytes(png(BLUE))
    write_lines(folder / "metadata.jsonl", [
        codecs.BOM_UTF8 + pair_line("first"),  # a byte-order mark on the first line is dropped
        pair_line("ok"),
        pair_line("caf\u00e9 x").replace(b"\\u00e9", b"\xff"),  # a raw 0xff inside the caption
        json.dumps(["a", "list"]).encode(),
        json.dumps({"prompt": 42, "chosen_file_name": "red.png", "rejected_file_name": "blue.png"}).encode(),
        json.dumps({"prompt": ["x"], "chosen_file_name": "red.png", "rejected_file_name": "blue.png"}).encode(),
        json.dumps({"prompt": None, "chosen_file_name": "red.png", "rejected_file_name": "blue.png"}).encode(),
        pair_line("a\x00b"),  # an escaped NUL inside the prompt
        b'{"prompt": "x\\ud800", "chosen_file_name": "red.png", "rejected_file_name": "blue.png"}',
        b"nul\x00byte",
        pair_line("last"),
    ])
    records, report = read_preferences(DataConfig(), str(folder))
    assert [(r.index, r.prompt) for r in records] == [(0, "first"), (1, "ok"), (10, "last")]
    assert report.skipped == {"bad_text": 6, "bad_json": 1, "empty_prompt": 1}
    metadata = folder / "metadata.jsonl"
    assert report.examples["bad_text"][0] == (f"record 2: bad_text: line 3 of {metadata} is not UTF-8 "
                                              f"(byte 0xff at column 16)")
    assert f"line 5 of {metadata}: prompt is a number (42), not text" in report.examples["bad_text"][1]
    assert f"line 6 of {metadata}: prompt is a list of 1, not text" in report.examples["bad_text"][2]
    assert f"line 4 of {metadata} is a list of 2, not a JSON object" in report.examples["bad_json"][0]
    assert f"line 7 of {metadata}: prompt=None" in report.examples["empty_prompt"][0]
    with pytest.raises(DataError, match=r"record 2: bad_text: line 3 of .* is not UTF-8 .*data.strict=true"):
        read_preferences(DataConfig(strict=True), str(folder))


def test_binary_prompt_column_in_parquet_is_decoded_or_skipped_by_row(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({
        "prompt": pa.array(["café".encode(), b"bad \xff byte", b"", b"nul\x00"], type=pa.binary()),
        "chosen": pa.array([png(RED)] * 4, type=pa.binary()),
        "rejected": pa.array([png(BLUE)] * 4, type=pa.binary()),
    }), path)
    records, report = read_preferences(DataConfig(), str(path))
    assert [r.prompt for r in records] == ["café"]
    assert report.skipped == {"bad_text": 2, "empty_prompt": 1}
    assert report.examples["bad_text"][0] == f"record 1: bad_text: row 1 of {path}: prompt is not UTF-8 (byte 0xff at column 5)"
    assert "row 3" in report.examples["bad_text"][1] and "NUL" in report.examples["bad_text"][1]


def test_prompt_files_skip_and_report_bad_lines(tmp_path, capsys):
    txt = tmp_path / "p.txt"
    txt.write_bytes(codecs.BOM_UTF8 + b"one\r\n\nt\xffwo\nthree\n")
    assert read_prompts(prompts_file=str(txt)) == ["one", "three"]
    out = capsys.readouterr().out
    assert f"prompts from {txt}: kept 2, skipped 1 (bad_text: 1); first: line 3 of {txt} is not UTF-8" in out
    assert load_prompts(str(txt)) == ["one", "three"]  # eval and pairs read files through the same function
    jsonl = tmp_path / "p.jsonl"
    write_lines(jsonl, [b'{"prompt": "x"}', b"{oops", b'["y"]', b'{"text": "z"}', b'{"prompt": 3}',
                        b'{"prompt": "caf\xff"}', b'{"prompt": " y "}'])
    assert read_prompts(prompts_file=str(jsonl)) == ["x", "y"]
    out = capsys.readouterr().out
    assert ("kept 2, skipped 5 (bad_json: 2, bad_text: 2, missing_field: 1); first: line 2 of "
            f"{jsonl}: not JSON (Expecting property name") in out
    jsonl.write_bytes(b"\xff\n{}\n")
    with pytest.raises(ValueError, match=r"holds no prompts \(prompts from .*skipped 2"):
        read_prompts(prompts_file=str(jsonl))


def test_hpsv2_benchmark_json_bad_bytes_are_one_line_and_bad_entries_skipped(tmp_path, capsys):
    bench = tmp_path / "benchmark"
    bench.mkdir()
    (bench / "photo.json").write_bytes(b'["a photo", 3, null, "\\u0000x", "  ", "ok"]')
    assert load_prompts("hpsv2:photo", source=tmp_path) == ["a photo", "ok"]
    out = capsys.readouterr().out
    assert (f"kept 2, skipped 4 (bad_text: 3, empty_prompt: 1); first: entry 1 of {bench / 'photo.json'}: prompt "
            "is a number (3)") in out
    (bench / "photo.json").write_bytes(b'[\n"a",\n"caf\xff"\n]')
    with pytest.raises(ValueError, match=r"line 3 of .*photo.json is not UTF-8 \(byte 0xff at column 5\)"):
        load_prompts("hpsv2:photo", source=tmp_path)
    (bench / "photo.json").write_bytes(b'["a",')
    with pytest.raises(ValueError, match=r"photo.json is not valid JSON \(Expecting value at line 1, column 6\)"):
        load_prompts("hpsv2:photo", source=tmp_path)


def test_parti_tsv_with_a_bad_byte_names_the_line(tmp_path):
    tsv = tmp_path / "PartiPrompts.tsv"
    tsv.write_bytes(b"Prompt\tCategory\tChallenge\tNote\na cat\tAnimals\tSimple\t\na d\xffg\tAnimals\tSimple\t\n")
    with pytest.raises(ValueError, match=r"PartiPrompts source line 3 of .* is not UTF-8 \(byte 0xff at column 4\)"):
        load_prompts("parti", source=tsv)


def score_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (folder / name).write_bytes(png())
    return folder


def test_score_txt_prompts_keep_their_alignment_around_a_bad_line(tmp_path, capsys):
    folder = score_folder(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"first\nse\xffcond\nthird\n")
    files = sorted(folder.iterdir())
    assert read_prompt_map(str(prompts), files, str(folder)) == {files[0]: "first", files[2]: "third"}
    out = capsys.readouterr().out
    assert f"line 2 of {prompts} is not UTF-8 (byte 0xff at column 3); its image (b.png) gets no prompt" in out
    rows = collect_rows(str(folder), str(prompts))
    assert [(row.prompt, row.error) for row in rows] == [("first", None), (None, "no prompt for this image"),
                                                         ("third", None)]
    prompts.write_bytes(b"first\nse\xffcond\n")
    with pytest.raises(ValueError, match="has 2 prompts for 3 images"):  # a bad line still counts as a line
        read_prompt_map(str(prompts), files, str(folder))


def test_score_samples_jsonl_skips_bad_lines_and_reports_them(tmp_path, capsys):
    folder = score_folder(tmp_path)
    write_lines(folder / "samples.jsonl", [b'{"file_name": "a.png", "prompt": "x"}', b'{"file_name": "b.png", "prompt": "\xff"}',
                                           b'[1]', b'{"prompt": "no file"}', b'{"file_name": "c.png", "prompt": 5}'])
    files = sorted(p for p in folder.iterdir() if p.suffix == ".png")
    assert read_prompt_map(None, files, str(folder)) == {files[0]: "x"}
    out = capsys.readouterr().out
    assert (f"prompts from {folder / 'samples.jsonl'}: kept 1, skipped 4 (bad_json: 1, bad_text: 2, missing_field: 1); "
            f"first: line 2 of {folder / 'samples.jsonl'} is not UTF-8 (byte 0xff at column 35)") in out


def test_pairs_group_log_with_a_bad_byte(tmp_path):
    line = json.dumps({"prompt_index": 0, "prompt": "a", "seeds": [0, 1], "file_names": ["x", "y"],
                       "scores": {"clip": [1.0, 2.0]}, "combined": [1.0, 2.0]}).encode()
    log = tmp_path / "groups.jsonl"
    log.write_bytes(line + b"\n" + line[:20] + b"\xe2\x82")  # killed mid-character: the last line is dropped
    assert [g.prompt for g in read_groups(log)] == ["a"]
    log.write_bytes(line + b"\n" + line.replace(b'"a"', b'"\xff"') + b"\n" + line + b"\n")
    with pytest.raises(ValueError, match=r"line 2 is not a group record \(not UTF-8 \(byte 0xff at column \d+\)\)"):
        read_groups(log)


@pytest.mark.parametrize("name, content", [
    ("pairs.csv", b"prompt,chosen,rejected\na,b,c\n"),
    ("prompts.txt", b"a cat\n"),
    ("broken.parquet", b"PAR1 not really"),
    ("other.json", b'{"data": [1, 2]}'),
    ("list.json", b'[{"caption": "x", "images": ["a.png"]}]'),
])
def test_unknown_local_sources_are_one_line_errors_listing_the_formats(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    for source in (str(path), str(tmp_path / f"*{path.suffix}")):
        with pytest.raises(DataError) as error:
            read_preferences(DataConfig(), source)
        message = str(error.value)
        assert "\n" not in message and str(path) in message
        assert "metadata.jsonl" in message and "hpdv2" in message.lower()  # every format we read is named
        assert "parquet" in message or "chosen_rejected" in message
