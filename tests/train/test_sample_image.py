"""``make sample IMAGE=``: the user's file gets the download stage's checks (its size in bytes, its
pixel count, that it decodes), each failure one line naming the file, before any model loads."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from four_m.cli import main
from four_m.core.config import load_config
from four_m.train.sample import user_image


def _png(width: int = 96, height: int = 64) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes that claims ``width`` x ``height`` pixels in its header, with a
    first row of data (the probe's 380 KB 20000x20000 PNG decoded to 3.3 GB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    rows = zlib.compress(bytes(1 + 3 * width))  # one row: its filter byte, then black pixels
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _jpeg_cut_short() -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(_png(256, 256))).save(out, "JPEG", quality=95)
    return out.getvalue()[: len(out.getvalue()) // 2]


CASES = {
    "a device read without end": (None, "/dev/zero", "not a regular file"),
    "no file": (None, "missing.png", "no such file"),
    "a folder": (None, ".", "not a regular file"),
    "an empty file": (b"", None, "not an image: the file is empty"),
    "20000 x 20000 pixels": (_png_claiming(20_000, 20_000), None, "decompression bomb: "),
    "over the byte limit": (_png(), None, "file too large: more than 1000 bytes"),
    "not an image": (b"<html>moved</html>", None, "not an image: cannot identify image file"),
    "a JPEG cut short": (_jpeg_cut_short(), None, "broken image: image file is truncated"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_image_file_is_refused_in_one_line_naming_it_before_the_run_loads(tmp_path, capsys, case):
    data, path, reason = CASES[case]
    if data is not None:
        path = str(tmp_path / "photo.png")
        Path(path).write_bytes(data)
    elif not path.startswith("/"):
        path = str(tmp_path / path)
    limit = ["--set", "download.max_image_bytes=1000"] if case == "over the byte limit" else []
    root = str(tmp_path / "root")  # no run at all: the image is refused before one is looked for
    assert main(["sample", "--root", root, *limit, "--image", path]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"four_m sample: error: cannot use image {path}: ") and reason in error, error
    assert error.count("\n") == 1


def test_an_image_within_the_limits_becomes_its_label_view(tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(_png(96, 64))
    config = load_config("default", ["label.size=32", "download.max_image_pixels=6144"], root=str(tmp_path))
    image = user_image(config, photo)  # exactly at the pixel limit: 96 x 64
    assert image.data == photo.read_bytes() and image.view.shape == (3, 32, 32)
