"""CLIP feature-map pseudo-labels: projected patch tokens, (grid * grid * dim) float16 per image.

4M's CLIP modality is the dense feature map of CLIP-B/16, not its pooled embedding: every patch
token of the last layer, put through the same final layer norm and projection as the CLS token, so
each patch lives in the joint image-text space. At 224 px and patch 16 that is 14 x 14 x 512,
stored row-major (patch row, patch column, channel) and in float16, which halves the bytes and is
the precision the features are later tokenised from anyway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from four_m.labelers.features import FeatureMapLabeler
from four_m.labelers.hf import load_model, normalisation, normalised

TINY_CLIP: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "patch_size": 16,
    # The production projection width, so tiny and production share one schema.
    "projection_dim": 512,
}


PRODUCTION_CLIP: dict[str, Any] = {
    # openai/clip-vit-base-patch16's vision tower and projection.
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "patch_size": 16,
    "projection_dim": 512,
}


class ClipLabeler(FeatureMapLabeler):
    """Patch-token features of ``CLIPVisionModelWithProjection`` (production: CLIP-B/16)."""

    name = "clip"

    def vision_config(self) -> CLIPVisionConfig:
        """The vision tower's config; from a full CLIP checkpoint this reads its ``vision_config``."""
        return CLIPVisionConfig.from_pretrained(self.source, revision=self.cfg.revision)

    def patch_and_dim(self) -> tuple[int, int]:
        config = self.vision_config()
        return config.patch_size, config.projection_dim

    def build_tiny(self, directory: Path) -> None:
        self._build(directory, TINY_CLIP)

    def build_production(self, directory: Path) -> None:
        self._build(directory, PRODUCTION_CLIP)

    def _build(self, directory: Path, sizes: dict[str, Any]) -> None:
        size = self.cfg.input_size
        config = CLIPVisionConfig(**sizes, image_size=size)
        CLIPVisionModelWithProjection(config).save_pretrained(directory)
        processor = CLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
        )
        processor.save_pretrained(directory)

    def load(self, source: str, revision: str | None) -> None:
        self.model = load_model(CLIPVisionModelWithProjection, source, revision, self.device)
        self.mean, self.std = normalisation(source, revision)

    @torch.inference_mode()
    def label(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        vision = self.model.vision_model
        # At the checkpoint's own size transformers returns the stored position embeddings
        # unchanged; at any other input_size it interpolates them to the new grid.
        hidden = vision(
            pixel_values=normalised(pixels, self.mean, self.std, self.device), interpolate_pos_encoding=True
        ).last_hidden_state  # (B, 1 + N, hidden)
        patches = vision.post_layernorm(hidden[:, 1:])  # drop CLS: (B, N, hidden)
        features = self.model.visual_projection(patches)  # (B, N, dim)
        flat = features.to(torch.float16).flatten(1).cpu().numpy()  # (B, N * dim)
        return self.payloads(flat)
