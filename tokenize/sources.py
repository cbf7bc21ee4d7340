"""Where each modality's values come from: one shard of ``images/`` or ``labels/<modality>/`` read
into (keys, values, errors), the input of tokenizer training and of the tokenize stage.

Map modalities are read by their adapters (``tokenize.maps``), which know the stored encodings;
captions and the payloads of boxes, palettes and metadata are read here. Values are those of the
label view; the crops of maps and boxes (``core.crops``) are cut from them by :func:`cropper`. A row whose image or
label failed upstream reads as value None with the upstream error, so it becomes an absent
modality, never fake data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import pyarrow as pa

from four_m.core import storage
from four_m.core.config import Config
from four_m.core.crops import WHOLE, Crop
from four_m.core.dataset_root import DatasetRoot, shard_name
from four_m.core.modalities import MAP_KINDS, MODALITIES, ModalitySpec
from four_m.tokenize.base import Tokenizer
from four_m.tokenize.boxes import crop_boxes
from four_m.tokenize.maps import ADAPTERS, MapAdapter, configured


@dataclass(frozen=True)
class ModalityRows:
    """One shard of one modality, row for row as in ``images/``."""

    keys: list[str]
    values: list[Any]
    """None where the modality is absent for that row."""
    errors: list[str | None]
    """Why a value is None (the upstream error); None where the value is present."""


def source_file(root: DatasetRoot, modality: str, shard: int):
    return root / f"{MODALITIES[modality].folder}/{shard_name(shard)}.parquet"


def read_rows(root: DatasetRoot, modality: str, shard: int, config: Config) -> ModalityRows:
    """Read one shard of ``modality``; a missing file names the stage that should have made it."""
    path = source_file(root, modality, shard)
    if not path.is_file():
        stage = "download" if MODALITIES[modality].folder == "images" else f"label (labeler {modality})"
        raise FileNotFoundError(f"{path} is missing: run the {stage} stage first")
    table = storage.read_table(path)
    spec = MODALITIES[modality]
    values, errors = READERS[spec.kind](spec, table, config)
    return ModalityRows(table["key"].to_pylist(), values, errors)


def crop_adapter(modality: str, config: Config, params: Mapping[str, Any]) -> MapAdapter:
    """The adapter of a map's crops, the values its tokenizer takes: at ``tokenize.crops.size``, or
    for a feature map at its tokenizer's grid."""
    side = config.tokenize.vq(modality).grid if ADAPTERS[modality].on_grid else config.tokenize.crops.size
    return configured(modality, side, params)


def cropper(root: DatasetRoot, modality: str, shard: int, config: Config) -> Callable[[Any, Crop], Any]:
    """(label-view value, crop) -> the crop's value, for a modality of a cropped kind."""
    spec = MODALITIES[modality]
    if spec.kind == "boxes":
        return crop_boxes
    params = ADAPTERS[modality].params_of(storage.read_schema(source_file(root, modality, shard)))
    return crop_adapter(modality, config, params).crop


def read_whole_view(
    root: DatasetRoot, modality: str, shard: int, config: Config, tokenizer: Tokenizer | None
) -> ModalityRows:
    """:func:`read_rows`, with a cropped modality's values cut to crop 0 (the whole label view, what
    generation, ``make eval`` and the previews show) by ``tokenizer``: the values it takes, at the
    size it was trained on; without one (a run that has only an image's pixels), as the tokenize
    stage cuts them under ``config``."""
    rows = read_rows(root, modality, shard, config)
    if not MODALITIES[modality].cropped:
        return rows
    cut = tokenizer.crop if tokenizer is not None else cropper(root, modality, shard, config)
    values = [None if v is None else cut(v, WHOLE) for v in rows.values]
    return ModalityRows(rows.keys, values, rows.errors)


def _texts(spec: ModalitySpec, table: pa.Table, config: Config) -> tuple[list[Any], list[str | None]]:
    """Text: the labeler's output, or for a text that has one, the url list's alt-text
    (``tokenize.caption_source: alt_text``, 4M's CC12M captions)."""
    if spec.alt_text and config.tokenize.caption_source == "alt_text":
        texts = table["alt_text"].to_pylist()
        errors = [None if isinstance(t, str) and t.strip() else "no alt-text for this row" for t in texts]
    else:
        texts = table[spec.column].to_pylist()
        errors = table["error"].to_pylist()
    return [t if e is None else None for t, e in zip(texts, errors, strict=True)], errors


def _payloads(spec: ModalitySpec, table: pa.Table, config: Config) -> tuple[list[Any], list[str | None]]:
    """Boxes, palettes, metadata: the stored payload as it is (a list, a dict), None where it failed."""
    errors = table["error"].to_pylist()
    payloads = table[spec.column].to_pylist()
    return [p if e is None else None for p, e in zip(payloads, errors, strict=True)], errors


def _map(spec: ModalitySpec, table: pa.Table, config: Config) -> tuple[list[Any], list[str | None]]:
    # images are cut to the label view's size; the other maps carry their own shape.
    adapter = ADAPTERS[spec.name]
    return configured(spec.name, config.label.size, adapter.params_of(table.schema)).read(table)


READERS: Mapping[str, Callable[[ModalitySpec, pa.Table, Config], tuple[list[Any], list[str | None]]]] = (
    MappingProxyType(
        {**dict.fromkeys(MAP_KINDS, _map), "text": _texts, **dict.fromkeys(("boxes", "palette", "metadata"), _payloads)}
    )
)
"""Per kind: a modality's stored table -> (values, errors)."""
