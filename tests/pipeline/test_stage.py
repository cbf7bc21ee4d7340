"""The stage skeleton on its own, without Ray: stale configs, pending shards, the key check, markers."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from four_m.core.config import load_config
from four_m.core.dataset_root import DatasetRoot
from four_m.core.errors import UserError
from four_m.pipeline.stage import Output, StageRun, downloaded_images, image_keys


class Refused(UserError):
    pass


def _root(tmp_path, shards: int = 2) -> DatasetRoot:
    """``shards`` finished download shards of two keys each."""
    root = DatasetRoot(tmp_path / "root")
    for shard in range(shards):
        path = root / f"images/{shard:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"key": [f"{shard:05d}0", f"{shard:05d}1"]}), path)
        root.stage("download").mark_done(shard, 2, [path], "download-hash")
    return root


def _run(root: DatasetRoot, config_hash: str = "h1") -> StageRun[dict]:
    images = downloaded_images(root, True, Refused)
    return StageRun(
        root,
        load_config("default", root=str(root.path)),
        "stage",
        outputs={"out": Output("made/out", root.stage("stage/out"), config_hash)},
        inputs={"out": {s: (digest,) for s, digest in images.items()}},
        summary={},
    )


def _make(run: StageRun, shard: int, keys: list[str]) -> None:
    file = run.root / f"made/out/{shard:05d}.parquet"
    file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"key": keys}), file)
    run.finish("out", shard, file, pa.chunked_array([keys]), len(keys), image_keys(run.root, shard))


def test_a_run_makes_what_is_pending_and_a_rerun_skips_it(tmp_path):
    run = _run(_root(tmp_path))
    run.begin()
    assert run.pending("out") == [0, 1]
    _make(run, 0, ["000000", "000001"])
    assert run.pending("out") == [1]
    run.write_summary({"done": 1})
    assert json.loads((run.root / "_state/stage/summary.json").read_text()) == {"done": 1}
    assert (run.root / "_state/stage/out/config.yaml").is_file()


def test_keys_out_of_order_remove_the_file_and_are_never_marked(tmp_path):
    run = _run(_root(tmp_path))
    with pytest.raises(RuntimeError, match=r"made/out/00000\.parquet: keys are not those of images/"):
        _make(run, 0, ["000001", "000000"])
    assert not (run.root / "made/out/00000.parquet").exists()
    assert run.pending("out") == [0, 1]


def test_a_remade_upstream_shard_makes_its_output_pending_again(tmp_path):
    root = _root(tmp_path)
    run = _run(root)
    _make(run, 0, ["000000", "000001"])
    path = root / "images/00000.parquet"
    pq.write_table(pa.table({"key": ["000000", "000001"], "more": [1, 2]}), path)  # a retried download
    root.stage("download").mark_done(0, 2, [path], "download-hash")
    assert _run(root).pending("out") == [0, 1]


def test_shards_made_with_another_config_stop_the_run_naming_what_to_delete(tmp_path):
    root = _root(tmp_path)
    _make(_run(root), 0, ["000000", "000001"])
    with pytest.raises(Refused, match=r"1 finished shards of .*made/out were made with another thing config"):
        _run(root, config_hash="h2").check_not_stale([0, 1], Refused, "thing config")


def test_nothing_downloaded_stops_the_run(tmp_path):
    with pytest.raises(Refused, match="no finished download shards under .*: run the download stage first"):
        _run(_root(tmp_path, shards=0))
