"""Pinned weights: ``make models`` takes a hub model at its configured commit and records every
file's sha256 in the root; labels name the model, the commit and that digest.

The hub is a cache in huggingface_hub's own layout (``hub_cache.py``) holding a tiny CLIP at two
commits, read offline by the real ``snapshot_download`` and ``from_pretrained``: the state a
machine is in after ``make models`` fetched them from the real hub.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from four_m.cli import main
from four_m.core.config import LabelerConfig
from four_m.core.provenance import RANDOM_INIT
from four_m.core.weights import read_manifest
from four_m.labelers.clip import ClipLabeler
from tests.labelers.conftest import batch_of
from tests.labelers.hub_cache import REPO, HubCache, tiny_clip_files

VIEW = 32


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The tiny CLIP at two commits: ``first`` and ``second`` (the same weights and a README)."""
    cache = HubCache(tmp_path / "hub")
    files = tiny_clip_files(tmp_path / "tiny", VIEW)
    first = cache.publish(REPO, files)
    second = cache.publish(REPO, {**files, "README.md": b"# tiny CLIP\n"})
    cache.use(monkeypatch)
    return cache, files, first, second


def _models(root, revision: str) -> int:
    sets = ["label.labelers=[clip]", f"label.clip.model={REPO}", f"label.clip.revision={revision}"]
    return main(["models", "--root", str(root), *(a for s in sets for a in ("--set", s))])


def test_make_models_fetches_the_pinned_commit_and_records_every_files_sha256(tmp_path, hub, capsys):
    cache, files, first, second = hub
    root = tmp_path / "root"
    assert _models(root, first) == 0
    manifest = json.loads((root / "models/clip.json").read_text())
    assert (manifest["modality"], manifest["model"], manifest["revision"]) == ("clip", REPO, first)
    assert manifest["location"].endswith(f"snapshots/{first}")
    expected = [
        {"path": p, "bytes": len(files[p]), "sha256": hashlib.sha256(files[p]).hexdigest()} for p in sorted(files)
    ]
    assert manifest["files"] == expected
    assert {"config.json", "model.safetensors"} <= {f["path"] for f in expected}
    lines = "".join(f"{f['sha256']}  {f['path']}\n" for f in expected)  # sha256sum's output, sorted
    assert manifest["weights_sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    assert f"models: clip: {REPO} at {first} -> " in capsys.readouterr().out

    assert _models(root, second) == 0  # another commit: its own files, its own digest
    again = read_manifest(root, "clip")
    assert again.revision == second and [f.path for f in again.files] == sorted([*files, "README.md"])
    assert again.weights_sha256 != manifest["weights_sha256"]


def test_a_commit_the_hub_lacks_or_a_damaged_download_is_refused_and_the_record_kept(tmp_path, hub, capsys):
    cache, _, first, _ = hub
    root = tmp_path / "root"
    assert _models(root, first) == 0
    recorded = (root / "models/clip.json").read_bytes()
    capsys.readouterr()

    absent = "deadbeef" * 5
    assert _models(root, absent) == 1
    assert f"models: clip: cannot fetch {REPO} at {absent}: LocalEntryNotFoundError" in capsys.readouterr().err

    blob = cache.blob(REPO, first, "model.safetensors")
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1  # one flipped bit: still a file of the right size
    blob.write_bytes(bytes(data))
    assert _models(root, first) == 1
    snapshot_file = cache.folder / f"models--{REPO.replace('/', '--')}/snapshots/{first}/model.safetensors"
    assert f"cached file {snapshot_file} does not match the hub's hash of it" in capsys.readouterr().err
    assert (root / "models/clip.json").read_bytes() == recorded


def test_labels_of_a_pinned_hub_model_name_the_commit_and_the_recorded_digest(tmp_path, hub):
    cache, _, first, second = hub
    root = tmp_path / "root"
    labeler = ClipLabeler(LabelerConfig(model=REPO, revision=first), VIEW, None, root)
    provenance = labeler.provenance()
    assert (provenance["model"], provenance["revision"]) == (REPO, first)
    assert "weights_sha256" not in provenance  # nothing recorded yet

    assert _models(root, first) == 0
    assert labeler.provenance()["weights_sha256"] == read_manifest(root, "clip").weights_sha256
    other = ClipLabeler(LabelerConfig(model=REPO, revision=second), VIEW, None, root)
    assert "weights_sha256" not in other.provenance()  # the record is of another commit

    labeler.setup()  # from_pretrained(REPO, revision=first), from the cache
    local = ClipLabeler(LabelerConfig(model=str(tmp_path / "tiny")), VIEW, None)
    local.setup()
    pixels = batch_of(224)
    np.testing.assert_array_equal(
        np.stack([p["clip"] for p in labeler.label(pixels)]), np.stack([p["clip"] for p in local.label(pixels)])
    )

    tiny = ClipLabeler(LabelerConfig(), VIEW, tmp_path / "tiny", root).provenance()
    assert (tiny["model"], tiny["revision"]) == (RANDOM_INIT, RANDOM_INIT) and "weights_sha256" not in tiny


def test_local_weights_are_recorded_as_they_are_with_no_revision(tmp_path, capsys):
    folder = tmp_path / "tiny"
    files = tiny_clip_files(folder, VIEW)
    root = tmp_path / "root"
    assert (
        main(["models", "--root", str(root), "--set", "label.labelers=[clip]", "--set", f"label.clip.model={folder}"])
        == 0
    )
    manifest = read_manifest(root, "clip")
    assert (manifest.model, manifest.revision, manifest.location) == (str(folder), None, str(folder))
    assert {f.path: f.sha256 for f in manifest.files if f.path in files} == {
        p: hashlib.sha256(data).hexdigest() for p, data in files.items()
    }
    labeler = ClipLabeler(LabelerConfig(model=str(folder)), VIEW, None, root)
    assert labeler.provenance()["revision"] == "local"
    assert labeler.provenance()["weights_sha256"] == manifest.weights_sha256
    assert f"models: clip: {folder} -> {folder}: {len(manifest.files)} files" in capsys.readouterr().out
