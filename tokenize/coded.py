"""The base of the sequence tokenizers that code values as tokens of the shared text vocabulary
(4M's boxes, 4M-21's palettes and metadata): they own no file of their own, only the arithmetic
from values to the vocabulary's coordinate-style ``v<axis>=<bin>`` and class tokens."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Self

import numpy as np

from four_m.tokenize.base import TOKEN_DTYPE, Tokenizer, TokenizerInputError
from four_m.tokenize.text import TextTokenizer


class CodedSequenceTokenizer(Tokenizer):
    """A sequence tokenizer over ``text``'s vocabulary; saved as that vocabulary's files."""

    fixed_length: ClassVar[bool] = False
    min_bins: ClassVar[int] = 2
    """The fewest coordinate bins (``tokenize.text.coordinate_bins``) its values need."""

    def __init__(self, text: TextTokenizer) -> None:
        self.text = text
        self.bins = text.cfg.coordinate_bins
        if self.bins < self.min_bins:
            raise TokenizerInputError(
                f"{self.modality}: needs tokenize.text.coordinate_bins >= {self.min_bins}, got {self.bins}"
            )

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def max_tokens(self) -> int:
        return self.text.cfg.max_tokens

    def save(self, directory: Path) -> None:
        """The shared text tokenizer's files: its config holds everything this tokenizer needs."""
        self.text.save(directory)

    @classmethod
    def load(cls, directory: Path) -> Self:
        return cls(TextTokenizer.load(directory))

    def finished(self, ids: list[int]) -> np.ndarray:
        """Content ids, cut to the cap, then ``[EOS]``."""
        row = np.asarray([*ids[: self.max_tokens - 1], self.text.eos_id], dtype=TOKEN_DTYPE)
        self.check_ids(row, "encode")
        return row

    def coordinates(self, row: np.ndarray) -> list[tuple[int, int] | None]:
        """Each id up to ``[EOS]`` as (axis, bin) if it is a coordinate token, else None."""
        coordinates, out = self.text.coordinate_ids, []
        for i in np.asarray(row).tolist():
            if i == self.text.eos_id:
                break
            out.append(divmod(i - coordinates.start, self.bins) if i in coordinates else None)
        return out
