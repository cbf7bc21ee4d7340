"""A dataset root on an object store (S3 protocol, served on 127.0.0.1): the operations stages rely on."""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest
from upath import UPath

from four_m.core import storage
from four_m.core.dataset_root import DatasetRoot, atomic_path, clear_temporaries


def test_local_paths_and_file_urls_stay_local_and_other_protocols_are_remote(tmp_path):
    assert storage.location(tmp_path / "root") == tmp_path / "root"
    assert storage.location(f"file://{tmp_path}/root") == tmp_path / "root"
    assert not storage.is_remote(storage.location("relative/root"))
    remote = storage.location("s3://bucket/prefix/root")
    assert storage.is_remote(remote) and str(remote) == "s3://bucket/prefix/root"


def test_parquet_round_trips_and_replace_moves_over_the_old_object(object_store):
    root = storage.location(object_store.uri("io"))
    table = pa.table({"key": ["a", "b"], "value": [1, 2]})
    with atomic_path(root / "shard.parquet") as temp:
        storage.write_table(table, temp)
        assert not (root / "shard.parquet").exists()  # nothing at the final name until the block succeeds
    assert storage.read_table(root / "shard.parquet").equals(table)
    assert storage.parquet_file(root / "shard.parquet").metadata.num_rows == 2
    assert storage.read_schema(root / "shard.parquet") == table.schema
    assert [p.name for p in root.iterdir()] == ["shard.parquet"]  # the temporary is gone


def test_a_failed_atomic_write_leaves_nothing_and_cleanup_removes_a_killed_runs_temporaries(object_store):
    root = storage.location(object_store.uri("atomic"))
    with pytest.raises(RuntimeError), atomic_path(root / "x.json") as temp:
        temp.write_text("half")
        raise RuntimeError("killed")
    assert not (root / "x.json").exists()
    (root / ".y.json.1234.tmp").write_text("left by a killed run")
    (root / "_tmp/work.bin").write_bytes(b"work")
    (root / "kept.json").write_text("{}")
    clear_temporaries(root)
    assert sorted(p.name for p in root.iterdir()) == ["kept.json"]


def test_markers_on_an_object_store_notice_a_truncated_file(object_store):
    root = DatasetRoot(object_store.uri("markers"))
    state = root.stage("download")
    shard = root / "images/00000.parquet"
    storage.write_table(pa.table({"key": ["00000000"]}), shard)
    state.mark_done(0, 1, [shard], "hash")
    assert state.is_done(0, verify_checksums=True)
    assert json.loads(state.marker_path(0).read_text())["files"][0]["path"] == "images/00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert not state.is_done(0, verify_checksums=False)


def test_a_published_folder_is_complete_only_with_its_last_file_and_copies_back_whole(object_store, tmp_path):
    local = tmp_path / "built"
    (local / "logs").mkdir(parents=True)
    (local / "weights.bin").write_bytes(b"\x00\x01" * 100)
    (local / "logs/metrics.csv").write_text("step,loss\n0,1.0\n")
    (local / "trained.json").write_text('{"done": true}')
    final = storage.location(object_store.uri("published/depth"))
    (final / "stale.bin").write_bytes(b"old")  # an unfinished earlier attempt
    storage.publish_folder(local, final, last="trained.json")
    assert not local.exists()
    names = sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file())
    assert names == ["logs/metrics.csv", "trained.json", "weights.bin"]
    with storage.local_copy(final) as copy:
        assert isinstance(copy, Path) and not isinstance(copy, UPath)
        assert (copy / "weights.bin").read_bytes() == b"\x00\x01" * 100
        assert (copy / "logs/metrics.csv").read_text() == "step,loss\n0,1.0\n"
    assert not copy.exists()  # private and temporary: nothing accumulates on the workers' disks


def test_a_tree_copies_within_a_bucket_with_its_layout(object_store):
    source = storage.location(object_store.uri("copy/tokenizers"))
    (source / "depth/config.json").write_text("{}")
    (source / "caption/tokenizer.json").write_text('{"v": 1}')
    target = storage.location(object_store.uri("copy/_bad_input/tokenizers"))
    storage.copy_tree(source, target)
    names = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert names == ["caption/tokenizer.json", "depth/config.json"]
    assert (target / "caption/tokenizer.json").read_text() == '{"v": 1}'


def test_files_are_listed_alike_in_a_folder_and_in_a_bucket_and_a_missing_folder_has_none(object_store, tmp_path):
    for base in (tmp_path, storage.location(object_store.uri("listed"))):
        for folder in ("depth/logs", "depth2"):
            (base / folder).mkdir(parents=True, exist_ok=True)  # nothing on a bucket
        (base / "depth/logs/metrics.csv").write_text("step\n")
        (base / "depth/trained.json").write_text("{}")
        (base / "depth2/other.json").write_text("{}")  # a sibling whose name starts alike: not listed
        assert sorted(storage.list_files(base / "depth")) == ["logs/metrics.csv", "trained.json"], base
        assert list(storage.list_files(base / "absent")) == []


@pytest.fixture
def temp_space(tmp_path, monkeypatch) -> Path:
    """The machine's temporary space, as ``tempfile`` reports it, moved into this test's folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_scratch_space_is_private_to_this_user_and_named_the_same_every_run(temp_space):
    remote = storage.location("memory://bucket/root/_models")
    work = storage.scratch(remote)
    base = temp_space / f"four_m-{os.getuid()}"
    assert work.parent == base
    found = os.lstat(base)
    assert found.st_uid == os.getuid() and stat.S_IMODE(found.st_mode) == 0o700
    assert storage.scratch(remote) == work  # a rerun's cleanup finds what a killed run left


@pytest.mark.parametrize("planted", ["open to all", "another owner", "a link"])
def test_a_scratch_base_someone_else_could_have_made_is_refused(temp_space, planted):
    base = temp_space / f"four_m-{os.getuid()}"
    if planted == "a link":
        (temp_space / "elsewhere").mkdir(mode=0o700)
        base.symlink_to(temp_space / "elsewhere")
    else:
        base.mkdir()
        os.chmod(base, 0o777 if planted == "open to all" else 0o700)
        if planted == "another owner":
            os.chown(base, 65534, 65534)
    with pytest.raises(storage.ScratchError, match=re.escape(str(base))):
        storage.scratch(storage.location("memory://bucket/root"))


@pytest.mark.parametrize("where", ["local", "object store"])
def test_a_folder_moves_whole_to_a_new_name(tmp_path, where):
    base = storage.location(f"memory://move/{tmp_path.name}") if where == "object store" else tmp_path
    (base / "run/logs").mkdir(parents=True)
    (base / "run/logs/metrics.csv").write_text("kept")
    (base / "run/model.json").write_text("{}")
    storage.move_folder(base / "run", base / ".run.replaced")
    assert not (base / "run").exists()
    assert (base / ".run.replaced/logs/metrics.csv").read_text() == "kept" and (
        base / ".run.replaced/model.json"
    ).exists()
