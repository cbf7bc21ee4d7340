import os
from pathlib import Path

import pytest

from four_m.core.dataset_root import DatasetRoot, UnusableRootError, atomic_path, check_root_writable


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


@pytest.fixture
def read_only_folder(tmp_path) -> Path:
    """A folder this process cannot create files in: mode 555, or /sys for root (which ignores modes)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
        return folder
    sysfs = Path("/sys")  # Linux's sysfs: no one creates files there
    if not sysfs.is_dir() or _takes_files(sysfs):
        pytest.skip("running as root and no read-only folder to test with")
    return sysfs


def _takes_files(folder: Path) -> bool:
    probe = folder / "four_m_probe"
    try:
        probe.touch()
    except OSError:
        return False
    probe.unlink()
    return True


@pytest.mark.parametrize(
    ("make", "relative", "message"),
    [
        (lambda t: (t / "root").write_text("x"), "root", "{t}/root: {t}/root is a file, not a folder"),
        (lambda t: (t / "file").write_text("x"), "file/root", "{t}/file/root: {t}/file is a file, not a folder"),
        (lambda t: None, "typo/root", "{t}/typo/root: its parent folder {t}/typo does not exist"),
    ],
    ids=["a-file", "under-a-file", "parent-missing"],
)
def test_an_unusable_root_is_refused_naming_it_and_why(tmp_path, make, relative, message):
    make(tmp_path)
    with pytest.raises(UnusableRootError, match="^dataset root " + message.format(t=tmp_path)):
        check_root_writable(str(tmp_path / relative))


def test_a_read_only_root_is_refused(read_only_folder):
    with pytest.raises(UnusableRootError, match=f"dataset root {read_only_folder}/root: .* is not writable"):
        check_root_writable(read_only_folder / "root")


def test_usable_roots_pass_and_nothing_is_created(tmp_path, monkeypatch):
    (tmp_path / "existing").mkdir()
    check_root_writable(tmp_path / "existing")
    check_root_writable(tmp_path / "new")  # its parent exists: the stages create it
    monkeypatch.chdir(tmp_path)
    check_root_writable("data/default")  # relative: parents created as needed (a fresh checkout's default)
    check_root_writable("memory://bucket/root")  # remote: left to its filesystem
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
