"""The token store's file format: ``tokens/<modality>/<shard>.parquet``, one row per ``images/`` row.

Columns: ``key`` (the join key), ``tokens`` and ``error``. Maps hold exactly ``max_tokens`` ids, as
a ``fixed_size_list<uint16>`` (Hugging Face ``datasets`` reads it as ``List(Value("uint16"),
length=N)``); sequences a ``list<uint16>`` of at most ``max_tokens``. An absent modality (its
label failed upstream) is a null ``tokens`` with the reason in ``error``, never fake tokens.

Modalities whose tokens depend on the crop (maps, boxes: ``core.modalities.CROPPED_KINDS``) hold
a list of those per row, one per crop (crop 0 the whole label view), and a ``crops`` column with
the crops themselves, 4M's per-sample crop settings. One row per sample (a list of crops) rather
than one row per crop: measured in ``bench/tokens.py``, and it keeps every file row for row with
``images/``.

Encoding chosen by measurement (``bench/tokens.py``, and 196 ids of a 1024-code book): Parquet
stores uint16 as INT32, but dictionary encoding bit-packs ids to the codebook's width and zstd
shrinks what is left, to ~0.6x the raw uint16 payload; raw bytes in a binary column stay ~1.0x
without zstd. Row groups of ``row_group_rows`` rows are what a streaming reader fetches at once.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from four_m.core import storage
from four_m.core.crops import FIELDS
from four_m.core.dataset_root import atomic_path
from four_m.core.failures import ERROR
from four_m.core.storage import RootPath
from four_m.tokenize.base import TOKEN_DTYPE

TOKEN_TYPE = pa.uint16()
COMPRESSION = "zstd"


CROPS = "crops"
"""The column of a cropped modality's file: per row, its crops (``core.crops.FIELDS``, float32 each)."""
CROP_TYPE = pa.list_(pa.list_(pa.float32(), len(FIELDS)))


def token_schema(fixed_tokens: int | None, provenance: dict[str, str], cropped: bool = False) -> pa.Schema:
    """``fixed_tokens``: ids per row (per crop) for maps, None for variable-length sequences.

    ``cropped``: the modality is stored per crop (``core.modalities.CROPPED_KINDS``): ``tokens`` is
    a list with one id list per crop, and ``crops`` holds the crops themselves, crop 0 first.
    """
    ids = pa.list_(TOKEN_TYPE, fixed_tokens) if fixed_tokens is not None else pa.list_(TOKEN_TYPE)
    fields = [pa.field("key", pa.string()), pa.field("tokens", pa.list_(ids) if cropped else ids)]
    fields += [pa.field(CROPS, CROP_TYPE)] if cropped else []
    fields += [pa.field(ERROR, pa.string())]
    return pa.schema(fields, metadata={f"four_m.{k}": v for k, v in provenance.items()})


def token_table(
    keys: list[str],
    ids: list[np.ndarray | list[np.ndarray] | None],
    errors: list[str | None],
    schema: pa.Schema,
    crops: list[np.ndarray] | None = None,
) -> pa.Table:
    """One shard's rows; ``ids[i]`` is None exactly where ``errors[i]`` says why.

    For a cropped schema, ``ids[i]`` is one id array per crop and ``crops[i]`` the row's
    (n_crops, 5) crops (every row has them, absent ones too: they are the sample's, not the label's).
    """
    tokens_type = schema.field("tokens").type
    columns = [pa.array(keys, pa.string())]
    if schema.get_field_index(CROPS) < 0:
        columns.append(_ids_array(ids, tokens_type))
    else:
        if crops is None or len(crops) != len(ids):
            raise ValueError("a cropped token table needs the crops of every row")
        per_crop = [crop for row in ids if row is not None for crop in row]
        lengths = [0 if row is None else len(row) for row in ids]
        columns.append(_nested(_ids_array(per_crop, tokens_type.value_type), lengths, [r is None for r in ids]))
        flat = np.concatenate([np.asarray(c, np.float32).reshape(-1) for c in crops]) if crops else np.empty(0)
        boxes = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), len(FIELDS))
        columns.append(_nested(boxes, [len(c) for c in crops], [False] * len(crops)))
    columns.append(pa.array(errors, pa.string()))
    return pa.Table.from_arrays(columns, schema=schema)


def _nested(values: pa.Array, lengths: list[int], nulls: list[bool]) -> pa.ListArray:
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, values, mask=pa.array(nulls, pa.bool_()))


def _ids_array(ids: list[np.ndarray | None], tokens_type: pa.DataType) -> pa.Array:
    """One list of ids per entry, null where None: fixed-size lists for maps, lists for sequences."""
    present = [i for i, row in enumerate(ids) if row is not None]
    mask = pa.array([row is None for row in ids], pa.bool_())
    if isinstance(tokens_type, pa.FixedSizeListType):
        # Fixed-size lists keep a slot for null rows: zeros under the null mask.
        padded = np.zeros((len(ids), tokens_type.list_size), TOKEN_DTYPE)
        for i in present:
            padded[i] = ids[i]
        values = pa.array(padded.reshape(-1), TOKEN_TYPE)
        return pa.FixedSizeListArray.from_arrays(values, tokens_type.list_size, mask=mask)
    lengths = np.zeros(len(ids), np.int64)
    lengths[present] = [len(ids[i]) for i in present]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    flat = np.concatenate([ids[i] for i in present]) if present else np.empty(0, TOKEN_DTYPE)
    return pa.ListArray.from_arrays(offsets, pa.array(flat.astype(TOKEN_DTYPE), TOKEN_TYPE), mask=mask)


def write_tokens(final: RootPath, table: pa.Table, row_group_rows: int) -> None:
    """Write one shard atomically (temp file, then rename)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(final) as temp:
        storage.write_table(table, temp, compression=COMPRESSION, use_dictionary=True, row_group_size=row_group_rows)


def read_token_rows(path: RootPath) -> tuple[list[str], list[np.ndarray | list[np.ndarray] | None]]:
    """Keys and per-row id arrays (None for an absent modality; for a cropped file, one array per
    crop), for previews and tests."""
    table = storage.read_table(path, columns=["key", "tokens"])
    nested = not pa.types.is_integer(table.schema.field("tokens").type.value_type)

    def ids(row: list) -> np.ndarray | list[np.ndarray]:
        return [np.asarray(crop, TOKEN_DTYPE) for crop in row] if nested else np.asarray(row, TOKEN_DTYPE)

    return table["key"].to_pylist(), [None if row is None else ids(row) for row in table["tokens"].to_pylist()]


def read_crops(path: RootPath) -> list[np.ndarray] | None:
    """Each row's (n_crops, 5) crops of a cropped token file; None for a file stored without crops."""
    schema = storage.read_schema(path)
    if schema.get_field_index(CROPS) < 0:
        return None
    rows = storage.read_table(path, columns=[CROPS])[CROPS].to_pylist()
    return [np.asarray(row, np.float32).reshape(-1, len(FIELDS)) for row in rows]
