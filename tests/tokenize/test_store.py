"""The token store's format: null rows stay in place, types are the documented ones, HF reads it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from four_m.tokenize.store import read_token_rows, token_schema, token_table, write_tokens

KEYS = ["000000", "000001", "000002", "000003"]


def _rows(width: int | None) -> list[np.ndarray | None]:
    rng = np.random.default_rng(0)
    sizes = [width or 3, width or 7, width or 1]
    ids = [rng.integers(0, 65535, size=n, dtype=np.uint16) for n in sizes]
    return [ids[0], None, ids[1], ids[2]]


@pytest.mark.parametrize("width", [5, None], ids=["map", "sequence"])
def test_rows_round_trip_with_absent_rows_in_place(tmp_path, width):
    ids = _rows(width)
    errors = [None, "absent: no image", None, None]
    schema = token_schema(width, {"modality": "x"})
    path = tmp_path / "tokens/x/00000.parquet"
    write_tokens(path, token_table(KEYS, ids, errors, schema), row_group_rows=2)
    keys, read = read_token_rows(path)
    assert keys == KEYS
    assert read[1] is None
    for got, want in zip([read[0], read[2], read[3]], [ids[0], ids[2], ids[3]], strict=True):
        assert got.dtype == np.uint16 and np.array_equal(got, want)
    meta = pq.ParquetFile(path)
    assert meta.metadata.num_row_groups == 2
    assert meta.schema_arrow.metadata[b"four_m.modality"] == b"x"
    assert not list(path.parent.glob(".*.tmp"))


def test_maps_are_fixed_size_lists_and_sequences_variable_lists():
    assert token_schema(196, {}).field("tokens").type == pa.list_(pa.uint16(), 196)
    assert token_schema(None, {}).field("tokens").type == pa.list_(pa.uint16())


def test_hugging_face_datasets_loads_the_store(tmp_path):
    from datasets import load_dataset

    ids = _rows(5)
    path = tmp_path / "tokens/rgb/00000.parquet"
    write_tokens(path, token_table(KEYS, ids, [None, "absent", None, None], token_schema(5, {})), 1024)
    dataset = load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    assert dataset.features["tokens"].length == 5  # a fixed-length List of uint16
    assert dataset[0]["tokens"] == ids[0].tolist() and dataset[1]["tokens"] is None
    assert dataset["key"] == KEYS
