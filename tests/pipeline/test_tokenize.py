"""Tokenizer training and the tokenize stage for real: tiny VQ tokenizers and WordPiece, on Ray Data."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from four_m.core.config import load_config
from four_m.core.crops import Crop
from four_m.core.dataset_root import DatasetRoot, UpstreamChanged, sha256_file
from four_m.core.label_codec import encode_png
from four_m.core.modalities import MODALITIES, token_modalities
from four_m.core.views import cut_crop
from four_m.pipeline.tokenize import TokenizeStageError, run_tokenize
from four_m.pipeline.tokenizers import TokenizerTrainingError, run_tokenizer_training
from four_m.tokenize.base import TokenizerInputError
from four_m.tokenize.registry import TRAINED, load_tokenizer
from four_m.tokenize.shard import tokenize_shard
from four_m.tokenize.sources import read_rows
from four_m.tokenize.store import read_crops, read_token_rows


def test_every_tokenizer_trains_and_records_its_metrics(tokenized):
    config, _, trained, _ = tokenized
    assert not trained.failed
    root = DatasetRoot(config.root)
    for modality in token_modalities():
        record = json.loads((root / f"tokenizers/{modality}/{TRAINED}").read_text())
        assert record["modality"] == modality and record["samples"] > 0
    assert set(trained.trained) == set(token_modalities())
    again = run_tokenizer_training(config)
    assert sorted(again.skipped) == sorted(token_modalities()) and not again.trained


def test_tokens_align_with_images_and_absent_labels_stay_absent(tokenized):
    config, keys, _, summary = tokenized
    root = Path(config.root)
    assert not summary.shards_failed
    for modality in token_modalities():
        for shard, shard_keys in enumerate(keys):
            table = pq.read_table(root / f"tokens/{modality}/{shard:05d}.parquet")
            assert table["key"].to_pylist() == shard_keys, modality
            failed = _failed_upstream(root, modality, shard)
            tokens = table["tokens"].to_pylist()
            assert [t is None for t in tokens] == failed, modality
            assert all(
                e.startswith("absent: ") for t, e in zip(tokens, table["error"].to_pylist(), strict=True) if t is None
            )
        stats = summary.modalities[modality]
        assert stats.rows_in == sum(len(k) for k in keys)
        assert stats.rows_out + stats.failures.get("absent_upstream", 0) == stats.rows_in


def _failed_upstream(root: Path, modality: str, shard: int) -> list[bool]:
    """Rows whose value is missing upstream: no image (as the labelers saw it), no alt-text, or a label error."""
    if modality == "rgb":
        labels = pq.read_table(root / f"labels/depth/{shard:05d}.parquet")
        return [(e or "").startswith("no image") for e in labels["error"].to_pylist()]
    source = pq.read_table(root / f"{MODALITIES[modality].folder}/{shard:05d}.parquet")
    if modality == "caption":
        return [not (t or "").strip() for t in source["alt_text"].to_pylist()]
    return [e is not None for e in source["error"].to_pylist()]


def test_ids_lie_in_the_vocabulary_and_maps_have_the_grid(tokenized):
    config, _, _, _ = tokenized
    for modality, spec in ((m, MODALITIES[m]) for m in token_modalities()):
        table = pq.read_table(Path(config.root) / f"tokens/{modality}/00000.parquet")
        meta = table.schema.metadata
        vocab = int(meta[b"four_m.vocab_size"])
        stored = [t for t in table["tokens"].to_pylist() if t is not None]
        if spec.cropped:  # maps and boxes: one id list per crop, as many as tokenize.crops asks
            assert all(len(t) == config.tokenize.crops.n_crops for t in stored), modality
            stored = [crop for t in stored for crop in t]
        rows = [np.asarray(t) for t in stored]
        assert rows and all(r.max() < vocab for r in rows), modality
        if spec.layout == "map":
            assert all(len(r) == 16 for r in rows) and vocab == 32
        else:
            assert all(1 <= len(r) <= config.tokenize.text.max_tokens for r in rows)
        assert meta[b"four_m.tokenizer"].startswith(modality.encode())


def test_a_flipped_crop_of_normals_is_tokenized_as_the_mirrored_geometry(tokenized):
    config, _, _, _ = tokenized
    root = DatasetRoot(config.root)
    tokenizer = load_tokenizer(root, "normal")
    values = read_rows(root, "normal", 0, config)
    _, ids = read_token_rows(root / "tokens/normal/00000.parquet")
    crops = read_crops(root / "tokens/normal/00000.parquet")
    flipped = [
        (r, c) for r, row in enumerate(crops) for c, crop in enumerate(row) if crop[4] and values.values[r] is not None
    ]
    assert flipped, "tokenize.crops in default.yaml draws flipped crops"
    for row, index in flipped:
        crop = Crop.from_row(crops[row][index])
        unflipped = cut_crop(
            values.values[row].transpose(1, 2, 0), replace(crop, flip=False), config.tokenize.crops.size
        )
        mirrored = unflipped[:, ::-1].transpose(2, 0, 1).copy()
        mirrored[0] *= -1  # x points the other way in a mirror
        (expected,) = tokenizer.encode([mirrored])
        assert np.array_equal(ids[row][index], expected)


def test_hugging_face_datasets_reads_the_token_store(tokenized, tmp_path):
    from datasets import load_dataset

    config, keys, _, _ = tokenized
    files = sorted(str(p) for p in (Path(config.root) / "tokens/depth").glob("*.parquet"))
    dataset = load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path))
    assert dataset["key"] == [k for shard in keys for k in shard]
    # a list of crops, each a fixed-length list of 16 ids; the crops beside them
    assert dataset.features["tokens"].feature.length == 16 and dataset.features["crops"].feature.length == 5
    row = next(r for r in dataset if r["tokens"] is not None)
    assert len(row["tokens"]) == len(row["crops"]) == config.tokenize.crops.n_crops


def test_a_rerun_skips_finished_shards_and_a_new_tokenizer_makes_tokens_stale(tokenized, tiny_tokenizers):
    config, keys, _, _ = tokenized
    again = run_tokenize(config, progress=False)
    assert all(s.shards_done == 0 and s.shards_skipped == len(keys) for s in again.modalities.values())
    with pytest.raises(TokenizerTrainingError, match="another config"):
        run_tokenizer_training(
            load_config(
                "default",
                [f"label.size={config.label.size}", *tiny_tokenizers, "tokenize.rgb.steps=13"],
                root=config.root,
            )
        )
    trained = Path(config.root) / "tokenizers/rgb/trained.json"
    backup = trained.read_bytes()
    trained.write_bytes(backup.replace(b'"samples"', b'"samples_"'))  # the tokenizer's id changes
    try:
        with pytest.raises(TokenizeStageError, match="tokens/rgb"):
            run_tokenize(config, progress=False)
    finally:
        trained.write_bytes(backup)


def test_a_killed_run_resumes_with_every_key_exactly_once(
    tmp_path, ray_local, photos, make_images_root, kill_after_first_marker, tiny_tokenizers
):
    root = tmp_path / "root"
    keys = make_images_root(root, photos * 3, per_shard=1)
    config = load_config(
        "default",
        ["label.size=64", *tiny_tokenizers, "tokenize.modalities=[rgb]", "tokenize.concurrency=1"],
        root=str(root),
    )
    run_tokenizer_training(config)
    config_file = tmp_path / "c.yaml"
    config_file.write_text(config.to_yaml())
    done = kill_after_first_marker("tokenize", config_file, root / "_state/tokenize/rgb")
    assert done == 1, "the run halts after its first marker until it is killed"
    summary = run_tokenize(config, progress=False)
    assert summary.modalities["rgb"].shards_done == len(keys) - done
    written = [
        k for s in range(len(keys)) for k in pq.read_table(root / f"tokens/rgb/{s:05d}.parquet")["key"].to_pylist()
    ]
    assert written == [k for shard in keys for k in shard]
    assert not list((root / "tokens/rgb").glob(".*.tmp"))


def test_a_label_of_the_wrong_class_count_stops_its_shard_naming_modality_file_and_expectation(tokenized, tmp_path):
    config, _, _, _ = tokenized
    root = DatasetRoot(tmp_path / "root")
    shutil.copytree(config.root, root.path)
    path = root / "labels/semseg/00000.parquet"
    table = pq.read_table(path)
    size = config.label.size
    bad = encode_png(np.full((size, size), 200, np.uint8))  # COCO has 133 classes; 255 means none
    payloads = [bad if p is not None else None for p in table["semseg"].to_pylist()]
    pq.write_table(table.set_column(1, "semseg", pa.array(payloads, pa.binary())), path)
    tokenizer = load_tokenizer(root, "semseg")
    tokens = root / "tokens/semseg/00000.parquet"
    before = sha256_file(tokens)
    with pytest.raises(TokenizerInputError, match=r"labels/semseg/00000\.parquet: semseg: .*\[200\]"):
        tokenize_shard(root, 0, {"semseg": tokenizer}, config, {"semseg": {}})
    assert sha256_file(tokens) == before, "a failed shard must leave the finished file alone"


def test_a_truncated_label_shard_stops_the_run_naming_it(tokenized, tmp_path):
    config, _, _, _ = tokenized
    root = tmp_path / "root"
    shutil.copytree(config.root, root)
    labels = root / "labels/depth/00001.parquet"
    labels.write_bytes(labels.read_bytes()[:100])
    tokens = {p: sha256_file(p) for p in (root / "tokens").rglob("*.parquet")}
    with pytest.raises(UpstreamChanged, match=r"labels/depth/00001\.parquet does not match .*rerun the label stage"):
        run_tokenize(replace(config, root=str(root)), progress=False)
    assert {p: sha256_file(p) for p in tokens} == tokens, "no token shard is touched"
