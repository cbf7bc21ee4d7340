"""The bad-input corpus through download, label, tokenizers and tokenize, served by a real local
server: every case ends processed right or counted under its reason, every good photo is kept and
no row is lost or repeated; a retried download shard is then relabelled and retokenized."""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest

from four_m.core.dataset_root import DatasetRoot
from four_m.pipeline.bad_inputs import audit, corpus_cases, corpus_config, run_bad_input, serve_corpus
from four_m.pipeline.download import run_retry_failed
from four_m.pipeline.label import run_label
from four_m.pipeline.tokenize import run_tokenize

# One map from images/, one from labels/, one sequence: what tokenize does with each kind of row.
LABELERS = "[depth, caption]"
MODALITIES = "[rgb, depth, caption]"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_local, small_config, tiny_tokenizers, tokenized):
    root = tmp_path_factory.mktemp("bad") / "root"
    config = small_config(
        root,
        *tiny_tokenizers,
        "download.image_size=64",
        "download.timeout_s=3",
        "download.samples_per_shard=13",  # two shards: a retry rewrites one, leaves the other
        "download.threads_per_shard=8",
        "download.cpus_per_shard=0.5",
        f"label.labelers={LABELERS}",
        f"tokenize.modalities={MODALITIES}",
    )
    # The session's tiny tokenizers (same settings): copied into the corpus, as after `make demo`.
    shutil.copytree(Path(tokenized[0].root) / "tokenizers", root / "tokenizers")
    started = time.perf_counter()
    run = run_bad_input(config, progress=False, port=0)
    return corpus_config(config), run, time.perf_counter() - started


def test_every_case_ends_processed_right_or_counted_with_its_reason(corpus, capsys):
    config, run, seconds = corpus
    cases = corpus_cases()
    result = run.audit
    assert any("already trained, skipped" in line for line in run.lines)
    with capsys.disabled():
        print(f"\n{result.line()}; {seconds:.0f} s")
    assert result.problems == []
    assert result.tried == len(cases) and result.lost == 0
    assert result.counted == Counter(c.reason for c in cases if c.reason is not None)
    assert result.processed == sum(c.reason is None for c in cases)
    assert result.good_kept == result.good == 4


def test_failure_reasons_reach_every_stage_summary(corpus):
    config, run, _ = corpus
    expected = Counter(c.reason for c in corpus_cases() if c.reason is not None)
    download, depth = run.lines[0], next(line for line in run.lines if line.startswith("label/depth"))
    assert all(f"{reason}: {n}" in download for reason, n in expected.items()), download
    assert f"no_image: {sum(expected.values())}" in depth
    images = [pq.read_table(p, columns=["key"]) for p in sorted((Path(config.root) / "images").glob("*.parquet"))]
    keys = [k for table in images for k in table["key"].to_pylist()]
    assert len(keys) == len(set(keys)) == len(corpus_cases())


def test_a_retried_shard_is_relabelled_and_retokenized(corpus, tmp_path):
    config, run, _ = corpus
    copy = dataclasses.replace(config, root=str(tmp_path / "root"))
    shutil.copytree(config.root, copy.root)
    root = DatasetRoot(copy.root)
    shards = sorted(int(p.stem) for p in (root / "images").glob("[0-9]*.parquet"))
    keys_before = {s: pq.read_table(root / f"images/{s:05d}.parquet")["key"] for s in shards}
    # The slow url answers at once now: only its row recovers, so only its shard changes.
    with serve_corpus(root, "127.0.0.1", urlsplit(run.base_url).port, delay_s=0):
        retry = run_retry_failed(copy, progress=False)
    assert (retry.recovered, retry.shards_rewritten) == (1, 1)
    assert {s: pq.read_table(root / f"images/{s:05d}.parquet")["key"] for s in shards} == keys_before

    # Tokens of a labelled modality wait for its labels: the shard fails, naming the stage to run.
    early = run_tokenize(dataclasses.replace(copy, tokenize=dataclasses.replace(copy.tokenize, modalities=("depth",))))
    assert list(early.shards_failed) == [0] and "run the label stage first" in early.shards_failed[0]
    assert (early.modalities["depth"].shards_done, early.modalities["depth"].shards_skipped) == (0, len(shards) - 1)

    labelled = run_label(copy, progress=False)
    assert dict(labelled.shards_done) == {"depth": 1, "caption": 1}
    assert labelled.shards_skipped["depth"] == len(shards) - 1
    tokens = run_tokenize(copy, progress=False)
    assert not tokens.shards_failed
    assert {m: (s.shards_done, s.shards_skipped) for m, s in tokens.modalities.items()} == {
        m: (1, len(shards) - 1) for m in ("rgb", "depth", "caption")
    }

    recovered = tuple(dataclasses.replace(c, reason=None) if c.name == "timeout" else c for c in corpus_cases())
    after = audit(root, recovered, run.base_url, copy)
    assert after.problems == [] and after.lost == 0
    assert after.processed == run.audit.processed + 1
