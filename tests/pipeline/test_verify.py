"""``make verify`` on a root the pipeline made: every stage's markers, a tokenizer's and a run's, and
each kind of damage named by file."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from four_m.core.config import load_config
from four_m.core.dataset_root import DatasetRoot
from four_m.core.verify import Problem, verify_root
from four_m.pipeline.tokenizers import run_tokenizer_training
from four_m.tokenize.registry import tokenizer_state
from four_m.train.run import run_train

RUN = ["train.model=nano", "train.batch_size=4", "train.input_budget=24", "train.target_budget=24"]
ONE_STEP = [*RUN, "train.max_steps=1", "train.warmup_steps=0"]


@pytest.fixture(scope="module")
def finished(tokenized, tmp_path_factory) -> Path:
    """A copy of the tokenized root with a one-step nano run: markers of every kind."""
    config, _, _, _ = tokenized
    root = tmp_path_factory.mktemp("verify") / "root"
    shutil.copytree(config.root, root)
    run_train(_config(root, *ONE_STEP))
    return root


@pytest.fixture
def root(finished, tmp_path) -> Path:
    """A private copy to damage."""
    copy = tmp_path / "root"
    shutil.copytree(finished, copy)
    return copy


def _config(root: Path, *extra: str):
    return load_config("default", ["label.size=64", "ray.num_cpus=2", *extra], root=str(root))


def _verify(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "four_m", "verify", "--root", str(root)], capture_output=True, text=True, timeout=120
    )


def test_a_clean_root_verifies_every_stage_and_exits_0(finished):
    run = _verify(finished)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    stages = [line.split(": ")[1] for line in lines[:-1]]
    assert stages[0] == "download" and "train/tiny" in stages
    for kind in ("label/", "tokenize/", "tokenizers/"):
        assert any(s.startswith(kind) for s in stages), kind
    assert all(line.endswith(": ok") for line in lines[:-1]), lines
    assert lines[-1].startswith(f"verify: {finished}: ") and lines[-1].endswith(": all hold")
    markers = len(list((finished / "_state").rglob("*.done.json")))
    assert f": {markers} markers, " in lines[-1]


def test_a_single_bit_flipped_in_a_token_shard_is_named_and_exits_1(root):
    shard = root / "tokens/depth/00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    run = _verify(root)
    assert run.returncode == 1
    lines = run.stdout.splitlines()
    assert lines[0] == "verify: tokens/depth/00001.parquet: altered: its sha256 differs from the recorded one"
    assert "verify: tokenize/depth: 3 markers, 3 files, " in run.stdout and lines[-1].endswith(": 1 problem")


def test_a_truncated_label_shard_and_a_deleted_image_shard_are_named(root):
    labels = root / "labels/depth/00000.parquet"
    size = labels.stat().st_size
    labels.write_bytes(labels.read_bytes()[: size // 2])
    (root / "images/00002.parquet").unlink()
    assert verify_root(root).problems == [
        Problem("images/00002.parquet", "missing"),
        Problem("labels/depth/00000.parquet", f"truncated: {size // 2} bytes, recorded {size}"),
    ]


def test_an_altered_tokenizer_file_and_run_files_are_found(root):
    weights = root / "tokenizers/depth/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x80
    weights.write_bytes(bytes(data))
    described = root / "runs/tiny/model.json"
    described.write_text(described.read_text() + "\n")
    (root / "runs/tiny/model.safetensors").unlink()
    problems = verify_root(root).problems
    assert [p.path for p in problems] == [
        "tokenizers/depth/model.safetensors",
        "runs/tiny/model.safetensors",
        "runs/tiny/model.json",
    ]
    assert problems[0].what.startswith("altered") and problems[1].what == "missing"
    assert problems[2].what.startswith("size changed: ")


def test_shards_made_from_a_remade_input_and_files_no_marker_lists_are_named(root):
    """A download shard remade (as a retry does) leaves the label and token shards made from it stale;
    a shard whose marker is gone, and a stray file, are listed by no marker."""
    images = root / "images/00000.parquet"
    pq.write_table(pq.read_table(images), images, compression="gzip")  # same rows, other bytes
    DatasetRoot(root).stage("download").mark_done(0, 4, [images], "test")
    (root / "_state/label/det/00001.done.json").unlink()
    (root / "tokens/caption/notes.txt").write_text("mine")
    (root / "tokens/caption/.00002.parquet.1234abcd.tmp").write_text("a killed run's temporary")
    problems = verify_root(root).problems
    stale = {p.path for p in problems if p.what.startswith("stale: made from images/00000.parquet, but it was remade")}
    assert "labels/depth/00000.parquet" in stale and "tokens/rgb/00000.parquet" in stale
    assert all(p.endswith("/00000.parquet") for p in stale)
    gone = {p.path for p in problems if p.what.startswith("stale: made from labels/det/00001.parquet, but no marker")}
    assert "tokens/det/00001.parquet" in gone and all(p.endswith("/00001.parquet") for p in gone)
    unmarked = [p.path for p in problems if p.what.startswith("no marker lists it")]
    assert unmarked == ["labels/det/00001.parquet", "tokens/caption/notes.txt"]
    assert len(problems) == len(stale) + len(gone) + len(unmarked)


def test_a_finished_tokenizer_without_a_marker_gets_one_on_the_next_run(root, tokenized):
    """Tokenizers trained before markers existed (or a run killed between folder and marker)."""
    marker = tokenizer_state(DatasetRoot(root), "depth").marker_path(0)
    recorded = json.loads(marker.read_text())
    marker.unlink()
    assert {p.path for p in verify_root(root).problems} == {f["path"] for f in recorded["files"]}
    config = dataclasses.replace(tokenized[0], root=str(root))  # the tokenizers' own settings
    assert "depth" in run_tokenizer_training(config).skipped
    again = json.loads(marker.read_text())
    assert again["files"] == recorded["files"] and again["rows"] == recorded["rows"]
    assert verify_root(root).ok


def test_a_root_without_markers_is_an_error_not_a_pass(tmp_path):
    run = _verify(tmp_path)
    assert run.returncode == 2
    expected = f"no markers under {tmp_path}/_state: not a dataset root, or no stage has finished there"
    assert run.stderr == f"four_m verify: error: {expected}\n"


def test_a_marker_that_does_not_parse_is_named_and_its_shard_counts_as_listed_by_none(root):
    (root / "_state/tokenize/rgb/00002.done.json").write_text('{"shard": 2')
    problems = verify_root(root).problems
    assert [p.path for p in problems] == ["_state/tokenize/rgb/00002.done.json", "tokens/rgb/00002.parquet"]
    assert problems[0].what.startswith("not a marker (JSONDecodeError: ")
