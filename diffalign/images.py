"""The one image decoder of diffalign: every image that enters it (training readers, the feature cache, the uncached
dataset, ``diffalign score``, grids read back, the tiny data's scores) is decoded by ``load_image``.

What it does, in order:

1. Opens the header (``PIL.Image.open`` is lazy) and applies our own pixel limit, ``max_pixels`` (default Pillow's
   decompression-bomb limit, ``PILLOW_MAX_PIXELS``; ``data.max_image_pixels`` / ``--max-image-pixels`` raise it).
   Pillow's own guard (a warning above its global ``Image.MAX_IMAGE_PIXELS``, an error above twice that) is
   replaced by ours: the warning is silenced, and an image that our limit allows but Pillow's global refuses is
   decoded again with the global guard lifted for that one decode (under a lock, restored after).
2. Decodes the pixels fully, so truncated files fail here and not in a training step.
3. Turns it upright from its orientation metadata, whatever the container (JPEG EXIF, PNG eXIf, WebP EXIF, TIFF
   tag 274), with ``PIL.ImageOps.exif_transpose``, as ``diffusers.utils.load_image`` does.
4. Converts to RGB (``to_rgb``: transparency composited on white, 16-bit rescaled).

The one image grid of diffalign is here too: ``labelled_grid`` (validation images, ``diffalign sample``, ``pairs``
and ``eval`` overviews).

This module imports only Pillow, numpy, the standard library and ``diffalign.errors``, so anything may import it.
"""

from __future__ import annotations

import io
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from diffalign.errors import DataError

PILLOW_MAX_PIXELS = 89_478_485  # Pillow's default Image.MAX_IMAGE_PIXELS (1024 * 1024 * 1024 // 4 // 3)
SETTING_HINT = "raise it with data.max_image_pixels=N (diffalign score: --max-image-pixels N)"
ORIENTATION = 0x0112  # the EXIF / TIFF Orientation tag (274)
_PILLOW_GUARD = threading.Lock()


class ImageTooLarge(DataError):
    """An image whose width x height is over the pixel limit; the message names the setting that raises it."""

    def __init__(self, width: int, height: int, limit: int):
        self.width, self.height, self.limit = width, height, limit
        super().__init__(f"{width}x{height} = {width * height} pixels is over the {limit}-pixel limit (Pillow's "
                         f"decompression-bomb guard); {SETTING_HINT}")


def load_image(source: bytes | bytearray | Path | str, max_pixels: int | None = PILLOW_MAX_PIXELS,
               max_side: int | None = None) -> Image.Image:
    """Decode an image fully, upright (EXIF / eXIf orientation applied) and in RGB.

    Args:
        source: encoded bytes, or a path to an image file.
        max_pixels: the most width x height (in pixels, of the stored image) that is decoded; None = no limit.
            The default is Pillow's decompression-bomb limit, 89,478,485 pixels.
        max_side: when given, the longest side of the result is at most this many pixels: JPEGs are decoded at a
            reduced scale (``Image.draft``), then the image is shrunk with bicubic resampling, keeping its aspect.

    Raises:
        ImageTooLarge: the image is over ``max_pixels`` (checked from the header, before any pixel is decoded).
        FileNotFoundError: ``source`` is a path that does not exist.
        PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError, ...: the data is not a decodable image
            (Pillow raises many types; callers that skip bad images catch ``Exception``).
    """
    try:
        return _decode(source, max_pixels, max_side)
    except Image.DecompressionBombError:
        pass  # Pillow's global guard refused it: decode with that guard lifted, so only our own limit applies
    with _PILLOW_GUARD:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return _decode(source, max_pixels, max_side)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _decode(source: bytes | bytearray | Path | str, max_pixels: int | None, max_side: int | None) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
        with io.BytesIO(source) if isinstance(source, bytes | bytearray) else open(source, "rb") as handle:
            image = Image.open(handle)
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLarge(width, height, max_pixels)
            if max_side is not None:
                image.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale when very large
            image.load()  # everything is read while the file is open (a PNG's eXIf may follow its pixels)
            ImageOps.exif_transpose(image, in_place=True)
    image = to_rgb(image)
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return image


def upright(image: Image.Image) -> Image.Image:
    """An already opened image turned upright from its EXIF orientation: a transposed copy when it has one (other
    than 1), else the image itself. For images handed over decoded (e.g. PIL cells of an in-memory dataset)."""
    if image.getexif().get(ORIENTATION, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB conversion that composites transparency on white and rescales 16-bit modes instead of clipping.

    Integer grayscale is scaled to 0..255 by its full range (``sample_peak``): "I;16", "I;16B" and "I;16L" are
    16-bit by definition, so a value of 200 is 200/65535 (nearly black), never 200/255. Mode "I" (32-bit ints) is
    ambiguous, and is read as 16-bit (peak 65535) when it was decoded from a format that stores 16 bits per sample:
    PNG (Pillow < 10 opened 16-bit grayscale PNGs as "I"; PNG samples are at most 16 bits), PPM / PGM (Pillow
    stretches a maxval over 255 to 0..65535) or TIFF with BitsPerSample 16. Any other "I" image (a 32-bit TIFF, one
    built in memory) keeps the guess from its values: peak 65535 if any is over 255, else 255. Values outside
    0..peak are clipped.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in (*SIXTEEN_BIT_MODES, "I"):
        array = np.asarray(image, dtype=np.float64)
        scaled = np.clip(array / sample_peak(image, array) * 255, 0, 255)
        return Image.fromarray(scaled.round().astype("uint8")).convert("RGB")
    return image.convert("RGB")


def sample_peak(image: Image.Image, array) -> float:
    """The value that maps to white for an integer grayscale image (mode "I;16*" or "I"); see ``to_rgb``."""
    if image.mode in SIXTEEN_BIT_MODES:
        return 65535.0
    if image.format in ("PNG", "PPM"):
        return 65535.0
    if image.format == "TIFF":
        bits = getattr(image, "tag_v2", {}).get(258)  # BitsPerSample: a tuple, one entry per sample
        if (bits if isinstance(bits, tuple) else (bits,)) == (16,):
            return 65535.0
    return 65535.0 if array.size and array.max() > 255 else 255.0


# ---------------------------------------------------------------------------------------------- grids
MIN_CELL = 128  # tiny 32 px images are enlarged to this so the grid is readable
STRIP = 14  # height of a text strip (column header, row caption, cell caption)


def cell_size(image: Image.Image) -> tuple[int, int]:
    factor = -(-MIN_CELL // image.width) if image.width < MIN_CELL else 1
    return image.width * factor, image.height * factor


def labelled_grid(rows: list[list[Image.Image]], row_labels: list[str] | None = None,
                  cell_labels: list[list[str]] | None = None, column_labels: list[str] | None = None,
                  borders: list[list[str | None]] | None = None) -> Image.Image:
    """Images in rows, every cell the size of the first image (enlarged to >= 128 px wide).

    Layout, top to bottom: a header strip with ``column_labels``; then per row a caption strip (``row_labels``),
    the images, and a strip under each image with its ``cell_labels``. Each strip is 14 px and present only when
    its labels are given, so the size is ``(columns * cell_w, header + rows * (caption + cell_h + cell_caption))``.
    ``borders`` names an outline colour per cell (None = no outline).
    """
    assert rows and rows[0], "a grid needs at least one image"
    width, height = cell_size(rows[0][0])
    columns = max(len(row) for row in rows)
    header = STRIP if column_labels else 0
    caption = STRIP if row_labels else 0
    under = STRIP if cell_labels else 0
    row_height = caption + height + under
    grid = Image.new("RGB", (columns * width, header + len(rows) * row_height), "white")
    draw = ImageDraw.Draw(grid)
    chars = max(width // 6, 1)  # the default bitmap font is about 6 px per character
    for col, label in enumerate(column_labels or []):
        draw.text((col * width + 2, 1), label[:chars], fill="black")
    for r, row in enumerate(rows):
        top = header + r * row_height
        if row_labels:
            draw.text((2, top + 1), row_labels[r][: columns * chars], fill="black")
        for col, image in enumerate(row):
            left, image_top = col * width, top + caption
            grid.paste(image.convert("RGB").resize((width, height), Image.NEAREST), (left, image_top))
            colour = borders[r][col] if borders else None
            if colour:
                draw.rectangle((left, image_top, left + width - 1, image_top + height - 1), outline=colour, width=3)
            if cell_labels:
                draw.text((left + 2, image_top + height + 1), cell_labels[r][col][:chars], fill="black")
    return grid
