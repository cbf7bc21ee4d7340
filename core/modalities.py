"""The frozen registry of modalities: one key drives labels, tokenizers, token shards and training.

A spec says where a modality's data comes from and how it becomes tokens; labelers, the tokenize
stage and the trainer all read it, nobody mutates it (per-run values such as a configured codebook
size are applied with ``dataclasses.replace`` by whoever needs them).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal


@dataclass(frozen=True)
class ModalitySpec:
    name: str
    kind: Literal["map", "sequence"]
    """Maps become a fixed grid of tokens; sequences a variable run of text tokens up to a cap."""
    tokenizer: Literal["vq", "text"]
    """Registry key of the tokenizer family (see ``tokenize.registry``)."""
    folder: str
    """Where the stage reads it, relative to the dataset root: ``images`` or ``labels/<name>``."""
    max_tokens: int
    """Tokens per sample: exactly that many for maps (the grid, 14 x 14), at most for sequences."""
    vocab_size: int | None = None
    """Known once the tokenizer is trained (a VQ codebook, the shared WordPiece vocabulary)."""

    @property
    def vocabulary(self) -> str:
        """Which id space the tokens live in: every text-family modality shares the one WordPiece
        vocabulary (``text``); each map has its own VQ codebook, named after the map."""
        return "text" if self.tokenizer == "text" else self.name


def _map(name: str, folder: str) -> ModalitySpec:
    return ModalitySpec(name, "map", "vq", folder, max_tokens=14 * 14)


def _sequence(name: str) -> ModalitySpec:
    return ModalitySpec(name, "sequence", "text", f"labels/{name}", max_tokens=256)


MODALITIES = MappingProxyType(
    {
        "rgb": _map("rgb", "images"),
        "depth": _map("depth", "labels/depth"),
        "normal": _map("normal", "labels/normal"),
        "semseg": _map("semseg", "labels/semseg"),
        "clip": _map("clip", "labels/clip"),
        "caption": _sequence("caption"),
        "det": _sequence("det"),
    }
)
"""4M-7's modalities, in the order they are tokenized and shown."""
MAP_MODALITIES = tuple(n for n, s in MODALITIES.items() if s.kind == "map")
SEQUENCE_MODALITIES = tuple(n for n, s in MODALITIES.items() if s.kind == "sequence")
