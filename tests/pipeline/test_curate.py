"""The curate stage on a real download of the embedded sample with planted duplicates (the same
file, re-encoded, resized and cropped copies at other urls), on real Ray, with the CLIP labeler."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from four_m.core.config import load_config
from four_m.core.curation import DECISIONS, FILTERS, removed_rows
from four_m.core.dataset_root import DatasetRoot
from four_m.filters.base import Rows
from four_m.pipeline.curate import _close_pairs, _groups, run_curate, scorer
from four_m.pipeline.curate_report import write_curate_report
from four_m.pipeline.download import run_download
from four_m.pipeline.label import run_label
from four_m.pipeline.sample_site import DUPLICATES

IMAGE_FILTERS = ["exact_duplicate", "near_duplicate", "min_size", "aspect_ratio"]


def _config(root, port: int, *extra: str):
    overrides = [
        f"sample.port={port}",
        "sample.plant_duplicates=true",
        "label.labelers=[clip]",
        "label.size=64",
        "label.clip.input_size=64",
        "label.clip.concurrency=1",
        "ray.num_cpus=2",
        *extra,
    ]
    return load_config("default", overrides, root=str(root))


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory, ray_local, free_ports):
    """The sample (ten photos, four planted copies, four planted failures), downloaded once."""
    root = tmp_path_factory.mktemp("curate") / "root"
    config = _config(root, free_ports(1)[0])
    run_download(config, progress=False)
    return config


@pytest.fixture
def curated(downloaded, tmp_path):
    """A copy of the downloaded root, curated before labelling."""
    root = tmp_path / "root"
    shutil.copytree(downloaded.root, root)
    config = _config(root, downloaded.sample.port)
    return config, run_curate(config, progress=False)


def _images(root) -> pa.Table:
    files = sorted((root / "images").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f, columns=["key", "url", "status"]) for f in files])


def _shards(root) -> int:
    return len(list((root / "images").glob("*.parquet")))


def _decisions(root) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted((root / DECISIONS).glob("*.parquet"))])


def test_planted_duplicates_are_removed_and_the_original_kept(curated):
    config, summary = curated
    root = DatasetRoot(config.root).path
    images = _images(root)
    url_of = dict(zip(images["key"].to_pylist(), images["url"].to_pylist(), strict=True))
    key_of = {url.rsplit("/", 1)[-1]: key for key, url in url_of.items()}
    removed = {}
    for shard in range(_shards(root)):
        removed.update(removed_rows(DatasetRoot(root), shard))
    copies = {k for k, u in url_of.items() if "/copy_" in u}
    assert len(copies) == len(DUPLICATES)
    assert set(removed) == copies, "the copies, and only them, are removed: every distinct photo is kept"
    decisions = _decisions(root).to_pylist()
    for copy in copies:
        original = url_of[copy].rsplit("/", 1)[-1].split("_", 2)[2].rsplit(".", 1)[0]
        kept = next(key for name, key in key_of.items() if name[4:].rsplit(".", 1)[0] == original)
        verdicts = [d for d in decisions if d["key"] == copy and d["kept"] is False]
        assert verdicts and all(d["duplicate_of"] == kept for d in verdicts), (copy, verdicts)
    assert summary.removed_before_label == len(DUPLICATES)
    assert summary.filters["exact_duplicate"].removed == 1
    assert summary.waiting == ["clip_score", "semantic_duplicate"]


def test_a_rerun_from_scratch_decides_byte_for_byte_the_same(curated):
    config, _ = curated
    root = DatasetRoot(config.root).path
    first = {f.name: f.read_bytes() for f in (root / DECISIONS).glob("*.parquet")}
    shutil.rmtree(root / "curation")
    shutil.rmtree(root / "_state/curate")
    run_curate(config, progress=False)
    assert {f.name: f.read_bytes() for f in (root / DECISIONS).glob("*.parquet")} == first


def test_removed_rows_are_not_labelled_and_a_threshold_change_relabels_nothing(curated):
    config, _ = curated
    root = DatasetRoot(config.root).path
    labelled = run_label(config, progress=False)
    assert labelled.failures["clip"]["curated_near_duplicate"] == 3
    assert labelled.failures["clip"]["curated_exact_duplicate"] == 1
    clip = pa.concat_tables([pq.read_table(f) for f in sorted((root / "labels/clip").glob("*.parquet"))])
    skipped = [e for e in clip["error"].to_pylist() if e and e.startswith("curated:")]
    assert len(skipped) == len(DUPLICATES)

    after = run_curate(config, progress=False)  # the label filters run now
    assert after.waiting == [] and after.filters["clip_score"].scored == 10
    decisions = _decisions(root)
    clip_scores = decisions.filter(pc.equal(decisions["filter"], "clip_score"))["score"].to_pylist()
    scores = sorted(s for s in clip_scores if s is not None)
    median = scores[len(scores) // 2]
    stricter = _config(root, config.sample.port, f"curate.clip_score.threshold={median}")
    redecided = run_curate(stricter, progress=False)
    assert redecided.filters["clip_score"].removed == sum(s < median for s in scores) > 0
    assert sum(redecided.removed_by.values()) > sum(after.removed_by.values())
    again = run_label(stricter, progress=False)
    assert again.shards_done["clip"] == 0 and again.shards_skipped["clip"] == _shards(root), "nothing labelled again"

    looser = _config(root, config.sample.port, "curate.near_duplicate.threshold=0")  # the cropped copy is kept
    run_curate(looser, progress=False)
    relabelled = run_label(looser, progress=False)
    assert relabelled.shards_done["clip"] == 1, "only the shard that gained a row is labelled again"
    assert relabelled.failures["clip"]["curated_near_duplicate"] == 2


def test_the_report_draws_the_scores_and_the_removed_rows(curated):
    config, _ = curated
    scores, removed = write_curate_report(config)
    assert scores.stat().st_size > 10_000 and removed.stat().st_size > 10_000


def test_rows_that_cannot_be_scored_are_counted_and_kept(tmp_path, ray_local, make_images_root, photos, small_config):
    """A corrupt image, a failed download and a root without original sizes: counted per filter
    with their reason, never removed, never stopping the shard."""
    root = tmp_path / "root"
    make_images_root(root, photos)
    config = small_config(root, "curate.filters=[exact_duplicate,near_duplicate,min_size]")
    summary = run_curate(config, progress=False)
    assert not summary.shards_failed
    near = summary.filters["near_duplicate"]
    assert near.unscored["no image"] == 1 and near.unscored["UnidentifiedImageError"] == 1
    assert summary.filters["min_size"].unscored["original size not recorded"] == summary.rows - 1
    # Only the greyscale copy of the first photo goes (a near duplicate); the rows not scored stay.
    assert summary.removed_by == {"near_duplicate": 1} and summary.kept == summary.rows - 1
    assert set(removed_rows(DatasetRoot(root), 2)) == {"000020"}


def test_duplicate_groups_keep_the_most_pixels_then_the_smallest_key():
    pairs = pa.table(
        {
            "a": ["b", "c", "x"],
            "b": ["c", "d", "y"],
            "distance": [1.0, 2.0, 0.0],
            "area_a": [100, 400, 9],
            "area_b": [400, 400, 9],
            "shard_a": [0, 0, 1],
            "shard_b": [0, 1, 1],
        }
    )
    removed = _groups(pairs)
    # b-c-d is one group (a chain): c and d have the most pixels, c the smaller key.
    assert removed == {0: {"b": ("c", 1.0)}, 1: {"d": ("c", 2.0), "y": ("x", 0.0)}}


def test_hash_bands_find_every_pair_within_bands_minus_one_bits(downloaded):
    near = scorer(FILTERS["near_duplicate"], downloaded, "")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 200, dtype=np.uint64)
    flips = [rng.choice(64, rng.integers(0, 4), replace=False) for _ in base]
    copies = np.array([b ^ np.uint64(sum(1 << int(f) for f in fl)) for b, fl in zip(base, flips, strict=True)])
    signatures = np.concatenate([base, copies])
    buckets = near.buckets(signatures)
    found = set()
    for band in range(buckets.shape[1]):
        order = np.argsort(buckets[:, band], kind="stable")
        column = buckets[order, band]
        starts = np.flatnonzero(np.r_[True, column[1:] != column[:-1]])
        for start, stop in zip(starts, np.r_[starts[1:], len(order)], strict=True):
            for i, j, _ in _close_pairs(near, signatures[order], start, stop, 3.0):
                found.add(tuple(sorted((int(order[i]), int(order[j])))))
    assert {(i, i + 200) for i in range(200)} <= found


def test_semantic_search_pairs_near_embeddings_in_one_cluster(downloaded):
    semantic = scorer(FILTERS["semantic_duplicate"], downloaded, "")
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 32))
    vectors = np.concatenate([c + rng.normal(scale=0.3, size=(10, 32)) for c in centres])
    near = vectors[:5] + rng.normal(scale=1e-3, size=(5, 32))
    unit = semantic.as_array(
        pa.array(np.concatenate([vectors, near]).astype(np.float16).tolist(), pa.list_(pa.float16()))
    )
    semantic.fit(unit)
    clusters = semantic.buckets(unit)[:, 0]
    assert (clusters[:5] == clusters[40:]).all(), "a near copy lands in its original's cluster"
    distances = semantic.distances(unit[:5], unit[40:])
    assert (distances <= 0.001).all() and (semantic.distances(unit[:5], unit[10:15]) > 0.07).all()


def test_an_embedding_head_without_weights_says_so_and_one_with_weights_uses_them(tmp_path, downloaded):
    from safetensors.numpy import save_file

    rows = Rows(
        ["a"], [None], [None], [None], {"clip": pa.table({"clip_embedding": [[1.0, 0.0, 0.0]], "error": [None]})}
    )
    aesthetic = scorer(FILTERS["aesthetic"], downloaded, "")
    assert aesthetic.values(rows)[0] is not None and aesthetic.random_init
    weights = {"0.weight": np.array([[2.0, 0.0, 0.0]], np.float32), "0.bias": np.array([0.5], np.float32)}
    save_file(weights, str(tmp_path / "model.safetensors"))
    trained = load_config("default", [f"curate.watermark.model={tmp_path}"], root=str(tmp_path))
    watermark = scorer(FILTERS["watermark"], trained, "")
    assert watermark.values(rows)[0] == pytest.approx(1 / (1 + np.exp(-2.5))) and not watermark.random_init


def test_tokenize_and_the_loader_skip_a_row_curation_removed_and_count_it(tmp_path, tokenized):
    from four_m.core.curation import DECISION_SCHEMA, decisions_file
    from four_m.pipeline.tokenize import run_tokenize
    from four_m.train.data import TokenShards

    config, keys, _, _ = tokenized
    root = tmp_path / "root"
    shutil.copytree(config.root, root)
    config = dataclasses.replace(config, root=str(root))
    shards = TokenShards(root, ["rgb", "caption"])
    before = [key for key, _ in shards.read(shards.shards[0])]
    gone = before[0]
    decision = {"key": gone, "phase": "image", "filter": "min_size", "score": 10.0, "threshold": 64.0}
    decision |= {"kept": False, "duplicate_of": None, "error": None}
    file = decisions_file(DatasetRoot(root), 0)
    file.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([decision], schema=DECISION_SCHEMA), file)

    after = [key for key, _ in shards.read(shards.shards[0])]
    assert after == before[1:] and shards.curated_rows == 1, "the loader applies the current decisions"
    summary = run_tokenize(config, progress=False)
    assert summary.modalities["rgb"].shards_done == 1, "only the shard whose decisions changed is tokenized again"
    assert summary.modalities["rgb"].failures["curated_min_size"] == 1
    tokens = pq.read_table(root / "tokens/rgb/00000.parquet").to_pylist()
    assert [r["error"] for r in tokens if r["key"] == gone] == ["curated: removed by min_size"]
