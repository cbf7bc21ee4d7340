"""How the label stage plans its work: a task per shard, in blocks of one actor batch, and one Ray Data
execution for every shard a level owes (so a pool's actors share the work, and start once a run)."""

from __future__ import annotations

import json

import pyarrow as pa
import ray.data

from four_m.core.config import load_config
from four_m.core.dataset_root import DatasetRoot
from four_m.pipeline import label
from four_m.pipeline.shard_parts import ROW
from four_m.pipeline.views import VIEW_ERROR, pixels_of


def test_a_shard_is_read_in_tables_of_one_actor_batch_with_its_views(tmp_path, photos, make_images_root):
    make_images_root(tmp_path, photos, per_shard=10)
    batch = pa.table({"path": [str(tmp_path / "images/00000.parquet")], "reads": [json.dumps({})]})
    tables = list(label.read_views(batch, (32, 48), block_rows=4))
    assert [t.num_rows for t in tables] == [4, 4, 2]
    assert [r for t in tables for r in t[ROW].to_pylist()] == list(range(10))
    for table in tables:
        assert pixels_of(table, 32).shape == (table.num_rows, 32, 32, 3)
        assert pixels_of(table, 48).shape == (table.num_rows, 48, 48, 3)
    errors = [e for t in tables for e in t[VIEW_ERROR].to_pylist()]
    assert sum(e is not None for e in errors) == 2  # the corrupt image and the failed download


def test_the_block_size_holds_only_while_a_chunk_is_labelled():
    context = ray.data.DataContext.get_current()
    before = context.target_max_block_size
    with label.block_bytes(12_345):
        assert ray.data.DataContext.get_current().target_max_block_size == 12_345
    assert context.target_max_block_size == before


def test_every_shard_a_level_owes_is_labelled_in_one_execution(
    tmp_path, ray_local, photos, make_images_root, monkeypatch
):
    make_images_root(tmp_path, photos, per_shard=3)  # 10 rows: 4 shards
    chunks = []
    real = label._run_chunk

    def counted(run, chunk, *args):
        chunks.append(list(chunk))
        return real(run, chunk, *args)

    monkeypatch.setattr(label, "_run_chunk", counted)
    config = load_config(
        "default", ["label.size=64", "label.labelers=[canny_edge,color_palette]", "ray.num_cpus=2"], root=str(tmp_path)
    )
    assert config.label.shards_per_run is None
    summary = label.run_label(config, progress=False)
    assert chunks == [[0, 1, 2, 3]]
    root = DatasetRoot(tmp_path)
    for name in ("canny_edge", "color_palette"):
        assert summary.shards_done[name] == 4
        assert summary.rows[name] == 10
        assert all(root.stage(f"label/{name}").read_marker(s) is not None for s in range(4))
