"""Shard files written where the work happens: workers write parts, a remote task merges them.

Without ``preserve_order``, Ray Data hands a stage's batches on in whatever order they finish, and a
batch may hold rows of several shards, in any order. So the worker that made a batch writes, per
output and shard, the rows it holds as one *part*: a Parquet file in the output folder's ``_tmp/``
named by the smallest row index it holds, each row carrying its index in the shard (:data:`ROW`).
The driver is told only how many rows of which shard were written. Once a shard's parts hold all
its rows, a remote task (:func:`merge_parts`) sorts them into the shard's row order, writes the
shard file (temp, then rename) with fixed-size row groups, and deletes the parts. No payload byte
crosses into the driver, and the file does not depend on how the rows were batched.

A run that dies leaves parts behind in ``_tmp/``; the next run clears that folder before any work
(``clear_temporaries``) and redoes the shards whose marker is missing.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from four_m.core import storage
from four_m.core.dataset_root import atomic_path, shard_name
from four_m.core.storage import RootPath

ROW = "_row"
"""A part's column: the row's index in its shard (``images/`` order)."""
PARTS = "_tmp"
"""The parts' folder inside an output folder (cleared at the start of every run)."""


class PartsError(RuntimeError):
    """A shard's parts do not hold each of its rows exactly once: never written as a shard."""


def parts_folder(root: RootPath, folder: str, shard: int) -> RootPath:
    return root / f"{folder}/{PARTS}/{shard_name(shard)}"


def remove_parts(root: RootPath, folder: str) -> None:
    """The output folder's parts area, once every shard of a run has been merged."""
    storage.remove_tree(root / f"{folder}/{PARTS}")


def write_part(root: RootPath, folder: str, shard: int, table: pa.Table) -> None:
    """One part of ``shard`` of the output ``folder``: ``table`` (with :data:`ROW`), atomically.

    Plain, neither compressed nor dictionary-encoded: a part is read once, by the merge, which
    encodes the shard file; encoding it here too cost the labelling actor CPU its models need
    (a float16 feature map has few enough distinct values that Arrow tries a dictionary of them)."""
    first = pc.min(table[ROW]).as_py()
    with atomic_path(parts_folder(root, folder, shard) / f"{first:09d}.parquet") as temp:
        storage.write_table(table, temp, compression="none", use_dictionary=False)


def merge_parts(root: RootPath, folder: str, shard: int, rows: int, row_group_rows: int) -> str:
    """The shard file of ``folder`` from its parts, in row order, with their schema (the writer's,
    with its metadata: the merging task need not know the labeler); returns its path.

    Raises :class:`PartsError` unless the parts hold rows ``0 .. rows - 1`` once each.
    """
    parts = parts_folder(root, folder, shard)
    tables = [storage.read_table(path) for path in sorted(parts.glob("*.parquet"))]
    table = pa.concat_tables(tables).sort_by(ROW) if tables else pa.table({ROW: pa.array([], pa.int64())})
    if table.num_rows != rows or table[ROW].to_pylist() != list(range(rows)):
        raise PartsError(f"{parts}: the parts hold {table.num_rows} rows, not each of the shard's {rows} once")
    final = root / f"{folder}/{shard_name(shard)}.parquet"
    with atomic_path(final) as temp:
        storage.write_table(table.drop_columns([ROW]), temp, row_group_size=row_group_rows)
    storage.remove_tree(parts)
    return str(final)


def merge_shard(root: RootPath, folders: list[str], shard: int, rows: int, row_group_rows: int) -> list[str]:
    """:func:`merge_parts` of one shard for each output in ``folders``, in one task: a task per
    output would each want a worker process, and starting those cost more than the merges (13 s
    for ten outputs of a 16-row shard on two loaded cores, against well under one for the merges)."""
    return [merge_parts(root, folder, shard, rows, row_group_rows) for folder in folders]
