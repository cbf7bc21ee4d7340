"""A trained run's encoder as a plain RGB ViT backbone (4M's ``FourMViT``), for transfer.

4M's encoder reads any modality; as a backbone it reads one, the image's pixel input
(``rgb_pixels``: 16 px patches of a 224 px image, the run's own mean and std). What it keeps of
the run: that input's patch embedding and modality embedding, the fixed 2D sin-cos positions, the
context token (the encoder was trained with it, so it stays, and is dropped from the output), the
encoder blocks and the encoder norm. The decoder, token tables and heads are left behind.

Usable from plain PyTorch and as a ``timm``-style feature extractor::

    backbone = load_backbone("data/default/runs/tiny")
    features = backbone.forward_features(images)  # (B, 196, D): images (B, 3, 224, 224) in [0, 1]
    pooled = backbone(images)                      # (B, D): the mean of the patch features
    backbone.num_features, backbone.grid           # D, 14

Images are float RGB in [0, 1] (``torchvision.transforms.ToTensor``'s), not standardised: the
backbone standardises them as the run did.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from four_m.core.errors import UserError
from four_m.core.runs import DESCRIPTION
from four_m.core.storage import RootPath, location
from four_m.train.model import FourM, patchify
from four_m.train.trained import load_weights, read_description


class NoPixelInputError(UserError):
    """The run never saw pixels, so its encoder has no way in for an image."""


class FourMBackbone(nn.Module):
    """``model``'s encoder over its pixel input ``pixels`` alone."""

    def __init__(self, model: FourM, pixels: str):
        super().__init__()
        index = model.modality_index(pixels)
        spec = model.modalities[index]
        self.pixel_input = pixels
        self.patch_size, self.grid = spec.patch_size, spec.grid
        self.image_size = spec.image_size
        self.num_features = model.config.dim
        self.patch_embedding = model.patch_embeddings[pixels]
        self.context_token = model.context_token if model.config.context_token else None
        self.encoder = model.encoder
        self.encoder_norm = model.encoder_norm
        self.register_buffer("mean", getattr(model, f"_mean_{pixels}").detach().clone())
        self.register_buffer("std", getattr(model, f"_std_{pixels}").detach().clone())
        with torch.no_grad():
            patches = torch.arange(self.grid**2)[None]  # (1, G)
            modality = torch.full_like(patches, index)
            # What the encoder adds to every patch: its modality and its position (1, G, D).
            labels = model.input_modality_embedding(modality) + model.embed_positions(modality, patches)
        self.register_buffer("labels", labels.detach().clone())

    def forward_features(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) RGB in [0, 1] -> (B, G*G, D) patch features, row-major, after the encoder norm."""
        B, channels, height, width = images.shape
        if channels != 3 or height != self.image_size or width != self.image_size:
            raise ValueError(f"expected (B, 3, {self.image_size}, {self.image_size}) images, got {tuple(images.shape)}")
        x = (images.permute(0, 2, 3, 1) - self.mean) / self.std  # (B, S, S, 3)
        x = self.patch_embedding(patchify(x, self.patch_size).to(self.labels.dtype)) + self.labels  # (B, G, D)
        lead = 0 if self.context_token is None else 1
        if lead:
            x = torch.cat([self.context_token.expand(B, 1, -1).to(x.dtype), x], dim=1)  # (B, 1 + G, D)
        allowed = x.new_ones(B, 1, x.shape[1], dtype=torch.bool)  # every token sees every token
        for block in self.encoder:
            x = block(x, allowed)
        return self.encoder_norm(x)[:, lead:]  # the context token dropped

    def forward_head(self, features: Tensor, pre_logits: bool = True) -> Tensor:
        """(B, G*G, D) -> (B, D): the mean over patches (there is no classifier: ``pre_logits`` only)."""
        return features.mean(dim=1)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(images))

    def dense(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, D, G, G): the patch features as a feature map, for dense heads."""
        features = self.forward_features(images)
        return features.transpose(1, 2).reshape(len(images), self.num_features, self.grid, self.grid)


def load_backbone(run: str | Path | RootPath) -> FourMBackbone:
    """The encoder of the finished run in folder ``run`` (``model.json`` + ``model.safetensors``)."""
    directory = location(run)
    described, weights = directory / DESCRIPTION, directory / "model.safetensors"
    if not (described.is_file() and weights.is_file()):
        raise UserError(f"no trained model in {directory} (model.json + model.safetensors): run `make train`")
    description = read_description(described)
    modalities = description.modalities
    pixels = [m.name for m in modalities if m.layout == "pixels"]
    if not pixels:
        raise NoPixelInputError(
            f"run {directory.name} was trained without a pixel input (train.modalities lacks rgb_pixels):"
            " its encoder cannot read an image; train one with rgb_pixels"
        )
    model = FourM(description.model, modalities)
    load_weights(model, weights, directory.name)
    return FourMBackbone(model, pixels[0]).eval()
