"""Stages on a dataset root in an object store (S3 protocol, served on 127.0.0.1): each writes
byte for byte what it writes on a local root, and resumes the same way."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from four_m.core import storage
from four_m.core.config import Config, load_config
from four_m.core.dataset_root import DatasetRoot
from four_m.core.modalities import token_modalities
from four_m.core.verify import Problem, verify_root
from four_m.datasets_cards.card import write_card
from four_m.pipeline.download import run_download
from four_m.pipeline.label import run_label
from four_m.pipeline.tokenize import run_tokenize
from four_m.pipeline.tokenizers import run_tokenizer_training
from four_m.tokenize.label_preview import write_label_preview
from four_m.tokenize.preview import write_token_preview
from four_m.tokenize.sources import read_rows
from four_m.train.evaluate import run_eval
from four_m.train.run import run_train
from four_m.train.sample import write_samples

MAPS = ("rgb", "depth", "normal", "semseg", "clip")


def _digests(root: DatasetRoot, stage: str) -> dict[str, str]:
    """Every file the stage's markers list, by root-relative path, with its recorded sha256."""
    state = root.stage(stage)
    shards = sorted(int(p.name.split(".")[0]) for p in state.folder.glob("*.done.json"))
    assert shards, f"no {stage} markers under {root.path}"
    return {f.path: f.sha256 for s in shards for f in state.read_marker(s).files}


def _upload(local: Path, remote: storage.RootPath, folders: list[str]) -> None:
    """Copy some of a local root's folders to the remote root, as a stage there would have left them."""
    for folder in folders:
        for file in (local / folder).rglob("*"):
            if file.is_file():
                target = remote / file.relative_to(local).as_posix()
                target.fs.put_file(str(file), target.path)


def _remote(config: Config, uri: str) -> Config:
    return dataclasses.replace(config, root=uri)


def test_the_sample_downloads_to_an_object_store_as_to_a_local_root(
    object_store, ray_local, small_config, free_ports, tmp_path
):
    (port,) = free_ports(1)
    local = small_config(tmp_path / "local", f"sample.port={port}", "download.samples_per_shard=4")
    reference = run_download(local, progress=False)
    remote = _remote(local, object_store.uri("download"))
    summary = run_download(remote, progress=False)
    assert summary.shards_failed == {} == reference.shards_failed
    assert (summary.rows_in, summary.rows_out, summary.failures) == (18, 14, reference.failures)
    root = DatasetRoot(remote.root)
    assert storage.is_remote(root.path)
    local_images = {p: d for p, d in _digests(DatasetRoot(local.root), "download").items() if p.endswith(".parquet")}
    assert {p: d for p, d in _digests(root, "download").items() if p.endswith(".parquet")} == local_images
    assert not any(p.name.endswith(".tmp") or p.name == "_tmp" for p in (root / "images").iterdir())
    rerun = run_download(remote, progress=False)
    assert rerun.shards_done == 0 and rerun.shards_skipped == summary.shards_done


def test_labels_made_on_an_object_store_match_those_made_locally(object_store, labelled):
    """Same files, keys, order, errors and provenance; the depth maps agree to 1 % of their range.

    Not byte for byte: the tiny random-init depth model's maps span a tiny range, and each map is
    stretched to 16 bits, so float noise between two label runs (actor threads, batch makeup, other
    labelers in the actor) shows in the low bits of some pixels."""
    config, _, _ = labelled
    uri = object_store.uri("label")
    _upload(Path(config.root), storage.location(uri), ["images", "_state/download"])
    remote = _remote(config, uri)
    labelers = ("depth", "det")  # the cluster test (make cluster-test) runs all six on a bucket
    summary = run_label(remote, only=labelers, progress=False)
    assert all(summary.shards_done[name] == 3 for name in labelers)
    local_root, remote_root = DatasetRoot(config.root), DatasetRoot(uri)
    for name in labelers:
        assert _digests(remote_root, f"label/{name}").keys() == _digests(local_root, f"label/{name}").keys()
        for shard in range(3):
            file = f"labels/{name}/{shard:05d}.parquet"
            made, reference = storage.read_table(remote_root / file), storage.read_table(local_root / file)
            assert made.schema == reference.schema and made.schema.metadata == reference.schema.metadata
            assert made.select(["key", "error"]).equals(reference.select(["key", "error"])), file
    for shard in range(3):
        made, reference = (read_rows(r, "depth", shard, config).values for r in (remote_root, local_root))
        for ours, theirs in zip(made, reference, strict=True):
            assert (ours is None) == (theirs is None)
            assert ours is None or np.allclose(ours, theirs, rtol=0, atol=0.01)
    assert run_label(remote, only=("depth",), progress=False).shards_skipped["depth"] == 3


@pytest.mark.slow  # half a minute: make test-all (make test keeps the download and label ones)
def test_tokenizers_trained_and_tokens_made_on_an_object_store_equal_local_ones(object_store, tokenized):
    config, _, _, _ = tokenized
    modality = "depth"
    uri = object_store.uri("tokenize")
    local = Path(config.root)
    # Everything the tokenize fixture started from, and every tokenizer but one: that one is trained here.
    kept = [f"tokenizers/{m}" for m in token_modalities() if m != modality]
    _upload(local, storage.location(uri), ["images", "labels", "_state/download", "_state/label", *kept])
    remote = _remote(config, uri)
    training = run_tokenizer_training(remote)
    assert list(training.trained) == [modality] and not training.failed
    for name in ("config.json", "model.safetensors", "trained.json"):
        made, reference = DatasetRoot(uri) / f"tokenizers/{modality}/{name}", local / f"tokenizers/{modality}/{name}"
        if name == "trained.json":  # its metrics hold the training's seconds
            assert made.is_file()
        else:
            assert made.read_bytes() == reference.read_bytes(), name
    summary = run_tokenize(remote, progress=False)
    assert not summary.shards_failed
    for name in (*MAPS, "caption", "det"):
        assert _digests(DatasetRoot(uri), f"tokenize/{name}") == _digests(DatasetRoot(config.root), f"tokenize/{name}")
    # The uploaded tokenizers came without their markers: the run that skipped them wrote them.
    assert verify_root(uri).ok


def test_verify_names_a_flipped_bit_a_removed_shard_and_a_stray_file_in_a_bucket(object_store, tokenized):
    config, _, _, _ = tokenized
    uri = object_store.uri("verify")
    remote_root = storage.location(uri)
    stages = ["images", "labels/depth", "tokens/rgb", "_state/download", "_state/label/depth", "_state/tokenize/rgb"]
    _upload(Path(config.root), remote_root, stages)  # three stages' shards: every check, few uploads
    clean = verify_root(uri)
    assert clean.ok and clean.stages["tokenize/rgb"].markers == 3
    shard = remote_root / "tokens/rgb/00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    (remote_root / "labels/depth/00002.parquet").unlink()
    (remote_root / "images/notes.txt").write_text("mine")
    assert verify_root(uri).problems == [
        Problem("labels/depth/00002.parquet", "missing"),
        Problem("tokens/rgb/00001.parquet", "altered: its sha256 differs from the recorded one"),
        Problem(
            "images/notes.txt", "no marker lists it: a shard not finished (rerun its stage) or a file put there by hand"
        ),
    ]


RUN = [
    "train.model=nano",
    "train.batch_size=4",
    "train.input_budget=24",
    "train.target_budget=24",
    "train.warmup_steps=1",
    "train.log_every_n_steps=1",
    "train.holdout_shards=1",
    "generate.steps=3",
    "generate.max_tokens=6",
    "generate.samples=2",
]


@pytest.mark.slow  # half a minute: make test-all (make test keeps the download and label ones)
def test_a_run_trained_resumed_sampled_evaluated_and_carded_on_an_object_store(object_store, tokenized, tmp_path):
    """What a researcher does with a remote token store: the weights equal a local run's, a resume
    on a machine without the local mirror continues the remote run, and sample, eval and card
    write their outputs into the bucket."""
    source, _, _, _ = tokenized
    uri = object_store.uri("research")
    remote_root = storage.location(uri)
    _upload(Path(source.root), remote_root, ["images", "labels", "tokenizers", "tokens", "_state"])
    local_root = tmp_path / "root"
    shutil.copytree(source.root, local_root)
    local = load_config("default", [f"label.size={source.label.size}", *RUN], root=str(local_root))
    remote = _remote(local, uri)

    for steps in (3, 5):  # 5: resumed from the checkpoint of step 3
        config = dataclasses.replace(local, train=dataclasses.replace(local.train, max_steps=steps))
        run_train(config)
        summary = run_train(dataclasses.replace(remote, train=config.train))
        assert summary.steps == steps and [s for s, _ in summary.losses] == list(range(steps))
        # Nothing stays on this machine: the resume below starts from the bucket alone.
        assert not storage.scratch(remote_root / "runs/tiny").exists()
        made = (remote_root / "runs/tiny/model.safetensors").read_bytes()
        assert made == (local_root / "runs/tiny/model.safetensors").read_bytes(), f"weights after {steps} steps"
    assert (remote_root / "runs/tiny/checkpoints/last.ckpt").is_file()

    grid = write_samples(remote)
    assert storage.is_remote(grid)
    with grid.open("rb") as handle:
        assert Image.open(handle).size[0] > 0
    run_eval(remote)
    assert "| depth |" in (remote_root / "runs/tiny/eval/metrics.md").read_text()
    assert storage.is_remote(write_label_preview(remote, samples=4, shard=0))
    assert storage.is_remote(write_token_preview(remote, samples=4, shard=0))
    card = write_card(remote)
    text = card.read_text()
    assert "configs:" in text and "runs/tiny" in text
    assert (remote_root / "card/stats.json").is_file()
    assert (remote_root / "card/preview_labels.png").is_file() and (remote_root / "card/preview_tokens.png").is_file()
    # The run's marker was hashed from the local mirror before it was released.
    verified = verify_root(uri)
    assert verified.stages["train/tiny"].markers == 1 and verified.ok, verified.lines()
