"""The one interface every modality tokenizer implements.

A tokenizer turns a batch of one modality's values into token ids and back. Values are what the
labels mean, not how they are stored: float maps ``(C, H, W)`` for rgb/depth/normal/clip, a
``(H, W)`` class-id map for semseg, a string for captions, a list of box dicts for det (see each
implementation). Reading stored labels into values is the modality adapters' job, so a
tokenizer never parses Parquet or PNG.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from four_m.core.crops import Crop
from four_m.core.errors import UserError

TOKEN_DTYPE = np.uint16
"""Every vocabulary here fits 16 bits; the store keeps ids as uint16 (see ``tokenize.store``)."""


class TokenizerInputError(UserError):
    """Data of the wrong shape, dtype or class count; the message names the modality and what was expected."""


class ML4MTokenizerError(UserError):
    """A released ml-4m tokenizer this project cannot reproduce; the message names the key or setting."""


class Tokenizer(ABC):
    """One modality's values <-> token ids.

    ``encode`` returns one id array per value: exactly ``max_tokens`` ids when ``fixed_length``
    (maps), at most ``max_tokens`` otherwise (sequences). ``decode`` inverts it as well as the
    tokenizer can (VQ is lossy; box sequences round-trip exactly up to the coordinate bins).
    """

    modality: str
    fixed_length: ClassVar[bool]

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def max_tokens(self) -> int: ...

    @abstractmethod
    def encode(self, values: Sequence[Any]) -> list[np.ndarray]: ...

    @abstractmethod
    def decode(self, ids: Sequence[np.ndarray]) -> list[Any]: ...

    def crop(self, value: Any, crop: Crop) -> Any:
        """The value of crop ``crop`` of a label-view ``value``, as ``encode`` takes it: only the
        tokenizers of cropped kinds (maps, boxes; ``core.modalities.CROPPED_KINDS``) have one."""
        raise NotImplementedError(f"{self.modality}: its tokens do not depend on the crop")

    def run_on(self, device_type: str, precision: str) -> None:  # noqa: B027 - a text tokenizer has nothing to place
        """Where and how to encode: a network moves to ``device_type`` (``cpu``, ``cuda``) and runs
        at ``precision`` (``core.precision``); a tokenizer without one ignores this."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Config as JSON, weights (if any) as safetensors: loadable without pickle."""

    @classmethod
    @abstractmethod
    def load(cls, directory: Path) -> Tokenizer: ...

    def check_ids(self, ids: np.ndarray, where: str) -> None:
        """Stop before writing ids outside the vocabulary (a bug upstream, never data to keep)."""
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"{self.modality} tokens in {where} outside the vocabulary [0, {self.vocab_size}):"
                f" min {ids.min()}, max {ids.max()}"
            )
