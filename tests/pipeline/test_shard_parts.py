"""Shard files from parts written by workers in any order: merged in row order, or refused whole."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from four_m.core import storage
from four_m.pipeline.shard_parts import ROW, PartsError, merge_parts, parts_folder, remove_parts, write_part

SCHEMA = pa.schema([("key", pa.string()), ("value", pa.int64())], metadata={b"four_m.stage": b"test"})


def _part(rows: list[int]) -> pa.Table:
    """A part as the label stage's writers make it: the file's schema and metadata, plus the row index."""
    table = pa.table({"key": [f"k{r}" for r in rows], "value": [r * r for r in rows]}, schema=SCHEMA)
    return table.append_column(ROW, pa.array(rows, pa.int64()))


def test_parts_in_any_order_merge_into_row_order_with_fixed_row_groups(tmp_path):
    root = storage.location(tmp_path)
    for rows in ([5, 3, 9], [0, 8], [1, 2, 4, 6, 7]):  # as batches finish: unordered within and across
        write_part(root, "labels/x", 3, _part(rows))
    path = merge_parts(root, "labels/x", 3, rows=10, row_group_rows=4)
    table = pq.read_table(path)
    assert table.schema == SCHEMA and table.schema.metadata == SCHEMA.metadata
    assert table["key"].to_pylist() == [f"k{r}" for r in range(10)]
    assert [pq.ParquetFile(path).metadata.row_group(i).num_rows for i in range(3)] == [4, 4, 2]
    assert not parts_folder(root, "labels/x", 3).exists()
    remove_parts(root, "labels/x")
    assert sorted(p.name for p in (tmp_path / "labels/x").iterdir()) == ["00003.parquet"]


@pytest.mark.parametrize("parts", [([0, 1], [3]), ([0, 1, 2], [2, 3])], ids=["a row missing", "a row twice"])
def test_parts_that_do_not_hold_every_row_once_are_never_a_shard(tmp_path, parts):
    root = storage.location(tmp_path)
    for rows in parts:
        write_part(root, "labels/x", 0, _part(rows))
    with pytest.raises(PartsError, match="not each of the shard's 4 once"):
        merge_parts(root, "labels/x", 0, rows=4, row_group_rows=4)
    assert not (tmp_path / "labels/x/00000.parquet").exists()
