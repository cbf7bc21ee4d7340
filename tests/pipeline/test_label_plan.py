"""How the label stage plans its work: an actor reads a shard in batches of its pool's batch size,
writes row groups that do not depend on that size, and a level's actors start once for all its shards."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from four_m.core.config import load_config
from four_m.core.dataset_root import DatasetRoot
from four_m.pipeline import label
from four_m.pipeline.label_actor import read_images
from four_m.pipeline.shard_writer import shard_file
from four_m.pipeline.views import VIEW_ERROR, add_views, pixels_of


def test_a_shard_is_read_in_batches_of_the_pool_and_cut_into_views(tmp_path, photos, make_images_root):
    make_images_root(tmp_path, photos, per_shard=10)
    tables = [add_views(t, (32, 48)) for t in read_images(str(tmp_path / "images/00000.parquet"), {}, 4)]
    assert [t.num_rows for t in tables] == [4, 4, 2]
    for table in tables:
        assert pixels_of(table, 32).shape == (table.num_rows, 32, 32, 3)
        assert pixels_of(table, 48).shape == (table.num_rows, 48, 48, 3)
    errors = [e for t in tables for e in t[VIEW_ERROR].to_pylist()]
    assert sum(e is not None for e in errors) == 2  # the corrupt image and the failed download


def _written(path, batch_rows: int) -> bytes:
    table = pa.table({"key": [f"{i:04d}" for i in range(23)], "value": list(range(23))})
    with shard_file(path, table.schema, row_group_rows=10) as writer:
        for start in range(0, table.num_rows, batch_rows):
            writer.write(table.slice(start, batch_rows))
    return path.read_bytes()


def test_a_shard_file_has_the_same_row_groups_and_bytes_whatever_the_batch_size(tmp_path):
    assert _written(tmp_path / "a.parquet", 3) == _written(tmp_path / "b.parquet", 7)
    metadata = pq.ParquetFile(tmp_path / "a.parquet").metadata
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [10, 10, 3]


def test_a_shard_that_fails_midway_leaves_no_file(tmp_path):
    final = tmp_path / "00000.parquet"
    with pytest.raises(RuntimeError, match="labeller broke"), shard_file(final, pa.schema([("x", pa.int64())]), 4) as w:
        w.write(pa.table({"x": list(range(9))}))
        raise RuntimeError("labeller broke")
    assert list(tmp_path.iterdir()) == []


def test_a_levels_actors_start_once_and_label_every_shard_it_owes(
    tmp_path, ray_local, photos, make_images_root, monkeypatch
):
    make_images_root(tmp_path, photos, per_shard=3)  # 10 rows: 4 shards
    started = []
    real = label._start_actors

    def counted(group, *args):
        actors = real(group, *args)
        started.append((list(group), len(actors)))
        return actors

    monkeypatch.setattr(label, "_start_actors", counted)
    config = load_config(
        "default",
        ["label.size=64", "label.labelers=[canny_edge,color_palette]", "label.actor_groups=[]", "ray.num_cpus=2"],
        root=str(tmp_path),
    )
    summary = label.run_label(config, progress=False)
    assert started == [(["canny_edge"], 2), (["color_palette"], 2)]  # the default's two actors per pool, once
    root = DatasetRoot(tmp_path)
    for name in ("canny_edge", "color_palette"):
        assert summary.shards_done[name] == 4
        assert summary.rows[name] == 10
        assert all(root.stage(f"label/{name}").read_marker(s) is not None for s in range(4))


def test_a_shard_whose_task_fails_is_reported_with_its_reason_and_the_others_are_labelled(
    tmp_path, ray_local, photos, make_images_root
):
    make_images_root(tmp_path, photos, per_shard=3)  # 10 rows: 4 shards
    (tmp_path / "labels/canny_edge/00002.parquet").mkdir(parents=True)  # its file cannot be renamed into place
    config = load_config(
        "default", ["label.size=64", "label.labelers=[canny_edge]", "ray.num_cpus=2"], root=str(tmp_path)
    )
    summary = label.run_label(config, progress=False)
    assert summary.shards_done["canny_edge"] == 3
    assert list(summary.shards_failed["canny_edge"]) == [2]
    assert "Error" in summary.shards_failed["canny_edge"][2]
    line = next(line for line in summary.lines() if line.startswith("label/canny_edge:"))
    assert "shards done 3, skipped 0, failed 1 (shard 00002: " in line
    stage = DatasetRoot(tmp_path).stage("label/canny_edge")
    assert [stage.read_marker(s) is not None for s in range(4)] == [True, True, False, True]
    assert not list((tmp_path / "labels/canny_edge").glob(".*.tmp"))  # the failed shard's temp file is gone


def test_a_shard_labelled_in_pieces_by_two_actors_is_byte_for_byte_the_shard_one_actor_writes(
    tmp_path, ray_local, photos, make_images_root, monkeypatch
):
    planned = []
    plan = label.Pool.plan

    def recorded(pool, *args):
        plan(pool, *args)
        planned.append({shard: [(p.start, p.stop) for p in pieces] for shard, pieces in pool.pieces.items()})

    monkeypatch.setattr(label.Pool, "plan", recorded)
    files = {}
    for actors in (1, 2):
        root = tmp_path / f"actors-{actors}"
        make_images_root(root, photos, per_shard=10)  # one shard: two actors label 8 and 2 rows of it
        overrides = ["label.size=64", "label.labelers=[canny_edge,color_palette]", "label.actor_groups=[]"]
        overrides += [f"label.{n}.concurrency={actors}" for n in ("canny_edge", "color_palette")]
        summary = label.run_label(
            load_config("default", [*overrides, "ray.num_cpus=2"], root=str(root)), progress=False
        )
        assert summary.shards_done == {"canny_edge": 1, "color_palette": 1}
        assert not list(root.glob("labels/*/_tmp/*"))  # the parts merged and removed
        files[actors] = {n: (root / f"labels/{n}/00000.parquet").read_bytes() for n in ("canny_edge", "color_palette")}
    assert planned == [{}, {}, {0: [(0, 8), (8, 10)]}, {0: [(0, 8), (8, 10)]}]  # whole, then in pieces of batches
    assert files[1] == files[2]
