"""4M's aligned crops: drawn per key, crop 0 the whole view, the others within 4M's scale, ratio and flip."""

from __future__ import annotations

import math

import numpy as np
import pytest

from four_m.core.config import ConfigError, CropConfig
from four_m.core.crops import WHOLE, Crop, crops_array, draw_crops, smallest_side
from four_m.core.views import cut_crop

SETTINGS = CropConfig(n_crops=10, min_scale=0.2)


def test_crops_are_a_function_of_key_and_seed_alone():
    first = draw_crops("000123", SETTINGS)
    assert first == draw_crops("000123", SETTINGS)
    assert first != draw_crops("000124", SETTINGS)
    assert first != draw_crops("000123", CropConfig(n_crops=10, min_scale=0.2, seed=1))
    assert len(first) == 10 and first[0] == WHOLE


def test_random_crops_keep_to_4m_scale_ratio_and_bounds_and_flip_about_half():
    crops = [c for k in range(300) for c in draw_crops(f"key{k}", SETTINGS)[1:]]
    for crop in crops:
        assert 0 <= crop.top and crop.top + crop.height <= 1 + 1e-6
        assert 0 <= crop.left and crop.left + crop.width <= 1 + 1e-6
        assert 0.2 - 1e-5 <= crop.height * crop.width <= 1 + 1e-6
        assert 0.75 - 1e-4 <= crop.width / crop.height <= 1.3333 + 1e-4
    flipped = sum(c.flip for c in crops) / len(crops)
    assert 0.45 < flipped < 0.55
    assert min(c.height * c.width for c in crops) < 0.25  # the range is really used


def test_crops_survive_the_float32_store_unchanged():
    crops = draw_crops("k", SETTINGS)
    assert tuple(Crop.from_row(r) for r in crops_array(crops)) == crops


def test_a_crop_cuts_the_same_region_at_every_resolution_and_mirrors():
    crop = Crop(0.25, 0.5, 0.5, 0.25, flip=True)
    assert crop.pixels(256) == (64, 128, 192, 192) and crop.pixels(16) == (4, 8, 12, 12)
    ramp = np.tile(np.arange(256, dtype=np.float32), (256, 1))  # value = column
    cut = cut_crop(ramp, crop, 64, nearest=True)
    assert cut.shape == (64, 64)
    assert cut[0, 0] == 191 and cut[0, -1] == 128  # mirrored: the crop's right edge comes first
    wide = np.zeros((32, 32, 600), np.float32)  # more channels than OpenCV resizes at once
    assert cut_crop(wide, WHOLE, 16).shape == (16, 16, 600)


def test_the_smallest_crop_side_is_what_the_docs_promise():
    assert smallest_side(SETTINGS, 580) == 224  # configs/cc12m.yaml's label view
    assert smallest_side(SETTINGS, 256) == math.floor(256 * math.sqrt(0.15))


@pytest.mark.parametrize("bad", [{"n_crops": 0}, {"min_scale": 0}, {"min_ratio": 1.2}, {"flip": 2.0}])
def test_bad_crop_settings_are_refused_naming_the_key(bad):
    with pytest.raises(ConfigError, match="tokenize.crops"):
        CropConfig(**bad)
