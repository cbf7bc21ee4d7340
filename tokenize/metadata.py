"""Image metadata <-> 4M-21's metadata sequences, in the vocabulary shared with captions.

A value is one image's raw metadata, ``{key: number or None}`` (the metadata labeler's row). Each
present key becomes ``v1=<id> v0=<bin>`` (ids: ``modalities.metadata.KEYS``), binned as ml-4m's
MetadataTransform by the key's ``modalities.metadata.BINS`` (image sides by 32 px; counts kept as
they are; scores at thresholds; the others into 50 bins of a fixed range), all clipped to 0..999.
The stored order is by key id; training shuffles the pairs per example and masks them as whole
chunks (``train.masking``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from four_m.modalities.metadata import BINS, KEYS, RANGE_BINS
from four_m.tokenize.base import TokenizerInputError
from four_m.tokenize.coded import CodedSequenceTokenizer

KEY_AXIS, VALUE_AXIS = 1, 0
MAX_BIN = 999


def metadata_bin(key: str, value: float) -> int:
    """ml-4m's bin of one raw metadata value."""
    bins = BINS[key]
    if bins.thresholds:
        found = sum(value >= t for t in bins.thresholds)
    elif bins.span is not None:
        low, high = bins.span
        found = int((min(max(value, low), high) - low) / (high - low) * (RANGE_BINS - 1))
    else:
        found = int(value // bins.step)
    return min(max(found, 0), MAX_BIN)


def binned(value: Mapping[str, Any]) -> dict[str, int]:
    """The present keys of a raw metadata row -> their bins, in key-id order."""
    if not isinstance(value, Mapping):
        raise TokenizerInputError(f"metadata: expected a dict of key -> number, got {type(value).__name__}")
    unknown = sorted(set(value) - set(KEYS))
    if unknown:
        raise TokenizerInputError(f"metadata: unknown keys {unknown}")
    return {key: metadata_bin(key, float(value[key])) for key in KEYS if value.get(key) is not None}


class MetadataTokenizer(CodedSequenceTokenizer):
    modality = "metadata"
    min_bins = MAX_BIN + 1

    def encode(self, values: Sequence[Any]) -> list[np.ndarray]:
        out = []
        for value in values:
            ids: list[int] = []
            for key, bin_ in binned(value).items():
                ids += [self.text.coordinate_id(KEY_AXIS, KEYS.index(key)), self.text.coordinate_id(VALUE_AXIS, bin_)]
            out.append(self.finished(ids))
        return out

    def decode(self, ids: Sequence[np.ndarray]) -> list[dict[str, int]]:
        """Per row, ``{key: bin}`` from each ``v1=<id>`` directly followed by a ``v0=<bin>``; the
        first pair of a key wins (a generated sequence may repeat one)."""
        out = []
        for row in ids:
            found: dict[str, int] = {}
            tokens = self.coordinates(row)
            for key, value in itertools.pairwise([*tokens, None]):
                if key and value and key[0] == KEY_AXIS and value[0] == VALUE_AXIS and key[1] < len(KEYS):
                    found.setdefault(KEYS[key[1]], value[1])
            out.append(found)
        return out
