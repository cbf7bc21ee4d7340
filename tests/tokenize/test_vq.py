import csv
import json
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from four_m.core.config import VQConfig
from four_m.core.errors import UserError
from four_m.core.modalities import map_modalities
from four_m.tokenize.base import TOKEN_DTYPE, TokenizerInputError
from four_m.tokenize.vq import VQTokenizer
from four_m.tokenize.vq_training import LOG_DIR, evaluate, train_vq
from tests.tokenize.test_maps import EDGE_MAPS, FEATURE_MAPS, adapter_params

SIZE, GRID = 32, 4
CLASSES, DIM = 5, 16
CFG = VQConfig(
    codebook_size=32,
    code_dim=8,
    width=8,
    grid=GRID,
    steps=40,
    batch_size=8,
    learning_rate=3e-3,
    ema_decay=0.9,
    dead_after=10,
)
PARAMS = adapter_params(CLASSES, DIM)
SIDES = {**dict.fromkeys(PARAMS, SIZE), **dict.fromkeys(FEATURE_MAPS, GRID)}  # features sit on the token grid


def smooth(count: int, channels: int, side: int, seed: int) -> np.ndarray:
    """(count, channels, side, side) float32 fields of unit scale, smooth over a quarter of the side."""
    coarse = torch.from_numpy(np.random.default_rng(seed).normal(size=(count, channels, 4, 4)).astype(np.float32))
    return F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False).numpy()


def synthetic(modality: str, count: int = 16, seed: int = 0) -> list[np.ndarray]:
    """Tiny structured values of each modality: something a small autoencoder can learn."""
    channels = {"rgb": 3, "normal": 3, **dict.fromkeys(FEATURE_MAPS, DIM)}.get(modality, 1)
    fields = smooth(count, channels, SIDES[modality], seed)
    if modality in ("rgb", "depth"):
        return list(np.clip(fields * 0.3 + 0.5, 0, 1))
    if modality == "normal":
        return list(np.clip(fields / np.linalg.norm(fields, axis=1, keepdims=True), -1, 1))
    if modality == "semseg":
        ids = np.clip(np.abs(fields[:, 0]) * 3, 0, CLASSES - 1).astype(np.int64)
        ids[:, :2] = 255  # an unlabelled band
        return list(ids)
    if modality in EDGE_MAPS:  # the level line of a smooth field: thin, connected curves
        return list((np.abs(fields) < 0.15).astype(np.float32))
    return list(fields)


class Trained(NamedTuple):
    modality: str
    values: list[np.ndarray]
    metrics: dict
    folder: object


@pytest.fixture(scope="module", params=map_modalities())
def trained(request, tmp_path_factory) -> Trained:
    modality = request.param
    folder = tmp_path_factory.mktemp(modality)
    values = synthetic(modality)
    metrics = train_vq(modality, values, CFG, SIDES[modality], folder, PARAMS[modality])
    return Trained(modality, values, metrics, folder)


def test_training_lowers_the_loss_and_writes_tokenizer_metrics_and_log(trained):
    metrics = trained.metrics
    assert metrics["steps"] == CFG.steps and metrics["samples"] == len(trained.values)
    assert metrics["loss_last"] < 0.8 * metrics["loss_first"]
    assert metrics["reconstruction"] is not None
    assert 0 < metrics["codebook_usage"] <= 1 and 1 <= metrics["perplexity"] <= CFG.codebook_size
    assert json.loads((trained.folder / "metrics.json").read_text()) == metrics
    assert {p.name for p in trained.folder.iterdir()} == {"config.json", "model.safetensors", "metrics.json", LOG_DIR}
    with open(trained.folder / LOG_DIR / "metrics.csv") as log:
        rows = [r for r in csv.DictReader(log) if r["train/loss"]]
    assert len(rows) == CFG.steps // 10 and {"train/usage", "train/perplexity"} <= set(rows[0])


def test_the_saved_tokenizer_is_the_evaluated_one(trained):
    tokenizer = VQTokenizer.load(trained.folder)
    assert not tokenizer.model.training
    evaluated = evaluate(tokenizer, trained.values)
    assert evaluated == {
        k: trained.metrics[k] for k in ("reconstruction_metric", "reconstruction", "codebook_usage", "perplexity")
    }


def test_ids_are_uint16_in_the_vocabulary_and_decode_to_valid_values(trained):
    tokenizer = VQTokenizer.load(trained.folder)
    assert (tokenizer.vocab_size, tokenizer.max_tokens, tokenizer.fixed_length) == (CFG.codebook_size, GRID**2, True)
    ids = tokenizer.encode(trained.values[:5])
    assert len(ids) == 5
    for sequence in ids:
        assert sequence.dtype == TOKEN_DTYPE and sequence.shape == (GRID**2,)
        tokenizer.check_ids(sequence, "test")
    decoded = tokenizer.decode(ids)
    for value in decoded:
        tokenizer.adapter.check(value)  # shape, dtype and range of a true value
    assert all(np.array_equal(a, b) for a, b in zip(tokenizer.reconstruct(trained.values[:5]), decoded, strict=True))


@pytest.mark.parametrize("modality", map_modalities())
def test_save_then_load_gives_identical_ids(modality, tmp_path):
    values = synthetic(modality, count=3)
    tokenizer = VQTokenizer(modality, CFG, SIDES[modality], PARAMS[modality])  # random init: unique weights
    tokenizer.save(tmp_path)
    loaded = VQTokenizer.load(tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(tokenizer.encode(values), loaded.encode(values), strict=True))
    assert loaded.adapter == tokenizer.adapter and loaded.cfg == CFG


def test_training_is_seeded(tmp_path):
    values = synthetic("clip")
    cfg = replace(CFG, steps=12)
    first = train_vq("clip", values, cfg, GRID, tmp_path / "a", PARAMS["clip"])
    assert train_vq("clip", values, cfg, GRID, tmp_path / "b", PARAMS["clip"]) == first
    other = train_vq("clip", values, replace(cfg, seed=1), GRID, tmp_path / "c", PARAMS["clip"])
    assert other["loss_first"] != first["loss_first"]


def test_decode_rejects_wrong_lengths_and_ids_outside_the_vocabulary():
    tokenizer = VQTokenizer("depth", CFG, SIZE)
    with pytest.raises(TokenizerInputError, match=rf"depth: expected {GRID**2} ids per value, got shape \(15,\)"):
        tokenizer.decode([np.zeros(GRID**2 - 1, TOKEN_DTYPE)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([np.full(GRID**2, CFG.codebook_size, TOKEN_DTYPE)])


def test_wrong_inputs_fail_before_any_work(tmp_path):
    tokenizer = VQTokenizer("semseg", CFG, SIZE, PARAMS["semseg"])
    with pytest.raises(TokenizerInputError, match=r"^semseg: expected int64 \(32, 32\)"):
        tokenizer.encode([np.zeros((SIZE, SIZE), np.int64), np.full((SIZE, SIZE), CLASSES)])
    with pytest.raises(TokenizerInputError, match=r"^normal: expected float32 \(3, 32, 32\)"):
        train_vq("normal", synthetic("depth", count=2), CFG, SIZE, tmp_path, {})
    with pytest.raises(UserError, match="no values"):
        train_vq("depth", [], CFG, SIZE, tmp_path, {})
    assert not any(tmp_path.iterdir())


def test_the_image_size_must_be_the_grid_times_a_power_of_two():
    with pytest.raises(UserError, match="24 is not the token grid 4 times a power of two"):
        VQTokenizer("rgb", CFG, 24)


def test_encoding_under_bf16_autocast_keeps_the_nearest_code_search_in_fp32(monkeypatch):
    """``run_on(..., "bf16")`` (what ``auto`` picks on a bf16 GPU) autocasts the encoder only: the
    quantizer receives fp32 encodings with autocast off, and the ids stay uint16 grids; ``auto`` on
    a CPU is plain fp32 and gives the very same ids as before."""
    torch.manual_seed(0)
    tokenizer = VQTokenizer("depth", CFG, SIZE)
    values = synthetic("depth", count=4)
    full = tokenizer.encode(values)
    tokenizer.run_on("cpu", "auto")
    assert tokenizer.autocast is None
    assert all(np.array_equal(a, b) for a, b in zip(full, tokenizer.encode(values), strict=True))
    tokenizer.run_on("cpu", "bf16")
    assert tokenizer.autocast == torch.bfloat16
    seen = []
    quantize = tokenizer.model.quantizer._quantize
    monkeypatch.setattr(
        tokenizer.model.quantizer,
        "_quantize",
        lambda e: seen.append((e.dtype, torch.is_autocast_enabled("cpu"))) or quantize(e),
    )
    mixed = tokenizer.encode(values)
    assert seen == [(torch.float32, False)]
    assert all(ids.dtype == TOKEN_DTYPE and ids.shape == (GRID * GRID,) for ids in mixed)
    agreement = np.mean([np.mean(a == b) for a, b in zip(full, mixed, strict=True)])
    assert agreement > 0.5  # bf16 encoder rounding moves only near ties to a neighbouring code
