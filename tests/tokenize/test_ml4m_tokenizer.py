"""ml-4m's ViT VQ-VAE tokenizers imported (synthetic checkpoints with its key names and shapes):
every key used or refused by name, this project's values converted to what ml-4m's tokenizer takes
and back, cosine-similarity lookup, and a mismatch with the modality's labels named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from four_m.core.coco import NO_CLASS
from four_m.tokenize.base import ML4MTokenizerError, TokenizerInputError
from four_m.tokenize.maps import configured
from four_m.tokenize.ml4m_tokenizer import ML4MTokenizer, is_imported
from four_m.tokenize.ml4m_vqvae import load_ml4m_vqvae
from tests.tokenize import ml4m_tokenizer_checkpoint as checkpoint

SIDE = 64  # a 4x4 token grid of 16 px patches


@pytest.fixture
def semseg(tmp_path) -> ML4MTokenizer:
    folder = checkpoint.write(tmp_path / "semseg", checkpoint.weights())
    return ML4MTokenizer.from_source("semseg", folder, configured("semseg", SIDE, {"classes": 133}))


def test_semseg_ids_round_trip_through_mlm4s_shifted_labels(semseg, tmp_path):
    rng = np.random.default_rng(0)
    values = [rng.integers(0, 133, (SIDE, SIDE)).astype(np.int64) for _ in range(3)]
    values[0][:8] = NO_CLASS  # "no class" is label 0 to ml-4m
    ids = semseg.encode(values)
    assert [i.shape for i in ids] == [(16,)] * 3 and all(i.dtype == np.uint16 and i.max() < 32 for i in ids)
    shifted = torch.from_numpy(np.where(values[0] == NO_CLASS, 0, values[0] + 1))[None]
    assert np.array_equal(ids[0], semseg.network.tokenize(shifted).flatten().numpy())
    decoded = semseg.decode(ids)
    assert decoded[0].shape == (SIDE, SIDE) and decoded[0].dtype == np.int64
    assert set(np.unique(np.concatenate([d.ravel() for d in decoded]))) <= set(range(133)) | {NO_CLASS}
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
        ({"drop": "post_quant_proj.weight"}, "checkpoint lacks post_quant_proj.weight and decoder.time_embed"),
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


def test_a_tokenizer_for_other_classes_is_refused(tmp_path):
    folder = checkpoint.write(tmp_path / "semseg", checkpoint.weights())
    with pytest.raises(TokenizerInputError, match="has 134 labels, this modality 10 classes"):
        ML4MTokenizer.from_source("semseg", folder, configured("semseg", SIDE, {"classes": 10}))


@pytest.fixture
def depth_tokenizer(tmp_path) -> Path:
    return checkpoint.write(tmp_path / "depth", checkpoint.divae_weights(channels=1), **checkpoint.DIVAE_CONFIG)


def test_depth_labels_convert_by_ml4ms_truncated_z_score_only_when_they_are_depth(depth_tokenizer):
    with pytest.raises(TokenizerInputError, match="takes depth .* these labels are inverse_depth .* OMNIDATA_DEPTH"):
        ML4MTokenizer.from_source("depth", depth_tokenizer, configured("depth", SIDE, {}))
    depth = ML4MTokenizer.from_source("depth", depth_tokenizer, configured("depth", SIDE, {"quantity": "depth"}))
    far = np.random.default_rng(5).gamma(2.0, 3.0, (1, SIDE, SIDE))  # some scene's depth, in metres
    value = ((far - far.min()) / (far.max() - far.min())).astype(np.float32)  # as the labeler stores it
    (ids,) = depth.encode([value])
    kept = np.sort(far.ravel())[int(0.1 * far.size) : int(0.9 * far.size)]  # ml-4m: trim 10 % each end
    standardised = (far - kept.mean()) / np.sqrt(kept.var(ddof=1) + 1e-6)  # of the raw depth itself
    expected = depth.network.tokenize(torch.from_numpy(standardised).float()[None])
    assert np.array_equal(ids, expected.flatten().numpy())
    (decoded,) = depth.decode([ids])
    assert decoded.shape == (1, SIDE, SIDE) and decoded.min() == 0 and decoded.max() == 1


@pytest.fixture
def rgb(tmp_path) -> ML4MTokenizer:
    """ml-4m's RGB tokenizer (DiVAE): the same encoder and codebook, a diffusion UNet as decoder."""
    folder = checkpoint.write(tmp_path / "rgb", checkpoint.divae_weights(), **checkpoint.DIVAE_CONFIG)
    return ML4MTokenizer.from_source("rgb", folder, configured("rgb", SIDE, {}))


def test_a_diffusion_decoder_tokenizer_encodes_ml4m_scaled_pixels_and_decodes_reproducibly(rgb):
    values = [np.random.default_rng(seed).random((3, SIDE, SIDE)).astype(np.float32) for seed in (2, 3)]
    ids = rgb.encode(values)  # this project's [0, 1]
    scaled = torch.from_numpy(values[0])[None] * 2 - 1  # ml-4m's RGB tokenizers take [-1, 1]
    assert np.array_equal(ids[0], rgb.network.tokenize(scaled).flatten().numpy())
    decoded = rgb.decode(ids)
    assert [(d.shape, d.dtype) for d in decoded] == [((3, SIDE, SIDE), np.float32)] * 2
    assert all(0 <= d.min() and d.max() <= 1 for d in decoded) and np.ptp(decoded[0]) > 0.1
    alone = rgb.decode(ids[1:])  # an image decodes from its own seeded noise, whatever its batch
    np.testing.assert_allclose(alone[0], decoded[1], atol=1e-4)
    noise = rgb.network.diffusion.sample(lambda x, t: x, (3, SIDE, SIDE), [torch.Generator().manual_seed(0)], 1)
    assert not np.allclose(decoded[1], ((noise[0] + 1) / 2).clamp(0, 1).numpy(), atol=1e-2)  # the UNet acted


@pytest.mark.parametrize(("modality", "channels", "low"), [("normal", 3, -1.0), ("canny_edge", 1, 0.0)])
def test_normals_and_edges_decode_to_this_projects_values(tmp_path, modality, channels, low):
    state = checkpoint.divae_weights(channels=channels)
    folder = checkpoint.write(tmp_path / modality, state, **checkpoint.DIVAE_CONFIG)
    tokenizer = ML4MTokenizer.from_source(modality, folder, configured(modality, SIDE, {}))
    value = np.random.default_rng(4).uniform(low, 1, (channels, SIDE, SIDE)).astype(np.float32)
    (decoded,) = tokenizer.decode(tokenizer.encode([value]))
    assert decoded.shape == (channels, SIDE, SIDE) and low <= decoded.min() and decoded.max() <= 1
    if modality == "canny_edge":  # this project's edge maps are binary
        assert set(np.unique(decoded)) <= {0.0, 1.0}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"config": {"dec_type": "uvit_b"}}, "dec_type = 'uvit_b': of the diffusion decoders only unet_patched"),
        ({"widen": "decoder.input_blocks.1.0.emb_layers.1.weight"}, "scale-shift \\(FiLM\\) embedding"),
        ({"widen": "decoder.input_blocks.0.0.weight"}, "conditioned on 9 channels, the codebook's vectors are 8"),
        ({"add": "decoder.input_blocks.1.1.proj.weight"}, "decoder.input_blocks.1.1: not a layer of ml-4m's UNet"),
    ],
)
def test_a_diffusion_decoder_this_network_cannot_reproduce_is_refused_by_name(change, message):
    state = checkpoint.divae_weights()
    if "widen" in change:
        weight = state[change["widen"]]  # one more input channel, or one more output of the embedding
        extra = weight[:, :1] if "input_blocks.0.0" in change["widen"] else weight[:1]
        state[change["widen"]] = torch.cat([weight, extra], dim=1 if "input_blocks.0.0" in change["widen"] else 0)
    if "add" in change:
        state[change["add"]] = torch.zeros(4)
    with pytest.raises(ML4MTokenizerError, match=message):
        load_ml4m_vqvae(checkpoint.DIVAE_CONFIG | change.get("config", {}), state)


def test_encoding_under_bf16_autocast_runs_the_encoder_low_and_the_code_lookup_in_fp32(semseg):
    """``run_on`` as the tokenize stage calls it: ``auto`` on a CPU is fp32 (the same ids); ``bf16``
    autocasts the ViT encoder, and the ids are the fp32 cosine lookup of its latent."""
    values = [np.random.default_rng(seed).integers(0, 133, (SIDE, SIDE)).astype(np.int64) for seed in range(4)]
    full = semseg.encode(values)
    semseg.run_on("cpu", "auto")
    assert semseg.autocast is None and semseg.device.type == "cpu"
    assert all(np.array_equal(a, b) for a, b in zip(full, semseg.encode(values), strict=True))
    semseg.run_on("cpu", "bf16")
    assert semseg.autocast == torch.bfloat16
    mixed = semseg.encode(values)
    network, inputs = semseg.network, semseg.conversion.to_input(np.stack(values))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = network.encoder(network.proj(network.cls_emb(inputs).permute(0, 3, 1, 2)))  # (B, 16, D)
        latent = network.quant_proj(tokens.transpose(1, 2).unflatten(2, (4, 4)))
    flat = torch.nn.functional.normalize(latent.float().flatten(2).transpose(1, 2), dim=-1)
    expected = (flat @ torch.nn.functional.normalize(network.codebook, dim=-1).T).argmax(dim=-1)  # fp32 lookup
    assert np.array_equal(np.stack(mixed), expected.numpy())
