"""4M's aligned crops: per sample, crop 0 the whole label view, then random resized crops with flips.

4M pre-tokenizes several views of every image (``save_vq_tokens.py`` in apple/ml-4m): crop 0 the
centre crop without flip, crops 1..n-1 torchvision's ``RandomResizedCrop`` (area scale in
[min, max], aspect ratio in [3/4, 4/3]) with a horizontal flip of probability 1/2. Every
modality is tokenized under the same crop settings and training draws one crop per example.

Here a crop is a rectangle of the *label view* (the centred square of the shorter side, see
:mod:`four_m.core.views`) in fractions of its side, so the same crop cuts a 256 px label map, a
16 x 16 feature grid and the full-resolution image alike. Crop 0 is the whole label view: the
label view already is 4M's centre crop. The crops of a sample are a pure function of its key and
the crop config (a seeded generator per key), so reruns and other machines draw the same ones.

This module is part of the on-disk contract (the token store keeps each row's crops) and imports
only numpy.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

FIELDS = ("top", "left", "height", "width", "flip")
"""How a crop is stored: one float32 per field, in this order (``flip`` is 0 or 1)."""
ATTEMPTS = 10
"""torchvision's RandomResizedCrop tries this many draws before falling back to the centre crop."""


class CropSettings(Protocol):
    """What draws crops (``core.config.CropConfig``): a protocol so this module imports no config."""

    n_crops: int
    min_scale: float
    max_scale: float
    min_ratio: float
    max_ratio: float
    flip: float
    seed: int


@dataclass(frozen=True)
class Crop:
    """A rectangle of the label view in fractions of its side, and whether it is mirrored."""

    top: float
    left: float
    height: float
    width: float
    flip: bool = False

    def pixels(self, side: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) in pixels of a ``side`` x ``side`` view; at least one pixel each way.

        Rounded the same way at every resolution, so a map and the image cut at different sides
        show the same region up to one pixel of each."""
        top, left = round(self.top * side), round(self.left * side)
        bottom = max(top + 1, min(side, round((self.top + self.height) * side)))
        right = max(left + 1, min(side, round((self.left + self.width) * side)))
        return min(top, side - 1), min(left, side - 1), bottom, right

    def as_row(self) -> tuple[float, ...]:
        return (self.top, self.left, self.height, self.width, float(self.flip))

    @classmethod
    def from_row(cls, row: np.ndarray | tuple[float, ...]) -> Crop:
        top, left, height, width, flip = (float(v) for v in row)
        return cls(top, left, height, width, flip >= 0.5)


WHOLE = Crop(0.0, 0.0, 1.0, 1.0, False)
"""Crop 0: the whole label view, unflipped (4M's centre crop); also every crop of a store made
before crops existed, and what generation and ``make eval`` use."""


def crop_seed(key: str, seed: int) -> int:
    """A stable 64-bit seed of a sample key (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "little")


def draw_crops(key: str, settings: CropSettings) -> tuple[Crop, ...]:
    """The ``n_crops`` crops of sample ``key``: :data:`WHOLE`, then random resized crops."""
    rng = np.random.default_rng(crop_seed(key, settings.seed))
    drawn = (WHOLE, *(_random_crop(rng, settings) for _ in range(settings.n_crops - 1)))
    # As stored (float32): the tokenize stage and training then cut exactly the same pixels.
    return tuple(Crop.from_row(row) for row in crops_array(drawn))


def _random_crop(rng: np.random.Generator, settings: CropSettings) -> Crop:
    """torchvision's ``RandomResizedCrop.get_params`` on a unit square, then a coin for the flip."""
    log_ratios = (math.log(settings.min_ratio), math.log(settings.max_ratio))
    crop = WHOLE
    for _ in range(ATTEMPTS):
        area = rng.uniform(settings.min_scale, settings.max_scale)
        ratio = math.exp(rng.uniform(*log_ratios))
        width, height = math.sqrt(area * ratio), math.sqrt(area / ratio)
        if width <= 1 and height <= 1:
            crop = Crop(rng.uniform(0, 1 - height), rng.uniform(0, 1 - width), height, width)
            break
    return Crop(crop.top, crop.left, crop.height, crop.width, bool(rng.random() < settings.flip))


def smallest_side(settings: CropSettings, view_side: int) -> int:
    """Pixels of the shortest side a crop can have in a ``view_side`` label view: what the smallest
    allowed crop keeps before it is enlarged to the tokenizers' input."""
    return math.floor(view_side * math.sqrt(settings.min_scale * min(settings.min_ratio, 1 / settings.max_ratio)))


def crops_array(crops: tuple[Crop, ...]) -> np.ndarray:
    """(n, 5) float32 rows in :data:`FIELDS` order."""
    return np.asarray([c.as_row() for c in crops], np.float32).reshape(-1, len(FIELDS))
