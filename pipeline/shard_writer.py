"""A shard file written as its rows come, in row groups of a fixed size, and renamed into place only
when complete.

The label stage's actor labels a shard batch by batch; holding a whole shard's labels before
writing would cost a shard of payload per labeler in memory (a 10,000-row shard of dense maps is
gigabytes). The row groups do not follow the batches: a batch size is a runtime setting, and the
file's bytes must not depend on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa

from four_m.core import storage
from four_m.core.dataset_root import atomic_path
from four_m.core.storage import RootPath


class RowGroupWriter:
    """Buffers tables and writes them as row groups of exactly ``row_group_rows`` (the last one: what is left)."""

    def __init__(self, writer, row_group_rows: int):
        self._writer = writer
        self._rows = row_group_rows
        self._pending: list[pa.Table] = []
        self._buffered = 0
        self.rows = 0
        """Rows written so far."""

    def write(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        self._pending.append(table)
        self._buffered += table.num_rows
        while self._buffered >= self._rows:
            self._flush(self._rows)

    def close(self) -> None:
        if self._buffered:
            self._flush(self._buffered)

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self._pending)
        self._writer.write_table(table.slice(0, rows), row_group_size=rows)
        rest = table.slice(rows)
        self._pending, self._buffered = ([rest] if rest.num_rows else []), rest.num_rows


@contextmanager
def shard_file(final: RootPath, schema: pa.Schema, row_group_rows: int) -> Iterator[RowGroupWriter]:
    """Yield a writer of ``final``'s rows; the file appears (temp, then rename) only if the block
    succeeds, so a failed or killed shard leaves at most a temp file, which the next run clears."""
    with atomic_path(final) as temp:
        parquet = storage.parquet_writer(temp, schema)
        try:
            rows = RowGroupWriter(parquet, row_group_rows)
            yield rows
            rows.close()
        finally:
            parquet.close()
