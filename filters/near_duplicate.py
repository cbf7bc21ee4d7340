"""near_duplicate: the same photo re-encoded, resized or cropped a little (64-bit perceptual hash).

A 64-bit perceptual hash from ``imagehash``, Hamming distance at most ``threshold``. The default is
the difference hash (``dhash``: the grey image at 9 x 8, each pixel brighter than its right
neighbour or not), not the DCT hash (``phash``), measured on the embedded sample's planted copies:
a 3 % crop is 1 bit from its original by dhash and 12 by phash, while the two most alike distinct
photos (the sample's stereo pair of motorcycles) are 10 bits apart by dhash and 4 by phash, so no
phash threshold finds the crop and keeps the pair; dhash at 6 does both (``method`` picks another).

The search does not compare every pair: the 64 bits are cut into ``bands`` bands and a pair is
compared when one band is equal (the buckets of the shuffle), so a pair is certainly found within
``bands - 1`` differing bits (pigeonhole) and very likely up to the threshold (a photo's small
changes flip few, clustered bits). More bands find more and compare more: at 12M images 4 bands
of 16 bits hold about 180 images a bucket.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from four_m.core.curation import DECIDES, DuplicateConfig, FilterSpec
from four_m.filters.base import DuplicateScorer, Rows


@dataclass(frozen=True)
class PerceptualHashConfig(DuplicateConfig):
    bands: int = field(default=4, metadata=DECIDES)
    """Equal bands a pair must share to be compared: 1, 2, 4, 8 or 16 (64 bits split evenly)."""
    method: str = "dhash"
    """``dhash``, ``phash``, ``whash`` or ``average_hash``: the imagehash function, at 64 bits."""


METHODS = ("dhash", "phash", "whash", "average_hash")

FILTER = FilterSpec(
    name="near_duplicate",
    phase="image",
    kind="duplicate",
    implementation="four_m.filters.near_duplicate:NearDuplicate",
    config=PerceptualHashConfig(threshold=6.0),
    score="Hamming distance of 64-bit perceptual hashes (imagehash)",
)


class NearDuplicate(DuplicateScorer):
    value_type = pa.uint64()

    def values(self, rows: Rows) -> list[int | None]:
        import imagehash
        from PIL import Image

        if self.cfg.method not in METHODS:
            raise ValueError(f"curate.{self.spec.name}.method must be one of {METHODS}, not {self.cfg.method!r}")
        method = getattr(imagehash, self.cfg.method)
        hashes = []
        for image in rows.images:
            if image is None:
                hashes.append(None)
                continue
            with Image.open(io.BytesIO(image)) as opened:
                bits = method(opened.convert("RGB"), hash_size=8).hash.flatten()
            hashes.append(int(np.packbits(bits).view(">u8")[0]))
        return hashes

    def as_array(self, values: pa.ChunkedArray | pa.Array) -> np.ndarray:
        return np.asarray(values.to_numpy(zero_copy_only=False), np.uint64)

    def buckets(self, signatures: np.ndarray) -> np.ndarray:
        bands = self.cfg.bands
        if bands not in (1, 2, 4, 8, 16):
            raise ValueError(f"curate.{self.spec.name}.bands must be 1, 2, 4, 8 or 16, not {bands}")
        width = 64 // bands
        mask = np.uint64((1 << width) - 1)
        columns = [(signatures >> np.uint64(width * b)) & mask for b in range(bands)]
        return np.stack(columns, axis=1).astype(np.int64)

    def distances(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        differing = np.bitwise_xor(left, right)
        return np.unpackbits(differing.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1).astype(np.float64)
