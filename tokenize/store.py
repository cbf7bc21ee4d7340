"""The token store's file format: ``tokens/<modality>/<shard>.parquet``, one row per ``images/`` row.

Columns: ``key`` (the join key), ``tokens`` and ``error``. Maps hold exactly ``max_tokens`` ids, as
a ``fixed_size_list<uint16>`` (Hugging Face ``datasets`` reads it as ``List(Value("uint16"),
length=N)``); sequences a ``list<uint16>`` of at most ``max_tokens``. An absent modality (its
label failed upstream) is a null ``tokens`` with the reason in ``error``, never fake tokens.

Encoding chosen by measurement (``bench/tokens.py``, and 196 ids of a 1024-code book): Parquet
stores uint16 as INT32, but dictionary encoding bit-packs ids to the codebook's width and zstd
shrinks what is left, to ~0.6x the raw uint16 payload; raw bytes in a binary column stay ~1.0x
without zstd. Row groups of ``row_group_rows`` rows are what a streaming reader fetches at once.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from four_m.core import storage
from four_m.core.dataset_root import atomic_path
from four_m.core.failures import ERROR
from four_m.core.storage import RootPath
from four_m.tokenize.base import TOKEN_DTYPE

TOKEN_TYPE = pa.uint16()
COMPRESSION = "zstd"


def token_schema(fixed_tokens: int | None, provenance: dict[str, str]) -> pa.Schema:
    """``fixed_tokens``: ids per row for maps, None for variable-length sequences."""
    tokens = pa.list_(TOKEN_TYPE, fixed_tokens) if fixed_tokens is not None else pa.list_(TOKEN_TYPE)
    fields = [pa.field("key", pa.string()), pa.field("tokens", tokens), pa.field(ERROR, pa.string())]
    return pa.schema(fields, metadata={f"four_m.{k}": v for k, v in provenance.items()})


def token_table(keys: list[str], ids: list[np.ndarray | None], errors: list[str | None], schema: pa.Schema) -> pa.Table:
    """One shard's rows; ``ids[i]`` is None exactly where ``errors[i]`` says why."""
    tokens_type = schema.field("tokens").type
    present = [i for i, row in enumerate(ids) if row is not None]
    mask = pa.array([row is None for row in ids])
    if isinstance(tokens_type, pa.FixedSizeListType):
        # Fixed-size lists keep a slot for null rows: zeros under the null mask.
        padded = np.zeros((len(ids), tokens_type.list_size), TOKEN_DTYPE)
        for i in present:
            padded[i] = ids[i]
        values = pa.array(padded.reshape(-1), TOKEN_TYPE)
        tokens = pa.FixedSizeListArray.from_arrays(values, tokens_type.list_size, mask=mask)
    else:
        lengths = np.zeros(len(ids), np.int64)
        lengths[present] = [len(ids[i]) for i in present]
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        flat = np.concatenate([ids[i] for i in present]) if present else np.empty(0, TOKEN_DTYPE)
        tokens = pa.ListArray.from_arrays(offsets, pa.array(flat.astype(TOKEN_DTYPE), TOKEN_TYPE), mask=mask)
    return pa.Table.from_arrays([pa.array(keys, pa.string()), tokens, pa.array(errors, pa.string())], schema=schema)


def write_tokens(final: RootPath, table: pa.Table, row_group_rows: int) -> None:
    """Write one shard atomically (temp file, then rename)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(final) as temp:
        storage.write_table(table, temp, compression=COMPRESSION, use_dictionary=True, row_group_size=row_group_rows)


def read_token_rows(path: RootPath) -> tuple[list[str], list[np.ndarray | None]]:
    """Keys and per-row id arrays (None for an absent modality), for previews and tests."""
    table = storage.read_table(path, columns=["key", "tokens"])
    rows = [None if row is None else np.asarray(row, TOKEN_DTYPE) for row in table["tokens"].to_pylist()]
    return table["key"].to_pylist(), rows
