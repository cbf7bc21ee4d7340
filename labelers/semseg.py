"""Semantic segmentation pseudo-labels: Mask2Former's COCO panoptic classes, one 8-bit PNG per image.

Production weights are ``facebook/mask2former-swin-base-coco-panoptic`` (133 classes: 80 things and
53 stuff). The map is Mask2Former's standard semantic inference: each query's class distribution
(softmax, the trailing "no object" class dropped) weights its sigmoid mask,

    scores[b, c, h, w] = sum_q softmax(class_logits)[b, q, c] * sigmoid(mask_logits)[b, q, h, w]

and every pixel takes the class of highest score. Mask logits come out at a quarter of the input
size and are upsampled to the label view first, as the reference implementation does. Pixel values
are class ids in the checkpoint's own ``id2label`` order (stored in the files' metadata as
``classes``); 255 (``NO_CLASS``) is reserved for "no class" and never a class id.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from transformers import (
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerImageProcessor,
    SwinConfig,
)

from four_m.core.coco import COCO_PANOPTIC, NO_CLASS
from four_m.core.errors import UserError
from four_m.core.label_codec import encode_png
from four_m.labelers.hf import load_model, normalisation, normalised
from four_m.labelers.pretrained import PretrainedLabeler
from four_m.labelers.resize import resize_maps

TINY_SWIN: dict[str, Any] = {
    "embed_dim": 16,
    "depths": [1, 1, 1, 1],
    "num_heads": [1, 2, 2, 4],
    # Production uses 12 (for 384 px inputs); 4 keeps the tiny windows meaningful at 64 px.
    "window_size": 4,
    "drop_path_rate": 0.0,
    "out_features": ["stage1", "stage2", "stage3", "stage4"],
}
"""A four-stage Swin (strides 4..32, as the pixel decoder expects), one block per stage."""

TINY_MASK2FORMER: dict[str, Any] = {
    "feature_size": 32,
    "mask_feature_size": 32,
    "hidden_dim": 32,
    "encoder_feedforward_dim": 64,
    "encoder_layers": 1,
    "decoder_layers": 2,
    "num_attention_heads": 2,
    "dim_feedforward": 64,
    "num_queries": 16,
    # Wider than the production 0.02 (which suits training): with it one class wins every pixel of
    # every image, and a random model whose maps ignore the image would hide wiring mistakes.
    "init_std": 1.0,
    # No hub download of backbone weights: the whole model is random-init anyway.
    "use_pretrained_backbone": False,
}
"""About 0.36 M parameters; the production model (Swin-B, 100 queries) is ~300x that."""
PRODUCTION_SWIN: dict[str, Any] = {
    # facebook/mask2former-swin-base-coco-panoptic: Swin-B (ImageNet-22k) at 384 px.
    "embed_dim": 128,
    "depths": [2, 2, 18, 2],
    "num_heads": [4, 8, 16, 32],
    "window_size": 12,
    "drop_path_rate": 0.3,
    "out_features": ["stage1", "stage2", "stage3", "stage4"],
}
PRODUCTION_MASK2FORMER: dict[str, Any] = {"num_queries": 100, "use_pretrained_backbone": False}
"""transformers' defaults are Mask2Former's (256-wide, 6 encoder and 10 decoder layers); 100 queries."""

PIXELS_PER_CHUNK = 4096
"""Pixels scored at once: 4096 x 133 float32 scores (2 MiB) stay in a CPU's cache."""


class SemsegLabeler(PretrainedLabeler):
    """Per-pixel COCO panoptic class ids from ``Mask2FormerForUniversalSegmentation``."""

    name = "semseg"

    def schema(self) -> pa.Schema:
        return pa.schema([pa.field("semseg", pa.binary())])

    def provenance(self) -> dict[str, str]:
        return {**super().provenance(), "classes": json.dumps(self.classes)}

    @cached_property
    def classes(self) -> list[str]:
        """Class names by id, from the checkpoint's config: the driver reads them without weights."""
        config = Mask2FormerConfig.from_pretrained(self.source, revision=self.cfg.revision)
        return _class_names(config, self.name)

    def build_tiny(self, directory: Path) -> None:
        self._build(directory, TINY_SWIN, TINY_MASK2FORMER)

    def build_production(self, directory: Path) -> None:
        self._build(directory, PRODUCTION_SWIN, PRODUCTION_MASK2FORMER)

    def _build(self, directory: Path, swin: dict[str, Any], mask2former: dict[str, Any]) -> None:
        size = self.cfg.input_size
        backbone = SwinConfig(image_size=size, **swin)
        config = Mask2FormerConfig(
            backbone_config=backbone,
            **mask2former,
            num_labels=len(COCO_PANOPTIC),
            id2label=dict(enumerate(COCO_PANOPTIC)),
            label2id={name: index for index, name in enumerate(COCO_PANOPTIC)},
        )
        Mask2FormerForUniversalSegmentation(config).save_pretrained(directory)
        # ImageNet mean/std, as the production processor; the stage has already resized.
        Mask2FormerImageProcessor(size={"height": size, "width": size}).save_pretrained(directory)

    def load(self, source: str, revision: str | None) -> None:
        self.model = load_model(Mask2FormerForUniversalSegmentation, source, revision, self.device)
        self.mean, self.std = normalisation(source, revision)
        self.classes = _class_names(self.model.config, self.name)

    @torch.inference_mode()
    def label(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        outputs = self.model(pixel_values=normalised(pixels, self.mean, self.std, self.device))
        class_probs = outputs.class_queries_logits.float().softmax(dim=-1)[..., :-1]  # (B, Q, C)
        mask_probs = resize_maps(outputs.masks_queries_logits.float(), self.view_size).sigmoid_()  # (B, Q, V, V)
        return [
            {"semseg": encode_png(_best_classes(p, m).cpu().numpy())}
            for p, m in zip(class_probs, mask_probs, strict=True)
        ]


def _best_classes(class_probs: torch.Tensor, mask_probs: torch.Tensor) -> torch.Tensor:
    """argmax_c sum_q class_probs[q, c] * mask_probs[q, h, w] as a (V, V) uint8 map.

    The full (C, V, V) score volume (133 x 224 x 224 floats per image) does not fit in cache, and
    reducing it is memory-bound; scoring a few thousand pixels at a time, classes innermost, gives
    the same argmax about 4x faster on a CPU.
    """
    queries, height, width = mask_probs.shape
    pixels = mask_probs.reshape(queries, -1).T  # (V*V, Q)
    best = torch.empty(pixels.shape[0], dtype=torch.uint8, device=pixels.device)
    for start in range(0, pixels.shape[0], PIXELS_PER_CHUNK):
        chunk = pixels[start : start + PIXELS_PER_CHUNK]
        best[start : start + PIXELS_PER_CHUNK] = (chunk @ class_probs).argmax(dim=1)  # ids < 255
    return best.view(height, width)


def _class_names(config: Mask2FormerConfig, name: str) -> list[str]:
    """``id2label`` as a list; fails at setup if the ids do not fit the 8-bit maps beside 255."""
    count = config.num_labels
    if count >= NO_CLASS:
        # Not a ValueError on purpose: ``setup`` would report it as missing weights.
        raise UserError(f"{name}: the checkpoint has {count} classes; 8-bit maps hold at most {NO_CLASS}")
    return [config.id2label[index] for index in range(count)]
