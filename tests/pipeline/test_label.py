"""The label stage for real: six tiny labelers on Ray Data over images/ shards."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from four_m.core.config import load_config
from four_m.core.dataset_root import DatasetRoot, UpstreamChanged, sha256_file
from four_m.core.modalities import labelled_modalities
from four_m.core.provenance import RANDOM_INIT
from four_m.core.stage_lock import StageLocked, lock_path
from four_m.pipeline.label import run_label


def test_every_labeler_writes_every_row_and_counts_failures(labelled):
    config, keys, summary = labelled
    total = sum(len(k) for k in keys)
    for name in labelled_modalities():
        assert summary.rows[name] == total
        assert summary.labelled[name] == total - 2
        assert dict(summary.failures[name]) == {"no_image": 2}
        assert summary.shards_done[name] == len(keys)
    assert sorted(summary.random_init) == sorted(labelled_modalities())


def test_workers_write_the_labels_and_the_driver_receives_no_payload(labelled):
    """The driver gets (shard, rows) per written batch: 16 bytes each, however large the labels."""
    config, keys, summary = labelled
    root = Path(config.root)
    payload = sum(p.stat().st_size for p in root.glob("labels/*/*.parquet"))
    rows = sum(len(k) for k in keys)
    assert 0 < summary.driver_bytes <= 16 * rows < payload / 100
    assert not list(root.glob("labels/*/_tmp"))  # every part merged and removed


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
        assert schema.metadata[b"four_m.model"] == RANDOM_INIT.encode()
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

    from four_m.pipeline.label import _label_isolated

    class Picky:
        """Fails on any batch holding a 0, as a labeler fails on one image it cannot read."""

        name = "depth"

        def label(self, pixels):
            if (pixels == 0).any():
                raise ValueError("cannot read this image")
            return [{"value": int(p)} for p in pixels]

        labelled = label  # no numeric setting of its own

    with caplog.at_level(logging.WARNING, logger="four_m.pipeline.label"):
        results = _label_isolated(Picky(), np.array([1, 0, 2]), [0, 2, 5], ["k1", "k2", "k3"], limit=60)
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
    from four_m.pipeline.label import _label_isolated

    released = threading.Event()

    class Hangs:
        name = "depth"

        def label(self, pixels):
            if (pixels == 0).any():
                released.wait()  # hung until the test releases it: no race on when it returns
            return [{"value": int(p)} for p in pixels]

        labelled = label

    try:
        with caplog.at_level(logging.WARNING, logger="four_m.pipeline.label"):
            results = _label_isolated(Hangs(), np.array([1, 0, 2]), [0, 2, 5], ["k1", "k2", "k3"], limit=1.0)
    finally:
        released.set()
    assert [(row, payload) for row, payload, _ in results] == [(0, {"value": 1}), (2, None), (5, {"value": 2})]
    assert label_failure_reason(results[1][2]) == "labeler_timeout"
    assert [record.getMessage() for record in caplog.records] == [
        "label/depth: a batch of 3 rows (keys k1..k3) took longer than 1 s, retrying row by row",
        "label/depth: row k2 took longer than 1 s alone: quarantined",
    ]
