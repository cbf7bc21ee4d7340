"""The training data pipeline on tiny real token stores: zipping, splitting, shuffling, resuming."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from four_m.core.config import CropConfig, MaskingConfig
from four_m.core.crops import WHOLE, crops_array, draw_crops
from four_m.tokenize.store import token_schema, token_table, write_tokens
from four_m.train.batch import MaskedBatch
from four_m.train.data import (
    CROPS,
    TokenDataModule,
    TokenShards,
    TokenStoreError,
    TokenStream,
    check_store,
    draw_crop,
    store_vocabularies,
)
from four_m.train.masking import Masker, ModalityInfo
from four_m.train.run import TrainSummary

GRID = 16
INFOS = (
    ModalityInfo("rgb", "map", GRID),
    ModalityInfo("depth", "map", GRID),
    ModalityInfo("caption", "sequence", 12, num_sentinels=4),
    ModalityInfo("det", "sequence", 12, num_sentinels=4),
)
NAMES = tuple(m.name for m in INFOS)
MASKING = MaskingConfig(input_budget=24, target_budget=20)
MASK_SEED = 3
SHARD_ROWS = (10, 7, 4)  # uneven on purpose
ROW_GROUP = 3
EMPTY_KEY = "00000_0005"  # every modality absent: skipped
NULL_RGB = {"00000_0002", "00001_0000", "00002_0003"}


def _ids(rng: np.random.Generator, info: ModalityInfo) -> np.ndarray:
    if info.layout == "map":
        return rng.integers(0, 64, size=GRID).astype(np.uint16)
    words = rng.integers(info.sentinel_ids.stop, 64, size=int(rng.integers(1, info.num_tokens)))
    return np.array([*words, info.eos_id], np.uint16)


CROPPED = ("rgb", "depth", "det")
"""Stored per crop, as the tokenize stage stores maps and boxes; captions once."""
CROP_SETTINGS = CropConfig(n_crops=3)


def write_store(root: Path, shard_rows=SHARD_ROWS, infos=INFOS, crops: bool = True) -> dict[str, dict[str, Any]]:
    """Token files for every modality and shard (``CROPPED`` ones per crop, unless not ``crops``);
    returns key -> the sample written (a cropped modality: one id array per crop; ``CROPS``: the crops)."""
    rng = np.random.default_rng(0)
    written: dict[str, dict[str, Any]] = {}
    for shard, rows in enumerate(shard_rows):
        keys = [f"{shard:05d}_{i:04d}" for i in range(rows)]
        drawn = [crops_array(draw_crops(k, CROP_SETTINGS)) for k in keys]
        for key, row_crops in zip(keys, drawn, strict=True):
            written.setdefault(key, {})[CROPS] = row_crops if crops else crops_array((WHOLE,))
        for info in infos:
            absent = [k == EMPTY_KEY or (info.name == "rgb" and k in NULL_RGB) for k in keys]
            cropped = crops and info.name in CROPPED
            n = CROP_SETTINGS.n_crops
            ids = [
                None if gone else [_ids(rng, info) for _ in range(n)] if cropped else _ids(rng, info) for gone in absent
            ]
            for key, row in zip(keys, ids, strict=True):
                written.setdefault(key, {})[info.name] = row
            meta = {
                "modality": info.name,
                "vocab_size": "64",
                "max_tokens": str(info.num_tokens),
                "tokenizer": f"{info.name}-abc123",
            }
            schema = token_schema(GRID if info.layout == "map" else None, meta, cropped=cropped)
            errors = [None if i is not None else "absent: failed" for i in ids]
            path = root / f"tokens/{info.name}/{shard:05d}.parquet"
            write_tokens(path, token_table(keys, ids, errors, schema, drawn if cropped else None), ROW_GROUP)
    return written


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("root")
    return root, write_store(root)


def stream(root: Path, **kwargs) -> TokenStream:
    options = {"batch_size": 4, "shuffle_buffer": 5, "seed": 7, "rank": 0, "world_size": 1} | kwargs
    return TokenStream(TokenShards(root, NAMES), Masker(INFOS, MASKING, seed=MASK_SEED), **options)


def batches(delivered, count: int) -> list[MaskedBatch]:
    """The first ``count`` masked batches a stream or its DataLoader delivers (each in a ``StreamBatch``)."""
    return [item.batch for item in itertools.islice(delivered, count)]


def loader_order(s: TokenStream, workers: int, count: int) -> list[MaskedBatch]:
    """What a DataLoader with ``workers`` workers yields: worker i % workers gives batch i."""
    iterators = [s.worker_batches(w, workers) for w in range(workers)]
    return [next(iterators[i % workers]) for i in range(count)]


def assert_same(a: MaskedBatch, b: MaskedBatch) -> None:
    assert a.tensors().keys() == b.tensors().keys()
    for name, tensor in a.tensors().items():
        assert torch.equal(tensor, b.tensors()[name]), name


def same(a: MaskedBatch, b: MaskedBatch) -> bool:
    return a.tensors().keys() == b.tensors().keys() and all(
        torch.equal(t, b.tensors()[n]) for n, t in a.tensors().items()
    )


def test_shards_zip_modalities_by_key_and_skip_rows_with_nothing(store):
    root, written = store
    shards = TokenShards(root, NAMES)
    assert [s.name for s in shards.shards] == ["00000", "00001", "00002"]
    read = [row for shard in shards.shards for row in shards.read(shard)]
    assert [key for key, _ in read] == [k for k in sorted(written) if k != EMPTY_KEY]
    assert shards.empty_rows == 1
    for key, sample in read:
        assert sample.keys() == {*NAMES, CROPS}
        assert np.array_equal(sample[CROPS], written[key][CROPS])
        for name in NAMES:
            want = written[key][name]
            if want is None or name not in CROPPED:
                assert (sample[name] is None) if want is None else np.array_equal(sample[name], want)
            else:
                assert len(sample[name]) == len(want) and all(map(np.array_equal, sample[name], want))
    assert all(read_sample["rgb"] is None for key, read_sample in read if key in NULL_RGB)


def test_each_example_shows_one_stored_crop_drawn_from_seed_key_and_epoch(store):
    root, written = store
    shards = TokenShards(root, NAMES)
    draws = {}
    for key, sample in (row for shard in shards.shards for row in shards.read(shard)):
        for epoch in range(4):
            crop = draw_crop(7, key, epoch, len(sample[CROPS]))
            assert crop == draw_crop(7, key, epoch, 3)  # seed, key and epoch alone: any worker, any resume
            draws[key, epoch] = crop
            shown = shards.view(sample, crop)
            for name in CROPPED:  # every cropped modality shows the same crop
                want = written[key][name]
                assert (shown[name] is None) if want is None else np.array_equal(shown[name], want[crop])
            assert np.array_equal(shown["caption"], written[key]["caption"])  # captions: one for every crop
    assert set(draws.values()) == {0, 1, 2}  # 4M: one crop per example, any of them
    assert any(draw_crop(8, k, e, 3) != c for (k, e), c in draws.items())  # another seed, other draws


def test_cropped_modalities_tokenized_under_other_crops_are_refused(tmp_path):
    write_store(tmp_path, shard_rows=(4,))
    other = tmp_path / "other"
    write_store(other, shard_rows=(4,))
    table = pq.read_table(other / "tokens/depth/00000.parquet")
    shifted = [np.asarray(c, np.float32).reshape(-1, 5) * 0.5 for c in table.column("crops").to_pylist()]
    ids = [None if r is None else [np.asarray(c, np.uint16) for c in r] for r in table.column("tokens").to_pylist()]
    path = tmp_path / "tokens/depth/00000.parquet"
    write_tokens(path, token_table(table["key"].to_pylist(), ids, table["error"].to_pylist(), table.schema, shifted), 3)
    shards = TokenShards(tmp_path, NAMES)
    with pytest.raises(TokenStoreError, match="hold different crops .* retokenize"):
        list(shards.read(shards.shards[0]))


def test_holdout_sets_the_last_shards_aside_and_keeps_one_for_training(store):
    root, _ = store
    split = TokenShards(root, NAMES, holdout=1)
    assert [s.name for s in split.shards] == ["00000", "00001"] and [s.name for s in split.held_out] == ["00002"]
    assert TokenShards(root, NAMES).held_out == ()
    with pytest.raises(TokenStoreError, match="cannot hold out 3 of the 3 complete token shard"):
        TokenShards(root, NAMES, holdout=3)


def test_misaligned_or_missing_shards_raise_naming_the_file(tmp_path):
    write_store(tmp_path, shard_rows=(4, 3))
    depth = tmp_path / "tokens/depth/00001.parquet"
    keys = ["00001_0000", "00001_0002", "00001_0001"]  # rows swapped
    schema = token_schema(GRID, {"modality": "depth", "vocab_size": "64", "max_tokens": str(GRID), "tokenizer": "t"})
    write_tokens(depth, token_table(keys, [np.zeros(GRID, np.uint16)] * 3, [None] * 3, schema), ROW_GROUP)
    shards = TokenShards(tmp_path, NAMES)
    list(shards.read(shards.shards[0]))
    with pytest.raises(TokenStoreError, match=r"row 1: keys differ.*depth/00001\.parquet: '00001_0002'"):
        list(shards.read(shards.shards[1]))

    write_tokens(depth, token_table(keys[:2], [None] * 2, ["absent"] * 2, schema), ROW_GROUP)
    with pytest.raises(TokenStoreError, match=r"different row counts.*depth/00001\.parquet: 2"):
        list(shards.read(shards.shards[1]))

    depth.unlink()
    with pytest.raises(TokenStoreError, match=r"missing .*tokens/depth/00001\.parquet"):
        TokenShards(tmp_path, NAMES)
    kept = TokenShards(tmp_path, NAMES, skip_incomplete=True)
    assert [s.name for s in kept.shards] == ["00000"] and kept.skipped == ("00001",)
    with pytest.raises(TokenStoreError, match="no token shards for modality 'clip'"):
        TokenShards(tmp_path, ["rgb", "clip"])


@pytest.mark.parametrize("world, workers", [(1, 1), (1, 3), (2, 2), (3, 3)], ids=["1x1", "1x3", "2x2", "3x3"])
def test_streams_of_ranks_and_workers_are_disjoint_and_cover_the_store(store, world, workers):
    root, written = store
    streams = world * workers
    seen: list[str] = []
    for rank, worker in itertools.product(range(world), range(workers)):
        s = stream(root, rank=rank, world_size=world)
        keys = [key for key, _ in s.epoch_samples(rank * workers + worker, streams, epoch=0)]
        assert keys, f"stream {rank}/{worker} got nothing"
        seen += keys
    assert sorted(seen) == [k for k in sorted(written) if k != EMPTY_KEY]  # once each
    # More streams than shards: each shard is cut into row-strided parts.
    assert stream(root).units(0, streams)[0].parts == math.ceil(streams / len(SHARD_ROWS))


def test_same_seed_same_batches_and_epochs_reshuffle(store):
    root, _ = store
    first = batches(stream(root), 6)
    again = batches(stream(root), 6)
    for a, b in zip(first, again, strict=True):
        assert_same(a, b)
    other = batches(stream(root, seed=8), 6)
    assert not all(same(a, b) for a, b in zip(first, other, strict=True))

    s = stream(root)
    epoch0 = [k for k, _ in s.epoch_samples(0, 1, 0)]
    epoch1 = [k for k, _ in s.epoch_samples(0, 1, 1)]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    epochs = [epoch for epoch, _, _ in itertools.islice(s.samples(0, 1), 3 * len(epoch0))]
    assert epochs == [0] * len(epoch0) + [1] * len(epoch0) + [2] * len(epoch0)  # repeats forever


def test_every_rank_yields_as_many_batches_as_asked_with_uneven_shards(store):
    root, _ = store
    ranks = [stream(root, rank=r, world_size=2, batch_size=3) for r in range(2)]
    rows = [sum(1 for _ in r.epoch_samples(r.rank, 2, 0)) for r in ranks]
    assert rows[0] != rows[1]  # shards 0 + 2 against shard 1
    steps = 3 * max(rows)  # several epochs of either rank
    assert [sum(1 for _ in itertools.islice(r, steps)) for r in ranks] == [steps, steps]


@pytest.mark.parametrize("workers, k", [(1, 4), (2, 5), (3, 7)])
def test_resume_after_k_batches_continues_with_batch_k_plus_one(store, workers, k):
    root, _ = store
    whole = loader_order(stream(root), workers, k + 4)
    resumed = loader_order(stream(root, start_batch=k), workers, 4)
    for a, b in zip(whole[k:], resumed, strict=True):
        assert_same(a, b)


def test_absent_modality_flows_through_and_batches_have_the_budget_shapes(store):
    root, written = store
    s = stream(root, batch_size=1, shuffle_buffer=0)  # in order: batch i is the i-th kept row
    keys = [k for k in sorted(written) if k != EMPTY_KEY]
    rgb = NAMES.index("rgb")
    for key, batch in zip(keys, batches(s, len(keys)), strict=True):
        used = torch.cat([batch.input_modality[batch.input_mask], batch.target_modality[batch.target_mask]])
        if key in NULL_RGB:
            assert rgb not in used.tolist()
        assert used.numel() > 0
    (batch,) = batches(stream(root, batch_size=5), 1)
    for name, tensor in batch.tensors().items():
        budget = MASKING.input_budget if name.startswith("input") else MASKING.target_budget
        assert tensor.shape == (5, budget), name
    assert batch.input_mask.dtype == torch.bool and batch.input_ids.dtype == torch.long


def test_what_reading_passes_over_travels_with_the_next_batch_and_the_data_module_sums_it(store):
    root, written = store
    kept = len(written) - 1  # rows per epoch: all but the empty one
    delivered = list(itertools.islice(stream(root, batch_size=1, shuffle_buffer=0), 2 * kept))
    empties = [item.passed_over["empty_rows"] for item in delivered]
    assert empties[5] == 1 and empties[kept + 5] == 1 and sum(empties) == 2  # row 5 of shard 0, each epoch
    data = TokenDataModule(root, Masker(INFOS, MASKING, seed=MASK_SEED), 1, shuffle_buffer=0, num_workers=2)
    loader = data.train_dataloader()
    handed = [data.on_before_batch_transfer(item, 0) for item in itertools.islice(loader, 2 * kept)]
    assert all(isinstance(batch, MaskedBatch) for batch in handed) and data.batches_consumed == 2 * kept
    # Counted in the workers, summed here: worker 0 reads shards 0 and 2 (13 rows kept), delivers
    # every other batch, and so passed shard 0's empty row in both of its epochs begun.
    assert data.passed_over == {"empty_rows": 2, "incomplete_rows": 0, "undecodable_images": 0, "curated_rows": 0}
    summary = TrainSummary(root, 1, [], 1.0, passed_over=data.passed_over)
    assert (
        summary.lines()[-1] == "train: passed over while reading, each time an epoch read them: 2 rows with no modality"
    )
    assert not any("passed over" in line for line in TrainSummary(root, 1, [], 1.0).lines())


def test_dataloader_with_two_workers_matches_the_stream_and_resumes(store):
    root, _ = store
    expected = loader_order(stream(root), 2, 5)
    loader = DataLoader(stream(root), batch_size=None, num_workers=2)
    for a, b in zip(expected, batches(loader, 5), strict=True):
        assert_same(a, b)
    resumed = DataLoader(stream(root, start_batch=3), batch_size=None, num_workers=2)
    for a, b in zip(expected[3:], batches(resumed, 2), strict=True):
        assert_same(a, b)


def plant_id(path: Path, row: int, position: int, token: int) -> str:
    """Rewrite a token file with one id replaced (same schema and metadata; in a cropped file, in the
    row's last crop); returns that row's key."""
    table = pq.read_table(path)
    cropped = "crops" in table.column_names
    as_ids = (lambda r: [np.array(c, np.uint16) for c in r]) if cropped else (lambda r: np.array(r, np.uint16))
    ids = [None if r is None else as_ids(r) for r in table.column("tokens").to_pylist()]
    (ids[row][-1] if cropped else ids[row])[position] = token
    crops = [np.asarray(c, np.float32).reshape(-1, 5) for c in table.column("crops").to_pylist()] if cropped else None
    keys = table.column("key").to_pylist()
    write_tokens(path, token_table(keys, ids, table.column("error").to_pylist(), table.schema, crops), ROW_GROUP)
    return keys[row]


def test_an_id_past_the_vocabulary_names_the_file_modality_id_and_row(tmp_path):
    write_store(tmp_path, shard_rows=(4, 7))
    caption = tmp_path / "tokens/caption/00001.parquet"
    key = plant_id(caption, row=4, position=0, token=64)  # vocab_size 64: ids 0..63; row 4 is in the 2nd row group
    shards = TokenShards(tmp_path, NAMES)
    list(shards.read(shards.shards[0]))
    with pytest.raises(TokenStoreError) as error:
        list(shards.read(shards.shards[1]))
    assert str(error.value) == (
        f"{caption}: caption token id 64 at row 4 (key {key!r}) is out of range: the vocabulary has 64 ids;"
        " retokenize this shard (make tokenize)"
    )


def test_an_id_past_the_vocabulary_in_a_dataloader_worker_stops_training_in_one_line(tmp_path):
    write_store(tmp_path, shard_rows=(4,))
    rgb = tmp_path / "tokens/rgb/00000.parquet"
    plant_id(rgb, row=0, position=5, token=65535)
    data = TokenDataModule(
        tmp_path, Masker(INFOS, MASKING, seed=MASK_SEED), batch_size=2, num_workers=1, shuffle_buffer=0
    )
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    with pytest.raises(TokenStoreError) as error:
        trainer.fit(Recorder(), datamodule=data)
    assert "\n" not in str(error.value)
    assert str(error.value).startswith(f"{rgb}: rgb token id 65535 at row 0 (key '00000_0000') is out of range")


def test_store_vocabularies_read_the_metadata_and_check_the_run(store, tmp_path):
    root, _ = store
    vocabularies = store_vocabularies(root, NAMES)
    assert vocabularies["rgb"] == {
        "vocab_size": 64,
        "max_tokens": GRID,
        "tokenizer": "rgb-abc123",
        "fixed_length": True,
    }
    assert vocabularies["caption"]["max_tokens"] == 12 and not vocabularies["caption"]["fixed_length"]
    check_store(vocabularies, INFOS)
    with pytest.raises(TokenStoreError, match="rgb: the run wants maps of 9 tokens"):
        check_store(vocabularies, [ModalityInfo("rgb", "map", 9)])

    write_store(tmp_path, shard_rows=(2, 2), infos=INFOS[:1])
    schema = token_schema(GRID, {"vocab_size": "65", "max_tokens": str(GRID), "tokenizer": "rgb-other"})
    write_tokens(tmp_path / "tokens/rgb/00001.parquet", token_table(["a"], [None], ["x"], schema), ROW_GROUP)
    with pytest.raises(TokenStoreError, match=r"00000\.parquet has .*rgb-abc123.* but .*00001\.parquet has"):
        store_vocabularies(tmp_path, ["rgb"])


class Recorder(L.LightningModule):
    """Trains nothing much; records a fingerprint of every batch it is given."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[int] = []

    def training_step(self, batch: MaskedBatch, batch_idx: int):
        self.seen.append(int((batch.input_ids * torch.arange(batch.input_ids.shape[1])).sum()))
        return self.weight * batch.target_ids.float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(root: Path, steps: int, ckpt: Path | None = None, save: Path | None = None) -> Recorder:
    model = Recorder()
    data = TokenDataModule(
        root, Masker(INFOS, MASKING, seed=MASK_SEED), batch_size=3, modalities=NAMES, shuffle_buffer=5, seed=1
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt)
    if save is not None:
        trainer.save_checkpoint(save)
    return model


def test_lightning_checkpoint_resumes_the_stream_mid_epoch(store, tmp_path):
    root, _ = store
    whole = fit(root, 8).seen  # 24 samples: more than one epoch of the 20 kept rows
    first = fit(root, 3, save=tmp_path / "mid.ckpt").seen
    assert torch.load(tmp_path / "mid.ckpt", weights_only=False)["TokenDataModule"]["batches_consumed"] == 3
    rest = fit(root, 8, ckpt=tmp_path / "mid.ckpt").seen
    assert first + rest == whole
