import io

import cv2
import numpy as np
import pytest
from PIL import Image

from four_m.core.failures import failure_reason
from four_m.pipeline.image_check import CheckedResizer, ImageRejected, checked_image_stream

LIMIT = 10_000_000


def _encode(image: Image.Image, fmt: str, **save) -> io.BytesIO:
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    out.seek(0)
    return out


def _photo(width=64, height=32) -> Image.Image:
    gradient = np.linspace(0, 255, width * height * 3).reshape(height, width, 3).astype(np.uint8)
    return Image.fromarray(gradient, "RGB")


def test_an_upright_rgb_jpeg_passes_through_untouched():
    stream = _encode(_photo(), "JPEG")
    assert checked_image_stream(stream, LIMIT) == (stream, (64, 32))
    assert stream.tell() == 0


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    stream = _encode(_photo(64, 32), "JPEG", exif=exif)
    fixed, size = checked_image_stream(stream, LIMIT)
    assert Image.open(fixed).size == size == (32, 64)


def test_truncated_jpeg_is_rejected():
    data = _encode(_photo(256, 256), "JPEG", quality=95).getvalue()
    with pytest.raises(ImageRejected, match="truncated"):
        checked_image_stream(io.BytesIO(data[: len(data) // 2]), LIMIT)


def test_html_body_is_not_an_image():
    with pytest.raises(ImageRejected, match="not an image"):
        checked_image_stream(io.BytesIO(b"<html><body>moved</body></html>"), LIMIT)


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageRejected, match="decompression bomb: 200x100 pixels"):
        checked_image_stream(_encode(_photo(200, 100), "PNG"), max_pixels=10_000)


def test_sixteen_bit_png_becomes_eight_bit():
    values = np.full((8, 8), 40_000, dtype=np.uint16)
    fixed = Image.open(checked_image_stream(_encode(Image.fromarray(values), "PNG"), LIMIT)[0])
    assert fixed.mode == "L"
    assert np.asarray(fixed).max() == 40_000 // 256


def test_sixteen_bit_rgb_png_keeps_its_colours():
    # Pillow opens it as 8-bit RGB, but cv2 (img2dataset's decoder) would see 16 bits and saturate.
    bgr = np.zeros((8, 8, 3), np.uint16)
    bgr[..., 2], bgr[..., 1] = 40_000, 10_000
    resizer = CheckedResizer(max_pixels=LIMIT, image_size=8, resize_mode="keep_ratio", resize_only_if_bigger=False)
    img, *_, error = resizer(io.BytesIO(cv2.imencode(".png", bgr)[1].tobytes()))
    assert error is None
    blue, green, red = cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_COLOR)[4, 4].astype(int)
    assert abs(red - 40_000 // 256) <= 3 and abs(green - 10_000 // 256) <= 3 and blue <= 3


def test_a_banner_too_long_to_store_is_refused_with_a_reason():
    # 4000x2 at a 64 px shorter side would be 128000 px long: more than a JPEG side holds.
    resizer = CheckedResizer(max_pixels=LIMIT, image_size=64, resize_mode="keep_ratio", resize_only_if_bigger=False)
    *_, error = resizer(_encode(_photo(4000, 2), "PNG"))
    assert error.startswith("aspect ratio too large: 4000x2") and failure_reason(error) == "aspect_ratio"
    cropped = CheckedResizer(max_pixels=LIMIT, image_size=64, resize_mode="center_crop", resize_only_if_bigger=False)
    img, width, height, *_, error = cropped(_encode(_photo(4000, 2), "PNG"))
    assert error is None and (width, height) == (64, 64)


def test_cmyk_jpeg_becomes_rgb():
    fixed = Image.open(checked_image_stream(_encode(Image.new("CMYK", (16, 16), (0, 255, 0, 0)), "JPEG"), LIMIT)[0])
    assert fixed.mode == "RGB"
    red, green, blue = np.asarray(fixed)[8, 8]
    assert red > 200 and green < 60 and blue > 200  # magenta


def test_resizer_returns_an_upright_resized_jpeg():
    exif = Image.Exif()
    exif[0x0112] = 6
    resizer = CheckedResizer(max_pixels=LIMIT, image_size=16, resize_mode="keep_ratio", resize_only_if_bigger=False)
    img, width, height, original_width, original_height, error = resizer(_encode(_photo(64, 32), "JPEG", exif=exif))
    assert error is None
    assert (original_width, original_height) == (32, 64)
    assert (width, height) == (16, 32)
    assert cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_COLOR).shape == (32, 16, 3)


def test_resizer_reports_rejections_as_errors():
    resizer = CheckedResizer(max_pixels=LIMIT, image_size=16, resize_mode="keep_ratio", resize_only_if_bigger=False)
    *_, error = resizer(io.BytesIO(b"GIF89a broken"))
    assert error.startswith("not an image") or error.startswith("broken image")
