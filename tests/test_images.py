"""The one image decoder (diffalign.images): orientation metadata honoured in every container, as diffusers'
load_image does, through the readers and the feature cache (SDXL's recorded sizes are the upright ones); Pillow's
decompression-bomb limit as a counted skip with a setting to raise it; and no second decoder in the package."""

import ast
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffalign.config import Config, DataConfig
from diffalign.data import DataError, SkipReport, open_image, read_preferences
from diffalign.data.formats import Row
from diffalign.data.validation import make_record
from diffalign.images import PILLOW_MAX_PIXELS, ImageTooLarge, load_image

ROOT = Path(__file__).resolve().parents[1]
RED, BLUE = (255, 0, 0), (0, 0, 255)
FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "TIFF": "tif"}
# Stored 64 wide x 32 tall, blue with a red 16x16 block in the stored top-left corner. Where that block is once
# the image is upright, per EXIF orientation, as (upright width, height) and a (row, column) inside the block:
UPRIGHT = {
    6: ((32, 64), (4, 28)),  # rotate 90 clockwise to display: the top-left corner goes to the top right
    8: ((32, 64), (60, 4)),  # rotate 90 counter-clockwise: to the bottom left
    3: ((64, 32), (28, 60)),  # rotate 180: to the bottom right
}


def oriented(orientation: int = 6, fmt: str = "JPEG") -> bytes:
    image = Image.new("RGB", (64, 32), BLUE)
    image.paste(RED, (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def is_red(pixel) -> bool:
    return pixel[0] > 200 and pixel[2] < 60


def bomb_png(side: int = 9500) -> bytes:
    """A 1-bit PNG of side x side pixels (over Pillow's 89,478,485 at 9500): about 11 KB on disk."""
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_load_image_turns_every_container_upright_as_diffusers_does(tmp_path, fmt, orientation):
    from diffusers.utils import load_image as diffusers_load_image

    path = tmp_path / f"oriented.{FORMATS[fmt]}"
    path.write_bytes(oriented(orientation, fmt))
    reference = diffusers_load_image(str(path))
    size, (row, column) = UPRIGHT[orientation]
    for source in (path, str(path), path.read_bytes()):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == reference.size == size
        pixels = np.asarray(image)
        np.testing.assert_array_equal(pixels, np.asarray(reference))
        assert is_red(pixels[row, column]) and not is_red(pixels[size[1] - 1 - row, size[0] - 1 - column])


def test_only_diffalign_images_calls_image_open():
    """One decoder: a second ``Image.open`` anywhere in the package would skip orientation or the pixel limit."""
    offenders = []
    for file in sorted((ROOT / "diffalign").rglob("*.py")):
        if file.name == "images.py" and file.parent.name == "diffalign":
            continue
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            calls_open = (isinstance(node, ast.Attribute) and node.attr == "open"
                          and ast.unparse(node.value).split(".")[-1] == "Image")
            imports_open = (isinstance(node, ast.ImportFrom) and (node.module or "").endswith("Image")
                            and any(alias.name == "open" for alias in node.names))
            if calls_open or imports_open:
                offenders.append(f"{file.relative_to(ROOT)}:{node.lineno}")
    assert offenders == [], f"decode images with diffalign.images.load_image, not Image.open: {offenders}"


def oriented_pairs(tmp_path) -> tuple[str, str]:
    """The same pair as a jsonl folder and as a parquet table of bytes: an oriented JPEG (chosen), a PNG."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "chosen.jpg").write_bytes(oriented(6))
    Image.new("RGB", (48, 32), BLUE).save(folder / "rejected.png")
    entry = {"prompt": "a red corner", "chosen_file_name": "chosen.jpg", "rejected_file_name": "rejected.png"}
    (folder / "metadata.jsonl").write_text(json.dumps(entry) + "\n")
    table = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["a red corner"], "chosen": [(folder / "chosen.jpg").read_bytes()],
                             "rejected": [(folder / "rejected.png").read_bytes()]}), table)
    return str(folder), str(table)


def test_readers_keep_oriented_images_and_decode_them_upright(tmp_path):
    for source in oriented_pairs(tmp_path):
        records, report = read_preferences(DataConfig(), source)
        assert report.kept == 1 and report.total_skipped == 0
        chosen = open_image(records[0].images[0])
        assert chosen.size == (32, 64) and is_red(np.asarray(chosen)[4, 28])
    # an image handed over already opened (a PIL cell) is re-encoded by the reader: upright first
    opened = Image.open(io.BytesIO(oriented(8)))
    record = make_record(Row(0, "caption", "a red corner", [opened]), DataConfig(), SkipReport())
    assert open_image(record.images[0]).size == (32, 64) and is_red(np.asarray(open_image(record.images[0]))[60, 4])


@pytest.fixture(scope="module")
def sdxl_components():
    from diffalign.families import load_components

    return load_components(sdxl_config(None).model)


def sdxl_config(cache_dir) -> Config:
    from diffalign.offline.specs import resolve_model_spec

    cfg = Config()
    cfg.model.pretrained = resolve_model_spec("tiny:sdxl")
    cfg.data.cache_dir = None if cache_dir is None else str(cache_dir)
    return cfg


def test_sdxl_cache_and_uncached_data_record_the_upright_size(tmp_path, sdxl_components):
    from diffalign.data.build import build_index
    from diffalign.data.dataset import RawPreferenceDataset

    cfg, components = sdxl_config(tmp_path / "features"), sdxl_components
    family, resolution = components.family, components.resolution
    assert resolution == 32
    folder, table = oriented_pairs(tmp_path)
    upright = load_image(Path(folder) / "chosen.jpg")
    # (orig_h, orig_w, crop_top, crop_left) of a 32 wide x 64 tall image at 32 px: no resize, 16 rows cut on top
    expected = [64, 32, 16, 0]
    for source in (folder, table):
        records, _ = read_preferences(cfg.data, source)
        index = build_index(cfg.data, cfg.model, "pair", components, source, show_progress=False)
        assert index.sizes(0)[0].tolist() == expected
        encoded = family.encode_images(components, family.preprocess_image(upright, resolution)[None])[0]
        torch.testing.assert_close(index.latents(0, False)[0], encoded)
        raw = RawPreferenceDataset(records, family, resolution, 2, seed=0, random_flip=False)[(0, 0)]
        assert raw["image_sizes"][0].tolist() == expected
        torch.testing.assert_close(raw["pixels"][0], family.preprocess_image(upright, resolution))


def test_pixel_limit_is_read_from_the_header_and_names_the_setting():
    assert PILLOW_MAX_PIXELS == Image.MAX_IMAGE_PIXELS == DataConfig().max_image_pixels == 89_478_485
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), RED).save(buffer, format="PNG")
    with pytest.raises(ImageTooLarge) as raised:
        load_image(buffer.getvalue(), max_pixels=1000)
    assert str(raised.value) == (
        "40x40 = 1600 pixels is over the 1000-pixel limit (Pillow's decompression-bomb guard); raise it with "
        "data.max_image_pixels=N (diffalign score: --max-image-pixels N)")
    assert load_image(buffer.getvalue(), max_pixels=1600).size == (40, 40)
    # over Pillow's limit but under twice it: Pillow alone only warns and decodes; the default limit refuses it
    with pytest.raises(ImageTooLarge, match="9500x9500 = 90250000 pixels is over the 89478485-pixel limit"):
        load_image(bomb_png())


def test_raised_limit_lifts_pillows_own_guard_for_that_decode_only(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 700)  # Pillow refuses > 1400 pixels, warns > 700
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), RED).save(buffer, format="PNG")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(buffer.getvalue()))
    assert load_image(buffer.getvalue()).size == (40, 40)  # our default limit is Pillow's default, not its global
    assert load_image(buffer.getvalue(), max_pixels=None).size == (40, 40)
    with pytest.raises(ImageTooLarge, match="over the 1000-pixel limit"):
        load_image(buffer.getvalue(), max_pixels=1000)
    assert Image.MAX_IMAGE_PIXELS == 700  # restored after each decode
    buffer = io.BytesIO()
    Image.new("RGB", (30, 30), RED).save(buffer, format="PNG")  # 900: Pillow would warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(buffer.getvalue(), max_pixels=None).size == (30, 30)


def test_readers_skip_images_over_the_limit_with_the_reason_and_a_raised_limit_never_fails_later(tmp_path,
                                                                                                  sdxl_components):
    from diffalign.data.build import build_index
    from diffalign.data.dataset import RawPreferenceDataset

    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "big.png").write_bytes(bomb_png())
    Image.new("RGB", (40, 40), RED).save(folder / "small.png")
    Image.new("RGB", (40, 40), BLUE).save(folder / "other.png")
    entries = [{"prompt": "big", "chosen_file_name": "big.png", "rejected_file_name": "small.png"},
               {"prompt": "small", "chosen_file_name": "small.png", "rejected_file_name": "other.png"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    records, report = read_preferences(DataConfig(), str(folder))
    assert [r.prompt for r in records] == ["small"] and report.skipped == {"image_too_large": 1}
    assert "9500x9500" in report.summary() and "data.max_image_pixels=N" in report.summary()
    with pytest.raises(DataError, match="record 0: image_too_large: .*data.max_image_pixels=N"):
        read_preferences(DataConfig(strict=True), str(folder))
    _, report = read_preferences(DataConfig(max_image_pixels=1000), str(folder))
    assert report.kept == 0 and report.skipped == {"image_too_large": 2}  # 40x40 = 1600 is over 1000 too
    # raised: kept, and the cache and the uncached dataset decode it again without a limit
    cfg, components = sdxl_config(tmp_path / "features"), sdxl_components
    cfg.data.max_image_pixels = 100_000_000
    records, report = read_preferences(cfg.data, str(folder))
    assert report.kept == 2 and report.total_skipped == 0
    cfg.data.max_samples = 1
    index = build_index(cfg.data, cfg.model, "pair", components, str(folder), show_progress=False)
    assert index.sizes(0)[0].tolist() == [9500, 9500, 0, 0]
    raw = RawPreferenceDataset(records[:1], components.family, components.resolution, 2, seed=0, random_flip=False)
    assert raw[(0, 0)]["image_sizes"][0].tolist() == [9500, 9500, 0, 0]


@pytest.mark.parametrize("value, expected", [(200, 1), (40000, 156)])  # round(value / 65535 * 255)
def test_16_bit_png_is_scaled_by_65535_even_when_every_value_is_at_most_255(tmp_path, value, expected):
    path = tmp_path / f"gray16_{value}.png"
    Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(path)
    with Image.open(path) as opened:
        assert opened.mode == "I;16"  # what the installed Pillow gives for a 16-bit grayscale PNG
    assert load_image(path).getpixel((0, 0)) == (expected, expected, expected)


def test_mode_i_is_16_bit_only_when_its_file_stores_16_bits(tmp_path):
    pgm = tmp_path / "gray16.pgm"  # 16-bit PGM: Pillow opens it as mode "I"
    pgm.write_bytes(b"P5\n8 8\n65535\n" + np.full(64, 200, dtype=">u2").tobytes())
    with Image.open(pgm) as opened:
        assert opened.mode == "I"
    assert load_image(pgm).getpixel((0, 0)) == (1, 1, 1)
    tiff = tmp_path / "int32.tif"  # 32 bits per sample: the range is guessed from the values
    Image.fromarray(np.full((8, 8), 200, dtype=np.int32)).save(tiff)
    with Image.open(tiff) as opened:
        assert opened.mode == "I" and opened.tag_v2[258] == (32,)
    assert load_image(tiff).getpixel((0, 0)) == (200, 200, 200)
