"""Colour palettes <-> 4M-21's palette sequences, in the vocabulary shared with captions.

A value is one image's seven palettes as the palette labeler stores them: the k-th a flat
``[R, G, B, ...]`` of k colours (0-255). One palette is ``v1=<k>`` then ``v0=<R> v0=<G> v0=<B>``
per colour (ml-4m's ColorPaletteTransform); the stored sequence is all seven in turn, then
``[EOS]``, so training can draw one length per example (``train.masking``'s chunk views) and
evaluation can compare a generated palette with the stored one of its length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from four_m.tokenize.base import TokenizerInputError
from four_m.tokenize.coded import CodedSequenceTokenizer

LENGTH_AXIS, VALUE_AXIS = 1, 0
"""``v1=<k>`` opens a palette of k colours; ``v0=<c>`` is one channel value."""
MAX_COLOURS = 7
MAX_CHANNEL = 255


class PaletteTokenizer(CodedSequenceTokenizer):
    modality = "palette"
    min_bins = 256

    def encode(self, values: Sequence[Any]) -> list[np.ndarray]:
        out = []
        for palettes in values:
            ids: list[int] = []
            for colours in _palettes(palettes):
                ids.append(self.text.coordinate_id(LENGTH_AXIS, len(colours) // 3))
                ids += [self.text.coordinate_id(VALUE_AXIS, int(c)) for c in colours]
            out.append(self.finished(ids))
        return out

    def decode(self, ids: Sequence[np.ndarray]) -> list[list[list[int]]]:
        """Per row, the well-formed palettes in it: ``v1=<k>`` followed by 3k channel values (0-255);
        a palette cut short, interrupted or with a value past 255 (a generated sequence may hold
        any of these) is dropped."""
        out = []
        for row in ids:
            palettes: list[list[int]] = []
            wanted, colours = 0, []
            for token in self.coordinates(row) + [None]:
                if wanted and token is not None and token[0] == VALUE_AXIS and token[1] <= MAX_CHANNEL:
                    colours.append(token[1])
                    if len(colours) == 3 * wanted:
                        palettes.append(colours)
                        wanted = 0
                    continue
                wanted, colours = 0, []
                if token is not None and token[0] == LENGTH_AXIS and 1 <= token[1] <= MAX_COLOURS:
                    wanted = token[1]
            out.append(palettes)
        return out


def _palettes(value: Any) -> list[list[int]]:
    if not isinstance(value, Sequence | np.ndarray) or isinstance(value, str | bytes):
        raise TokenizerInputError(f"palette: expected a list of palettes, got {type(value).__name__}")
    found = []
    for colours in value:
        flat = np.asarray(colours).reshape(-1)
        if not 1 <= flat.size // 3 <= MAX_COLOURS or flat.size % 3 or flat.min() < 0 or flat.max() > 255:
            raise TokenizerInputError(f"palette: a palette is 1-7 RGB colours of 0-255, got {flat.tolist()}")
        found.append(flat.astype(int).tolist())
    return found
