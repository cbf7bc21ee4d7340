import pytest

from four_m.core.dataset_root import DatasetRoot, atomic_path


def test_atomic_path_leaves_nothing_when_the_write_fails(tmp_path):
    final = tmp_path / "out" / "00000.parquet"
    with pytest.raises(RuntimeError), atomic_path(final) as temp:
        temp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert not final.exists()
    assert list(final.parent.iterdir()) == []


def test_atomic_path_renames_on_success(tmp_path):
    final = tmp_path / "a.txt"
    with atomic_path(final) as temp:
        temp.write_text("done")
    assert final.read_text() == "done"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


@pytest.fixture
def finished(tmp_path):
    root = DatasetRoot(tmp_path)
    state = root.stage("download")
    out = root / "images/00003.parquet"
    out.parent.mkdir(parents=True)
    out.write_bytes(b"x" * 100)
    state.mark_done(3, rows=7, files=[out], config_hash="abc")
    return state, out


def test_marker_records_rows_sizes_and_checksums(finished):
    state, out = finished
    marker = state.read_marker(3)
    assert marker.rows == 7
    assert marker.files[0].path == "images/00003.parquet"
    assert marker.files[0].bytes == 100
    assert state.is_done(3, verify_checksums=True)
    assert not state.is_done(4, verify_checksums=True)


def test_a_truncated_file_is_not_trusted(finished):
    state, out = finished
    out.write_bytes(b"x" * 50)
    assert not state.is_done(3, verify_checksums=False)


def test_a_changed_file_of_the_same_size_fails_only_the_checksum(finished):
    state, out = finished
    out.write_bytes(b"y" * 100)
    assert state.is_done(3, verify_checksums=False)
    assert not state.is_done(3, verify_checksums=True)


def test_a_corrupt_marker_is_not_trusted(finished):
    state, _ = finished
    state.marker_path(3).write_text("{not json")
    assert not state.is_done(3, verify_checksums=False)


def test_stale_shards_are_those_of_another_config(finished):
    state, _ = finished
    assert state.stale_shards([3, 4], "abc") == []
    assert state.stale_shards([3, 4], "def") == [3]


def test_a_shard_made_from_other_inputs_is_not_done(finished, tmp_path):
    download, out = finished
    images = download.recorded(3, out)
    assert images.path == "images/00003.parquet" and download.recorded(4, out) is None
    label = DatasetRoot(tmp_path).stage("label/depth")
    labels = tmp_path / "labels/depth/00003.parquet"
    labels.parent.mkdir(parents=True)
    labels.write_bytes(b"l")
    label.mark_done(3, rows=7, files=[labels], config_hash="abc", inputs=(images,))
    assert label.is_done(3, verify_checksums=False, inputs=(images,))
    out.write_bytes(b"z" * 120)  # the images shard is remade (a retried download)
    download.mark_done(3, rows=7, files=[out], config_hash="abc")
    assert not label.is_done(3, verify_checksums=False, inputs=(download.recorded(3, out),))
