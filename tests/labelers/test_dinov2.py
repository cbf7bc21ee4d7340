import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import Dinov2Config, Dinov2Model
from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from four_m.core.config import LabelerConfig
from four_m.labelers.dinov2 import CHECKPOINT_SIZE, PRODUCTION_DINOV2, TINY_DINOV2, Dinov2Labeler
from four_m.tokenize.maps import ADAPTERS, configured

INPUT, VIEW, GRID = 224, 32, 16  # 4M-21's DINOv2-B/14 map at 224 px: 16 x 16 patches
DIM = TINY_DINOV2["hidden_size"]


def _reference(labeler: Dinov2Labeler, pixels: np.ndarray) -> np.ndarray:
    """Patch tokens in float32, from the model's parts: normalised by hand with ImageNet's mean and
    std, through the encoder, then the final layer norm, CLS dropped."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    values = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    model = labeler.model
    with torch.inference_mode():
        tokens = model.encoder(model.embeddings(values)).last_hidden_state  # (B, 1 + N, dim)
        features = model.layernorm(tokens)[:, 1:]
    return features.flatten(1).numpy()


def test_features_are_the_layer_normed_patch_tokens(built):
    labeler, production, pixels, payloads = built(Dinov2Labeler, INPUT, VIEW)
    assert labeler.random_init and not production.random_init
    assert labeler.schema().field("dinov2").type == pa.list_(pa.float16(), GRID * GRID * DIM)
    assert labeler.provenance()["feature_shape"] == f"{GRID}x{GRID}x{DIM}"
    rows = np.stack([payload["dinov2"] for payload in payloads])
    assert rows.dtype == np.float16 and rows.shape == (len(pixels), GRID * GRID * DIM)
    assert np.isfinite(rows).all()
    np.testing.assert_allclose(rows.astype(np.float32), _reference(production, pixels), rtol=2e-3, atol=2e-3)
    assert not np.array_equal(rows[0], rows[3])  # the features depend on the image


def test_the_grid_follows_the_input_size(built):
    folder = built(Dinov2Labeler, INPUT, VIEW).random_init.workdir
    for size, grid in [(112, 8), (160, 11)]:  # 160 px: the last 6 px of each side fall outside the 11 patches
        labeler = Dinov2Labeler(LabelerConfig(model=str(folder), input_size=size), VIEW, None)
        labeler.setup()
        pixels = np.random.default_rng(1).integers(0, 256, size=(2, size, size, 3), dtype=np.uint8)
        payloads = labeler.label(pixels)
        pa.Table.from_pylist(payloads, schema=labeler.schema())
        assert labeler.provenance()["feature_shape"] == f"{grid}x{grid}x{DIM}"
        assert all(p["dinov2"].shape == (grid * grid * DIM,) and np.isfinite(p["dinov2"]).all() for p in payloads)


def test_the_tiny_variant_is_rebuilt_identically(tmp_path, batch):
    pixels = batch(INPUT)
    payloads = []
    for folder in ("a", "b"):
        labeler = Dinov2Labeler(LabelerConfig(model=None, input_size=INPUT), VIEW, tmp_path / folder)
        labeler.setup()
        payloads.append(np.stack([p["dinov2"] for p in labeler.label(pixels)]))
    np.testing.assert_array_equal(*payloads)


def test_labels_read_back_as_the_feature_maps_tokenizer_input(built):
    labeler, _, _, payloads = built(Dinov2Labeler, INPUT, VIEW)
    metadata = {f"four_m.{k}": v for k, v in labeler.provenance().items()}
    table = pa.Table.from_pylist(
        [{**p, "error": None} for p in payloads], schema=labeler.schema().append(pa.field("error", pa.string()))
    ).replace_schema_metadata(metadata)
    reader = configured("dinov2", GRID, ADAPTERS["dinov2"].params_of(table.schema))
    values, errors = reader.read(table)
    assert errors == [None] * len(payloads)
    reader.check(values[0])  # float32 (dim, 16, 16)
    first = payloads[0]["dinov2"].reshape(GRID, GRID, DIM)  # row-major (patch row, patch column, channel)
    np.testing.assert_array_equal(values[0], first.transpose(2, 0, 1).astype(np.float32))


def test_the_production_config_is_dinov2_base():
    with torch.device("meta"):  # shapes only: no 350 MB of random weights
        model = Dinov2Model(Dinov2Config(**PRODUCTION_DINOV2, image_size=CHECKPOINT_SIZE))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(86.6e6, rel=0.01)  # published count
    assert model.embeddings.position_embeddings.shape[1] == 1 + 37 * 37


def test_missing_weights_name_the_path(missing_weights):
    missing_weights(Dinov2Labeler)
