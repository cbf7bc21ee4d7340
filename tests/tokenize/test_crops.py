"""Aligned crops on a real photo: a box, a semantic-map region and the RGB pixels of one crop show the
same content, flips included; a mirrored normal map is the mirrored geometry."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data

from four_m.core.config import CropConfig
from four_m.core.crops import WHOLE, Crop, draw_crops
from four_m.core.views import centre_square, label_view
from four_m.tokenize.boxes import crop_boxes
from four_m.tokenize.maps import configured

VIEW = 256  # the label view's side, as configs/default.yaml
SIDE = 224  # tokenize.crops.size
BOX = {"x0": 0.30, "y0": 0.35, "x1": 0.55, "y1": 0.60, "class": "cup", "score": 0.9}
CLASS = 7
HAND_MADE = [Crop(0.1, 0.2, 0.7, 0.6, flip=True), Crop(0.3, 0.25, 0.4, 0.4), Crop(0.2, 0.1, 0.55, 0.7, flip=True)]


@pytest.fixture(scope="module")
def photo() -> bytes:
    """skimage's coffee (400 x 600), losslessly encoded: the label view is its centred 400 px square."""
    return cv2.imencode(".png", data.coffee()[:, :, ::-1])[1].tobytes()


def _crops() -> list[Crop]:
    """The whole view, hand-made crops and the drawn crops that hold the whole box (a clipped box
    shows only part of what is under it)."""
    drawn = draw_crops("coffee", CropConfig(n_crops=24, min_scale=0.2))
    inside = [
        c
        for c in drawn[1:]
        if c.left <= BOX["x0"]
        and BOX["x1"] <= c.left + c.width
        and c.top <= BOX["y0"]
        and BOX["y1"] <= c.top + c.height
    ]
    assert any(c.flip for c in inside) and any(not c.flip for c in inside)
    return [WHOLE, *HAND_MADE, *inside]


def _semseg() -> np.ndarray:
    """No class anywhere but class 7 exactly under the box (the box's pixels in the label view)."""
    ids = np.full((VIEW, VIEW), 255, np.int64)
    top, bottom = round(BOX["y0"] * VIEW), round(BOX["y1"] * VIEW)
    left, right = round(BOX["x0"] * VIEW), round(BOX["x1"] * VIEW)
    ids[top:bottom, left:right] = CLASS
    return ids


def _pixels(box: dict, side: int) -> tuple[int, int, int, int]:
    return round(box["y0"] * side), round(box["x0"] * side), round(box["y1"] * side), round(box["x1"] * side)


@pytest.mark.parametrize("crop", _crops(), ids=lambda c: f"{c.top:.2f},{c.left:.2f}{',flip' if c.flip else ''}")
def test_a_box_a_semseg_region_and_the_rgb_pixels_of_one_crop_cover_the_same_content(photo, crop):
    (box,) = crop_boxes([BOX], crop)
    assert box["class"] == "cup" and box["score"] == 0.9

    # The semantic map's class-7 region of the crop is the cropped box, to a pixel.
    seg = configured("semseg", SIDE, {}).crop(_semseg(), crop)
    rows, columns = np.nonzero(seg == CLASS)
    found = rows.min(), columns.min(), rows.max() + 1, columns.max() + 1
    assert np.abs(np.subtract(found, _pixels(box, SIDE))).max() <= 2, (found, _pixels(box, SIDE))

    # The pixel input of the crop shows, inside the cropped box, the photo's content under the box.
    pixels = label_view(photo, SIDE, crop).astype(np.float32)
    top, left, bottom, right = _pixels(box, SIDE)
    square = centre_square(cv2.imdecode(np.frombuffer(photo, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1])
    under_box = square[slice(*_pixels(BOX, len(square))[::2]), slice(*_pixels(BOX, len(square))[1::2])]
    expected = cv2.resize(under_box, (right - left, bottom - top), interpolation=cv2.INTER_AREA).astype(np.float32)
    expected = expected[:, ::-1] if crop.flip else expected
    seen = pixels[top:bottom, left:right]
    error = np.abs(seen - expected).mean()
    assert error < 12, error
    assert np.abs(seen - expected[:, ::-1]).mean() > error + 5  # a wrong mirror would show

    # The RGB tokenizer's input (cut from the stored 256 px label view) is that same crop.
    rgb = configured("rgb", VIEW, {}).parse(photo)
    tokens_input = configured("rgb", SIDE, {}).crop(rgb, crop)
    # (less detail: the 256 px view is enlarged where the pixel input cuts the 400 px photo)
    assert np.abs(tokens_input.transpose(1, 2, 0) * 255 - pixels).mean() < 8


def test_boxes_leaving_the_crop_are_dropped_and_cut_ones_clipped():
    crop = Crop(0.5, 0.5, 0.5, 0.5)
    outside = {**BOX, "x0": 0.0, "x1": 0.4}
    straddling = {**BOX, "x0": 0.4, "x1": 0.8, "y0": 0.6, "y1": 0.9}
    (kept,) = crop_boxes([outside, straddling], crop)
    assert kept["x0"] == 0.0 and kept["x1"] == pytest.approx(0.6) and kept["y0"] == pytest.approx(0.2)
    (mirrored,) = crop_boxes([straddling], Crop(0.5, 0.5, 0.5, 0.5, flip=True))
    assert mirrored["x0"] == pytest.approx(0.4) and mirrored["x1"] == 1.0


def test_a_mirrored_normal_map_is_the_mirrored_geometry():
    normals = np.zeros((3, 64, 64), np.float32)
    normals[0, :, :32], normals[0, :, 32:] = 0.6, -0.3  # left half faces right, right half faces left
    normals[1] = 0.2
    normals[2] = np.sqrt(1 - normals[0] ** 2 - normals[1] ** 2)
    adapter = configured("normal", 32, {})
    plain = adapter.crop(normals, WHOLE)
    mirrored = adapter.crop(normals, Crop(0.0, 0.0, 1.0, 1.0, flip=True))
    assert mirrored[0, 5, 0] == pytest.approx(0.3) and mirrored[0, 5, -1] == pytest.approx(-0.6)
    assert np.allclose(mirrored[0], -plain[0][:, ::-1]) and np.allclose(mirrored[1:], plain[1:, :, ::-1])
    depth = configured("depth", 32, {}).crop(normals[2:], Crop(0.0, 0.0, 1.0, 1.0, flip=True))
    assert np.allclose(depth, configured("depth", 32, {}).crop(normals[2:], WHOLE)[:, :, ::-1])  # only mirrored


def test_a_white_region_stays_within_the_rgb_range_after_resizing():
    """OpenCV's area weights sum to 1 only up to rounding: a white crop came out at 1 + 1 ulp."""
    rgb = configured("rgb", SIDE, {})
    view = np.ones((3, 580, 580), np.float32)
    view[:, :, :50] = 0.0
    for crop in draw_crops("white", CropConfig(n_crops=10, min_scale=0.2)):
        cut = rgb.crop(view, crop)
        rgb.check(cut)  # raises on values outside [0, 1]
        assert cut.dtype == np.float32 and cut.max() == 1.0
