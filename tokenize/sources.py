"""Where each modality's values come from: one shard of ``images/`` or ``labels/<modality>/`` read
into (keys, values, errors), the input of tokenizer training and of the tokenize stage.

Map modalities are read by their adapters (``tokenize.maps``), which know the stored encodings;
captions and boxes are read here. A row whose image or label failed upstream reads as value
None with the upstream error, so it becomes an absent modality, never fake data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from four_m.core import storage
from four_m.core.config import Config
from four_m.core.dataset_root import DatasetRoot, shard_name
from four_m.core.modalities import MODALITIES
from four_m.tokenize.maps import ADAPTERS, configured


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
    values, errors = READERS[modality](table, config)
    return ModalityRows(table["key"].to_pylist(), values, errors)


def _captions(table: pa.Table, config: Config) -> tuple[list[Any], list[str | None]]:
    if config.tokenize.caption_source == "alt_text":
        texts = table["alt_text"].to_pylist()
        errors = [None if isinstance(t, str) and t.strip() else "no alt-text for this row" for t in texts]
    else:
        texts = table["caption"].to_pylist()
        errors = table["error"].to_pylist()
    return [t if e is None else None for t, e in zip(texts, errors, strict=True)], errors


def _boxes(table: pa.Table, config: Config) -> tuple[list[Any], list[str | None]]:
    errors = table["error"].to_pylist()
    boxes = table["det"].to_pylist()
    return [b if e is None else None for b, e in zip(boxes, errors, strict=True)], errors


def _map_reader(modality: str) -> Callable[[pa.Table, Config], tuple[list[Any], list[str | None]]]:
    def read(table: pa.Table, config: Config) -> tuple[list[Any], list[str | None]]:
        # rgb is cut to the label view's size; the other maps carry their own shape.
        adapter = configured(modality, config.label.size, ADAPTERS[modality].params_of(table.schema))
        return adapter.read(table)

    return read


READERS = {**{m: _map_reader(m) for m in ADAPTERS}, "caption": _captions, "det": _boxes}
"""Per modality: a label table -> (values, errors)."""
