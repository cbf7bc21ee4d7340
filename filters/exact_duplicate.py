"""exact_duplicate: the same image bytes at several urls (SHA-256 of the stored file).

Bytes, not pixels: img2dataset re-encodes every image at the download's size and quality, so two
urls serving one file store identical bytes, and a re-encoded copy is the near-duplicate filter's.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from four_m.core.curation import DuplicateConfig, FilterSpec
from four_m.filters.base import DuplicateScorer, Rows

FILTER = FilterSpec(
    name="exact_duplicate",
    phase="image",
    kind="duplicate",
    implementation="four_m.filters.exact_duplicate:ExactDuplicate",
    config=DuplicateConfig(threshold=0.0),
    score="distance to its duplicate: 0 (identical SHA-256 of the stored bytes)",
)


class ExactDuplicate(DuplicateScorer):
    value_type = pa.binary(32)

    def values(self, rows: Rows) -> list[bytes | None]:
        return [hashlib.sha256(image).digest() if image is not None else None for image in rows.images]

    def as_array(self, values: pa.ChunkedArray | pa.Array) -> np.ndarray:
        flat = b"".join(values.to_pylist())
        return np.frombuffer(flat, np.uint8).reshape(-1, 32)

    def buckets(self, signatures: np.ndarray) -> np.ndarray:
        # The digest's first 8 bytes: equal digests share it, and it is uniform enough to spread.
        return signatures[:, :8].copy().view(np.int64)

    def distances(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        return np.where((left == right).all(axis=1), 0.0, 1.0)
