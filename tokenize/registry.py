"""Tokenizers by modality key, and what identifies a trained one. Never mutated at run time."""

from __future__ import annotations

import hashlib
from types import MappingProxyType

from four_m.core.dataset_root import DatasetRoot, StageState
from four_m.core.modalities import MAP_KINDS, MODALITIES
from four_m.core.storage import RootPath, local_copy
from four_m.tokenize.base import Tokenizer
from four_m.tokenize.boxes import BoxSequenceTokenizer
from four_m.tokenize.coded import CodedSequenceTokenizer
from four_m.tokenize.metadata import MetadataTokenizer
from four_m.tokenize.ml4m_tokenizer import ML4MTokenizer, is_imported
from four_m.tokenize.palette import PaletteTokenizer
from four_m.tokenize.text import TextTokenizer
from four_m.tokenize.vq import VQTokenizer

CODED_KINDS: MappingProxyType[str, type[CodedSequenceTokenizer]] = MappingProxyType(
    {"boxes": BoxSequenceTokenizer, "palette": PaletteTokenizer, "metadata": MetadataTokenizer}
)
"""Sequence kinds whose values are coded as tokens of the shared vocabulary."""
KIND_TOKENIZERS: MappingProxyType[str, type[Tokenizer]] = MappingProxyType(
    {**dict.fromkeys(MAP_KINDS, VQTokenizer), "text": TextTokenizer, **CODED_KINDS}
)
"""Kind -> the tokenizer class its modalities use: a VQ tokenizer per map; sequences share one
WordPiece vocabulary (``text``), which boxes, palettes and metadata wrap."""


def sequence_tokenizer(kind: str, text: TextTokenizer) -> Tokenizer:
    """The tokenizer of a sequence kind over the shared vocabulary ``text``."""
    return CODED_KINDS[kind](text) if kind in CODED_KINDS else text


def tokenizer_dir(root: DatasetRoot, modality: str) -> RootPath:
    return root / f"tokenizers/{modality}"


def tokenizer_state(root: DatasetRoot, modality: str) -> StageState:
    """``_state/tokenizers/<modality>/``: one marker, shard 0 (a tokenizer is one unit), listing
    every file of its folder with size and sha256, for ``make verify``."""
    return root.stage(f"tokenizers/{modality}")


def load_tokenizer(root: DatasetRoot, modality: str) -> Tokenizer:
    directory = tokenizer_dir(root, modality)
    if not (directory / TRAINED).is_file():
        raise FileNotFoundError(f"no trained {modality} tokenizer in {directory}: run `make tokenizers` first")
    with local_copy(directory) as local:
        if is_imported(local):  # ml-4m's own tokenizer, imported (tokenize.<modality>.source)
            return ML4MTokenizer.load(local)
        return KIND_TOKENIZERS[MODALITIES[modality].kind].load(local)


TRAINED = "trained.json"
"""Written last into a tokenizer's folder (config hash, samples, metrics): its presence means done."""


def tokenizer_id(root: DatasetRoot, modality: str) -> str:
    """``<modality>-<hash of every file>``: retraining changes it, so tokens made before go stale."""
    digest = hashlib.sha256()
    directory = tokenizer_dir(root, modality)
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(file.relative_to(directory).as_posix().encode())
        digest.update(file.read_bytes())
    return f"{modality}-{digest.hexdigest()[:12]}"
