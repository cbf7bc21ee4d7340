"""The encoder as an RGB backbone: the same features the full model's encoder computes from every
patch, timm's feature-extractor surface, and a run without pixels refused by name."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import save_model

from four_m.core.modalities import MODALITIES
from four_m.train.backbone import NoPixelInputError, load_backbone
from four_m.train.batch import MaskedBatch
from four_m.train.model import FourM, ModelModality
from tests.train.test_model import MODALITIES_4, TINY

pytestmark = pytest.mark.usefixtures("one_thread")

PIXELS = ModelModality.pixels_of(MODALITIES["rgb"])
RUN = (PIXELS, *MODALITIES_4)


def save_run(directory, modalities=RUN) -> FourM:
    torch.manual_seed(0)
    model = FourM(TINY, modalities).eval()
    directory.mkdir()
    save_model(model, str(directory / "model.safetensors"))
    described = {"model": asdict(TINY), "modalities": [asdict(m) for m in modalities], "tokenizers": {}}
    (directory / "model.json").write_text(json.dumps(described))
    return model


def every_patch(images: torch.Tensor, pixels: int) -> MaskedBatch:
    """A batch whose inputs are all of the images' patches, in order, and one dummy target."""
    B, G = len(images), PIXELS.grid**2
    inputs = {"input_ids": torch.zeros(B, G, dtype=torch.long), "input_modality": torch.full((B, G), pixels)}
    inputs |= {"input_position": torch.arange(G).expand(B, G), "input_mask": torch.ones(B, G, dtype=torch.bool)}
    one = torch.ones(B, 1, dtype=torch.long)
    targets = {"target_ids": 0 * one, "target_modality": one, "target_position": 0 * one, "decoder_input_ids": 0 * one}
    return MaskedBatch(**inputs, **targets, target_mask=one.bool(), pixels={PIXELS.name: images})


def test_the_backbone_computes_what_the_models_encoder_computes_from_every_patch(tmp_path):
    model = save_run(tmp_path / "run")
    backbone = load_backbone(tmp_path / "run")
    images = torch.randint(0, 256, (2, PIXELS.image_size, PIXELS.image_size, 3), dtype=torch.uint8)
    normed = []
    model.encoder_norm.register_forward_hook(lambda module, args, out: normed.append(out))
    with torch.no_grad():
        model.encode(every_patch(images, model.modality_index(PIXELS.name)))
        features = backbone.forward_features(images.permute(0, 3, 1, 2).float() / 255)
    assert features.shape == (2, PIXELS.grid**2, TINY.dim) and backbone.num_features == TINY.dim
    torch.testing.assert_close(features, normed[0][:, 1:], rtol=1e-4, atol=1e-5)  # the context token dropped
    pooled = backbone(images.permute(0, 3, 1, 2).float() / 255)
    torch.testing.assert_close(pooled, features.mean(dim=1))
    dense = backbone.dense(images.permute(0, 3, 1, 2).float() / 255)
    assert dense.shape == (2, TINY.dim, PIXELS.grid, PIXELS.grid)
    torch.testing.assert_close(dense[:, :, 0, 1], features[:, 1])  # row-major: patch 1 is row 0, column 1
    assert not any(name.startswith(("decoder", "heads", "token_embeddings")) for name, _ in backbone.named_parameters())


def test_the_backbone_trains_from_plain_pytorch_and_refuses_wrong_sizes(tmp_path):
    save_run(tmp_path / "run")
    backbone = load_backbone(tmp_path / "run").train()
    images = torch.rand(2, 3, PIXELS.image_size, PIXELS.image_size)
    backbone(images).sum().backward()
    assert backbone.encoder[0].attention.query.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"expected \(B, 3, 224, 224\) images"):
        backbone(torch.rand(2, 3, 64, 64))


def test_a_run_without_pixels_has_no_backbone(tmp_path):
    save_run(tmp_path / "tokens-only", MODALITIES_4)
    with pytest.raises(NoPixelInputError, match="trained without a pixel input"):
        load_backbone(tmp_path / "tokens-only")
