"""The label stage for real: the tiny labelers and the algorithms on Ray actors over images/ shards."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from four_m.core.config import load_config
from four_m.core.dataset_root import DatasetRoot, UpstreamChanged, sha256_file
from four_m.core.modalities import MODALITIES, labelled_modalities
from four_m.core.provenance import RANDOM_INIT
from four_m.core.stage_lock import StageLocked, lock_path
from four_m.labelers.base import LabelBatch
from four_m.labelers.pretrained import PretrainedLabeler
from four_m.labelers.registry import LABELERS
from four_m.pipeline import label as label_stage
from four_m.pipeline.label import LabelStageError, label_levels, run_label
from tests.labelers.hub_cache import REPO, HubCache, tiny_clip_files


def made_by_random_weights(name: str) -> bool:
    """A tiny network's labels, or what an algorithm derives from labels it cannot do without that are."""
    return issubclass(LABELERS[name], PretrainedLabeler) or any(map(made_by_random_weights, MODALITIES[name].requires))


def test_every_labeler_writes_every_row_and_counts_failures(labelled):
    config, keys, summary = labelled
    total = sum(len(k) for k in keys)
    for name in labelled_modalities():
        assert summary.rows[name] == total
        assert summary.labelled[name] == total - 2
        assert dict(summary.failures[name]) == {"no_image": 2}
        assert summary.shards_done[name] == len(keys)
    assert sorted(summary.random_init) == sorted(filter(made_by_random_weights, labelled_modalities()))
    assert {"canny_edge", "color_palette", "metadata"}.isdisjoint(summary.random_init)


def test_workers_write_the_labels_and_the_driver_receives_no_payload(labelled):
    """The driver gets a shard's row count per task: 8 bytes a shard, however large the labels."""
    config, keys, summary = labelled
    root = Path(config.root)
    payload = sum(p.stat().st_size for p in root.glob("labels/*/*.parquet"))
    rows = sum(len(k) for k in keys)
    assert 0 < summary.driver_bytes <= 16 * rows < payload / 100
    assert not list(root.glob("labels/*/.*.tmp"))  # every shard file renamed into place


def test_all_modalities_align_with_images_row_by_row(labelled):
    config, keys, _ = labelled
    root = Path(config.root)
    for name in labelled_modalities():
        for shard, shard_keys in enumerate(keys):
            table = pq.read_table(root / f"labels/{name}/{shard:05d}.parquet")
            assert table["key"].to_pylist() == shard_keys, name
            errors = table["error"].to_pylist()
            payload = table.column(1).to_pylist()
            assert all((e is None) == (p is not None) for e, p in zip(errors, payload, strict=True)), name


def test_files_carry_schema_and_loud_provenance(labelled):
    config, _, _ = labelled
    root = Path(config.root)
    for name in labelled_modalities():
        schema = pq.read_schema(root / f"labels/{name}/00000.parquet")
        assert schema.names[0] == "key" and schema.names[-1] == "error"
        assert (schema.metadata.get(b"four_m.model") == RANDOM_INIT.encode()) == made_by_random_weights(name), name
        assert schema.metadata[b"four_m.modality"] == name.encode()
    captions = pq.read_table(root / "labels/caption/00000.parquet")
    assert captions["alt_text"].to_pylist()[0] == "astronaut eileen collins in an orange flight suit with the us flag"


def test_only_reruns_the_named_labelers_and_leaves_others_byte_identical(labelled):
    config, keys, _ = labelled
    root = DatasetRoot(config.root)
    others = {
        p: sha256_file(p)
        for n in labelled_modalities()
        if n != "depth"
        for p in (root / f"labels/{n}").glob("*.parquet")
    }
    (root / "_state/label/depth/00001.done.json").unlink()
    summary = run_label(config, only=("depth",), progress=False)
    assert summary.shards_done["depth"] == 1 and summary.shards_skipped["depth"] == len(keys) - 1
    assert {p: sha256_file(p) for p in others} == others
    again = run_label(config, progress=False)
    assert sum(again.shards_done.values()) == 0


def test_a_second_run_is_refused_and_a_killed_run_resumes_with_every_key_exactly_once(
    tmp_path, ray_local, photos, halted_after_first_marker, make_images_root, small_config, caplog
):
    root = tmp_path / "root"
    keys = make_images_root(root, photos * 3, per_shard=3)
    config_file = tmp_path / "c.yaml"
    config_file.write_text(small_config(root, "label.labelers=[depth, clip]").to_yaml())
    with halted_after_first_marker("label", config_file, root / "_state/label") as running:
        with pytest.raises(StageLocked, match=rf"another label run holds .*pid {running.pid} on "):
            run_label(load_config(config_file), progress=False)
        holder = json.loads(lock_path(root, "label").read_text())
        assert holder["pid"] == running.pid, "the refused run must leave the running one's lock alone"
    done = list((root / "_state/label").rglob("*.done.json"))
    assert len(done) == 1, "the run halts after its first marker until it is killed"
    with caplog.at_level(logging.WARNING, logger="four_m.core.stage_lock"):
        summary = run_label(load_config(config_file), progress=False)
    assert "taking over the label lock of a run that is gone" in caplog.text
    assert sum(summary.shards_done.values()) == 2 * len(keys) - 1
    assert sum(summary.shards_skipped.values()) == 1
    for name in ("depth", "clip"):
        written = [
            k
            for s in range(len(keys))
            for k in pq.read_table(root / f"labels/{name}/{s:05d}.parquet")["key"].to_pylist()
        ]
        assert written == [k for shard in keys for k in shard]
    assert not list((root / "labels/clip").glob(".*.tmp"))


def test_a_changed_images_shard_stops_the_run_naming_it_before_any_skip_is_trusted(labelled, tmp_path, small_config):
    config, _, _ = labelled
    root = tmp_path / "root"
    shutil.copytree(config.root, root)
    images = root / "images/00000.parquet"
    original = images.read_bytes()
    labels = {p: sha256_file(p) for p in (root / "labels").rglob("*.parquet")}
    images.write_bytes(original[: len(original) // 2])
    with pytest.raises(UpstreamChanged, match=r"images/00000\.parquet does not match .*rerun the download stage"):
        run_label(small_config(root), progress=False)
    images.write_bytes(original[:-1] + b"x")  # same size, other bytes: found by its hash
    with pytest.raises(UpstreamChanged, match="images/00000.parquet does not match .*sha256 differs"):
        run_label(small_config(root), progress=False)
    assert {p: sha256_file(p) for p in labels} == labels, "no label shard is touched"
    assert not lock_path(root, "label").exists(), "the refused run released its lock"


def test_a_failing_batch_is_retried_row_by_row_and_logged_with_its_keys(caplog):
    import numpy as np

    from four_m.pipeline.label_actor import _label_isolated

    class Picky:
        """Fails on any batch holding a 0, as a labeler fails on one image it cannot read."""

        name = "depth"

        def label(self, pixels):
            if (pixels == 0).any():
                raise ValueError("cannot read this image")
            return [{"value": int(p)} for p in pixels]

        def labelled(self, batch):  # no numeric setting of its own
            return self.label(batch.pixels)

    with caplog.at_level(logging.WARNING, logger="four_m.pipeline.label"):
        batch = LabelBatch(np.array([1, 0, 2]), keys=["k1", "k2", "k3"])
        results = _label_isolated(Picky(), batch, [0, 2, 5], limit=60)
    assert [(row, error is None) for row, _, error in results] == [(0, True), (2, False), (5, True)]
    assert [record.getMessage() for record in caplog.records] == [
        "label/depth: a batch of 3 rows (keys k1..k3) failed, retrying row by row: ValueError: cannot read this image",
        "label/depth: row k2 failed: ValueError: cannot read this image",
    ]


def test_a_row_that_hangs_the_labeler_is_quarantined_and_the_others_labelled(caplog):
    """The planted image (value 0) blocks the labeler until the test ends: the batch passes its time
    limit, is retried row by row, and only that row is lost, as labeler_timeout, with its key."""
    import threading

    import numpy as np

    from four_m.core.failures import label_failure_reason
    from four_m.pipeline.label_actor import _label_isolated

    released = threading.Event()

    class Hangs:
        name = "depth"

        def label(self, pixels):
            if (pixels == 0).any():
                released.wait()  # hung until the test releases it: no race on when it returns
            return [{"value": int(p)} for p in pixels]

        def labelled(self, batch):
            return self.label(batch.pixels)

    try:
        with caplog.at_level(logging.WARNING, logger="four_m.pipeline.label"):
            batch = LabelBatch(np.array([1, 0, 2]), keys=["k1", "k2", "k3"])
            results = _label_isolated(Hangs(), batch, [0, 2, 5], limit=1.0)
    finally:
        released.set()
    assert [(row, payload) for row, payload, _ in results] == [(0, {"value": 1}), (2, None), (5, {"value": 2})]
    assert label_failure_reason(results[1][2]) == "labeler_timeout"
    assert [record.getMessage() for record in caplog.records] == [
        "label/depth: a batch of 3 rows (keys k1..k3) took longer than 1 s, retrying row by row",
        "label/depth: row k2 took longer than 1 s alone: quarantined",
    ]


def test_labelers_that_read_labels_run_after_what_they_read():
    names = ("metadata", "depth", "sam_edge", "color_palette", "sam_instance", "det")
    assert label_levels(names) == [["depth", "color_palette", "sam_instance", "det"], ["metadata", "sam_edge"]]
    assert label_levels(("metadata",)) == [["metadata"]], "what it only uses need not be in the run"


def test_a_cycle_of_label_inputs_is_refused(monkeypatch):
    cyclic = replace(MODALITIES["sam_instance"], requires=("sam_edge",))
    monkeypatch.setattr(label_stage, "MODALITIES", {"sam_edge": MODALITIES["sam_edge"], "sam_instance": cyclic})
    with pytest.raises(LabelStageError, match="cycle: sam_edge -> sam_instance -> sam_edge"):
        label_levels(("sam_edge", "sam_instance"))


def test_a_required_label_that_is_missing_stops_the_run_naming_it(tmp_path, make_images_root, photos, small_config):
    make_images_root(tmp_path / "root", photos)
    config = small_config(tmp_path / "root")
    with pytest.raises(
        LabelStageError, match="sam_edge reads sam_instance's labels.*add sam_instance to label.labelers"
    ):
        run_label(config, only=("sam_edge",), progress=False)


def test_a_derived_shard_records_the_label_files_it_read(labelled):
    config, keys, _ = labelled
    root = DatasetRoot(config.root)
    for shard in range(len(keys)):
        marker = root.stage("label/metadata").read_marker(shard)
        read = [digest.path for digest in marker.inputs[1:]]
        assert read == [f"labels/{n}/{shard:05d}.parquet" for n in MODALITIES["metadata"].uses]
        for digest in marker.inputs[1:]:
            source = Path(digest.path).parent.name
            assert root.stage(f"label/{source}").recorded(shard, root / digest.path) == digest
    metadata = pq.read_table(root / "labels/metadata/00000.parquet")["metadata"].to_pylist()
    present = [row for row in metadata if row is not None]
    assert all(row["n_sam_instances"] is not None and row["brightness"] is not None for row in present)
    assert all(row["aesthetic_score"] is None for row in present), "no aesthetic predictor ran"


def test_a_relabelled_source_makes_only_what_read_it_pending_again(labelled):
    """det's shard 0 is rewritten (same rows, other bytes) as a rerun of det would leave it: metadata,
    which read it, is relabelled on the next plain run, and nothing else is."""
    config, _, _ = labelled
    root = DatasetRoot(config.root)
    det = root / "labels/det/00000.parquet"
    marker = root.stage("label/det").read_marker(0)
    pq.write_table(pq.read_table(det), det, row_group_size=1)  # same labels, other bytes
    root.stage("label/det").mark_done(0, marker.rows, [det], marker.config_hash, marker.inputs)
    summary = run_label(config, progress=False)
    assert {n: c for n, c in summary.shards_done.items() if c} == {"metadata": 1}
    read = root.stage("label/metadata").read_marker(0).inputs
    assert root.stage("label/det").recorded(0, det) in read


def test_another_revision_makes_that_labelers_shards_stale_as_another_config_does(
    tmp_path, ray_local, photos, make_images_root, small_config, monkeypatch
):
    """A hub model labels at its pinned commit and its files say so (with the digest ``make models``
    recorded); the same model at another commit finds its shards made with another label config and
    stops before any work, as for any changed setting."""
    hub = HubCache(tmp_path / "hub")
    files = tiny_clip_files(tmp_path / "tiny")
    first = hub.publish(REPO, files)
    second = hub.publish(REPO, {**files, "README.md": b"# tiny CLIP\n"})
    hub.use(monkeypatch)  # this process, and Ray's workers through the forwarded environment
    root = tmp_path / "root"
    keys = make_images_root(root, photos[:2])

    def config(revision: str):
        return small_config(
            root, "label.labelers=[clip]", f"label.clip.model={REPO}", f"label.clip.revision={revision}"
        )

    labeler = LABELERS["clip"](config(first).label.labeler("clip"), 64, None, root)
    digest = labeler.record_weights().weights_sha256
    assert run_label(config(first), progress=False).shards_done["clip"] == len(keys)
    metadata = pq.read_schema(root / "labels/clip/00000.parquet").metadata
    assert metadata[b"four_m.model"] == REPO.encode() and metadata[b"four_m.revision"] == first.encode()
    assert metadata[b"four_m.weights_sha256"] == digest.encode()

    made = {p: sha256_file(p) for p in (root / "labels").rglob("*.parquet")}
    stale = rf"{len(keys)} finished shards of .*labels/clip were made with another label config"
    with pytest.raises(LabelStageError, match=stale):
        run_label(config(second), progress=False)
    assert {p: sha256_file(p) for p in made} == made, "no label file is touched"
