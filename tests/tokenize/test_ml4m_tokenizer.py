"""ml-4m's ViT VQ-VAE tokenizers imported (synthetic checkpoints with its key names and shapes):
every key used or refused by name, this project's values converted to what ml-4m's tokenizer takes
and back, cosine-similarity lookup, and a mismatch with the modality's labels named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from four_m.core.coco import SEMSEG_IGNORE
from four_m.tokenize.base import TokenizerInputError
from four_m.tokenize.maps import configured
from four_m.tokenize.ml4m_tokenizer import ML4MTokenizer, is_imported
from four_m.tokenize.ml4m_vqvae import ML4MTokenizerError, load_ml4m_vqvae
from tests.tokenize import ml4m_tokenizer_checkpoint as checkpoint

SIDE = 64  # a 4x4 token grid of 16 px patches


@pytest.fixture
def semseg(tmp_path) -> ML4MTokenizer:
    folder = checkpoint.write(tmp_path / "semseg", checkpoint.weights())
    return ML4MTokenizer.from_source("semseg", folder, configured("semseg", SIDE, {"classes": 133}))


def test_semseg_ids_round_trip_through_mlm4s_shifted_labels(semseg, tmp_path):
    rng = np.random.default_rng(0)
    values = [rng.integers(0, 133, (SIDE, SIDE)).astype(np.int64) for _ in range(3)]
    values[0][:8] = SEMSEG_IGNORE  # "no class" is label 0 to ml-4m
    ids = semseg.encode(values)
    assert [i.shape for i in ids] == [(16,)] * 3 and all(i.dtype == np.uint16 and i.max() < 32 for i in ids)
    shifted = torch.from_numpy(np.where(values[0] == SEMSEG_IGNORE, 0, values[0] + 1))[None]
    assert np.array_equal(ids[0], semseg.network.tokenize(shifted).flatten().numpy())
    decoded = semseg.decode(ids)
    assert decoded[0].shape == (SIDE, SIDE) and decoded[0].dtype == np.int64
    assert set(np.unique(np.concatenate([d.ravel() for d in decoded]))) <= set(range(133)) | {SEMSEG_IGNORE}
    semseg.save(tmp_path / "saved")
    assert is_imported(tmp_path / "saved")
    reloaded = ML4MTokenizer.load(tmp_path / "saved")
    assert all(np.array_equal(a, b) for a, b in zip(reloaded.encode(values), ids, strict=True))


def test_lookup_is_by_cosine_similarity_so_a_codes_length_does_not_matter():
    state = checkpoint.weights(labels=None, channels=12, patch=1, grid=4)
    features = torch.randn(2, 12, 4, 4)
    before = load_ml4m_vqvae({}, state).tokenize(features)
    state["quantize._codebook.embed"] = state["quantize._codebook.embed"] * torch.linspace(0.1, 9.0, 32)[:, None]
    assert torch.equal(load_ml4m_vqvae({}, state).tokenize(features), before)


def test_a_feature_tokenizer_reads_feature_maps_of_its_own_width(tmp_path):
    folder = checkpoint.write(tmp_path / "clip", checkpoint.weights(labels=None, channels=12, patch=1, grid=4))
    clip = ML4MTokenizer.from_source("clip", folder, configured("clip", 4, {"dim": 12}))
    values = [np.random.default_rng(1).normal(size=(12, 4, 4)).astype(np.float32)]
    (ids,) = clip.encode(values)
    assert ids.shape == (16,) and clip.decode([ids])[0].shape == (12, 4, 4)
    with pytest.raises(TokenizerInputError, match="takes 12-wide features, this modality's labels are 16 wide"):
        ML4MTokenizer.from_source("clip", folder, configured("clip", 4, {"dim": 16}))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"add": "decoder.out_conv.0.weight"}, "decoder.out_conv: the ConvNeXt output blocks"),
        ({"add": "encoder.blocks.0.attn.q_norm.weight"}, "checkpoint key encoder.blocks.0.attn.q_norm.weight has no"),
        ({"drop": "encoder.blocks.0.mlp.fc2.bias"}, "nothing in the checkpoint fills encoder.blocks.0.fc2.bias"),
        ({"drop": "quant_proj.weight"}, "checkpoint lacks quant_proj.weight"),
        ({"config": {"num_codebooks": 2}}, "only one cosine-similarity codebook"),
    ],
)
def test_a_checkpoint_this_network_cannot_reproduce_is_refused_by_name(change, message):
    state = checkpoint.weights()
    if "add" in change:
        state[change["add"]] = torch.zeros(4)
    if "drop" in change:
        del state[change["drop"]]
    with pytest.raises(ML4MTokenizerError, match=message):
        load_ml4m_vqvae(change.get("config", {}), state)


def test_a_tokenizer_for_other_classes_or_another_kind_is_refused(tmp_path):
    folder = checkpoint.write(tmp_path / "semseg", checkpoint.weights())
    with pytest.raises(TokenizerInputError, match="has 134 labels, this modality 10 classes"):
        ML4MTokenizer.from_source("semseg", folder, configured("semseg", SIDE, {"classes": 10}))
    with pytest.raises(TokenizerInputError, match="depth: no faithful conversion of this project's continuous_map"):
        ML4MTokenizer.from_source("depth", folder, configured("depth", SIDE, {}))


def test_a_diffusion_decoder_tokenizer_imports_to_encode_only(tmp_path):
    """ml-4m's RGB tokenizer (DiVAE): the same encoder and codebook, a diffusion UNet as decoder."""
    state = checkpoint.divae_weights()
    rgb = ML4MTokenizer.from_source("rgb", checkpoint.write(tmp_path / "rgb", state), configured("rgb", SIDE, {}))
    value = np.random.default_rng(2).random((3, SIDE, SIDE)).astype(np.float32)  # this project's [0, 1]
    (ids,) = rgb.encode([value])
    scaled = torch.from_numpy(value)[None] * 2 - 1  # ml-4m's RGB tokenizers take [-1, 1]
    assert np.array_equal(ids, rgb.network.tokenize(scaled).flatten().numpy())
    assert not rgb.decodes
    with pytest.raises(TokenizerInputError, match="imported to encode only"):
        rgb.decode([ids])
