"""DINOv2 feature-map pseudo-labels: layer-normed patch tokens, (grid * grid * dim) float16 per image.

4M-21's DINOv2 modality is the dense feature map of DINOv2-B/14: every patch token of the last layer
after the model's final layer norm (the features DINOv2's own dense probes read), the CLS token
dropped. At 224 px and patch 14 that is 16 x 16 x 768, stored as the ``clip`` labels are:
row-major (patch row, patch column, channel), float16, shape in ``four_m.feature_shape``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import BitImageProcessor, Dinov2Config, Dinov2Model
from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from four_m.labelers.features import FeatureMapLabeler
from four_m.labelers.hf import load_model, normalisation, normalised

CHECKPOINT_SIZE = 518
"""facebook/dinov2-base's ``image_size``: position embeddings for a 37 x 37 grid. The tiny variant
keeps it, so that at 224 px both run the same interpolation to 16 x 16."""

TINY_DINOV2: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "mlp_ratio": 4,
    "patch_size": 14,
}

PRODUCTION_DINOV2: dict[str, Any] = {
    # facebook/dinov2-base: ViT-B/14 with layer scale, GELU MLP (no SwiGLU), no register tokens.
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "mlp_ratio": 4,
    "patch_size": 14,
    "layerscale_value": 1.0,
    "use_swiglu_ffn": False,
}


class Dinov2Labeler(FeatureMapLabeler):
    """Patch-token features of ``Dinov2Model`` (production: DINOv2-B/14, ``facebook/dinov2-base``)."""

    name = "dinov2"

    def patch_and_dim(self) -> tuple[int, int]:
        config = Dinov2Config.from_pretrained(self.source, revision=self.cfg.revision)
        return config.patch_size, config.hidden_size

    def build_tiny(self, directory: Path) -> None:
        self._build(directory, TINY_DINOV2)

    def build_production(self, directory: Path) -> None:
        self._build(directory, PRODUCTION_DINOV2)

    def _build(self, directory: Path, sizes: dict[str, Any]) -> None:
        Dinov2Model(Dinov2Config(**sizes, image_size=CHECKPOINT_SIZE)).save_pretrained(directory)
        # DINOv2's own processor class and ImageNet statistics; only the mean and std are read back.
        size = self.cfg.input_size
        processor = BitImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=IMAGENET_DEFAULT_MEAN,
            image_std=IMAGENET_DEFAULT_STD,
        )
        processor.save_pretrained(directory)

    def load(self, source: str, revision: str | None) -> None:
        self.model = load_model(Dinov2Model, source, revision, self.device)
        self.mean, self.std = normalisation(source, revision)

    @torch.inference_mode()
    def label(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        # Unlike CLIP's, DINOv2's embeddings always interpolate the stored position embeddings to the
        # input's grid (bicubic, in float32); transformers has no switch for it to pass.
        hidden = self.model(
            pixel_values=normalised(pixels, self.mean, self.std, self.device)
        ).last_hidden_state  # (B, 1 + registers + N, dim), already through the final layer norm
        prefix = 1 + getattr(self.model.config, "num_register_tokens", 0)  # CLS, then any registers
        flat = hidden[:, prefix:].to(torch.float16).flatten(1).cpu().numpy()  # (B, N * dim)
        return self.payloads(flat)
