"""What the DPT labelers (depth, normals) share: the tiny variant, loading and the forward pass.

Both are a ViT encoder, the DPT reassemble/fusion neck and a dense head; they differ only in the
head class and in how its output becomes a map. Production checkpoints are DPT-Hybrid (a ResNet
stem under the ViT); the tiny variant uses the plain ViT backbone, which is the same code path from
the neck on and needs no second (BiT) config to build.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from transformers import BitConfig, DPTConfig, DPTImageProcessor
from transformers.models.dpt.modeling_dpt import DPTPreTrainedModel

from four_m.core.errors import UserError
from four_m.labelers.hf import load_model, normalisation, normalised
from four_m.labelers.pretrained import PretrainedLabeler

TINY_DPT: dict[str, Any] = {
    "is_hybrid": False,
    "patch_size": 16,
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    # One neck input per encoder layer: the neck needs exactly len(neck_hidden_sizes) of them.
    "backbone_out_indices": [0, 1, 2, 3],
    "neck_hidden_sizes": [16, 32, 32, 32],
    # The last fusion block and the head run at half and full input resolution: keep them thin.
    "fusion_hidden_size": 32,
}
"""About 0.3 M parameters; the production defaults (hidden 768, fusion 256) are ~1000x that."""

DPT_HYBRID: dict[str, Any] = {
    # DPT-Hybrid at 384 px as MiDaS and Omnidata train it (Intel/dpt-hybrid-midas; MiDaS's
    # vitb_rn50_384 backbone, project readout): ViT-B on a ResNet-50 (BiT) stem.
    "is_hybrid": True,
    "image_size": 384,
    "patch_size": 16,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "backbone_out_indices": [2, 5, 8, 11],
    "backbone_featmap_shape": [1, 1024, 24, 24],
    "neck_hidden_sizes": [256, 512, 768, 768],
    "reassemble_factors": [1, 1, 1, 0.5],
    "fusion_hidden_size": 256,
    "readout_type": "project",
    "use_batch_norm_in_fusion_residual": False,
}
BIT_HYBRID: dict[str, Any] = {
    "layer_type": "bottleneck",
    "depths": [3, 4, 9],
    "hidden_sizes": [256, 512, 1024],
    "embedding_size": 64,
    "global_padding": "same",
    "embedding_dynamic_padding": True,
    "out_features": ["stage1", "stage2", "stage3"],
}
"""DPT-Hybrid's ResNet-50 stem (three stages, as the hybrid embeddings take them)."""


def dpt_hybrid_config(
    overrides: Mapping[str, Any] | None = None, backbone: Mapping[str, Any] | None = None, **extra: Any
) -> DPTConfig:
    """DPT-Hybrid's configuration (``overrides`` and ``backbone`` change sizes, for tests)."""
    bit = BitConfig(**{**BIT_HYBRID, **(backbone or {})})
    return DPTConfig(**{**DPT_HYBRID, **(overrides or {})}, backbone_config=bit, **extra)


DPT_MEAN_STD = [0.5, 0.5, 0.5]
"""MiDaS, DPT and Omnidata all standardise with mean = std = 0.5, i.e. pixels to [-1, 1]."""


class DPTLabeler(PretrainedLabeler):
    """A labeler whose model is a transformers DPT; subclasses pick the head and read its output."""

    model_cls: ClassVar[type[DPTPreTrainedModel]]
    tiny_head: ClassVar[dict[str, Any]] = {}
    """Config fields the subclass's head needs on top of ``TINY_DPT`` (e.g. ``num_labels``)."""

    def build_tiny(self, directory: Path) -> None:
        size = self.cfg.input_size
        config = DPTConfig(**TINY_DPT, **self.tiny_head, image_size=size)
        self.model_cls(config).save_pretrained(directory)
        save_processor(directory, size)

    def build_production(self, directory: Path) -> None:
        """DPT-Hybrid at 384 px; the subclass's production head (:meth:`production_model`)."""
        self.production_model(dpt_hybrid_config()).save_pretrained(directory)
        save_processor(directory, DPT_HYBRID["image_size"])

    def production_model(self, config: DPTConfig) -> DPTPreTrainedModel:
        return self.model_cls(config)

    def model_class(self, source: str, revision: str | None) -> type[DPTPreTrainedModel]:
        """The class to load ``source`` with (a labeler that accepts several heads picks by its config)."""
        return self.model_cls

    def load(self, source: str, revision: str | None) -> None:
        self.model = load_model(self.model_class(source, revision), source, revision, self.device)
        self.mean, self.std = normalisation(source, revision)
        check_hybrid_size(self.model.config, self.cfg.input_size, self.name)

    def forward(self, pixels: np.ndarray) -> Any:
        """One batched forward of (B, S, S, 3) uint8 pixels; the caller holds inference mode."""
        return self.model(pixel_values=normalised(pixels, self.mean, self.std, self.device))


def save_processor(directory: Path, size: int) -> None:
    """The image processor a DPT folder carries: its size and MiDaS's mean = std = 0.5."""
    DPTImageProcessor(
        size={"height": size, "width": size}, image_mean=DPT_MEAN_STD, image_std=DPT_MEAN_STD
    ).save_pretrained(directory)


def check_hybrid_size(config: DPTConfig, input_size: int, name: str) -> None:
    """Fail at setup, not on the first batch: DPT-Hybrid's embeddings accept only their own size.

    transformers interpolates the position embeddings of the plain ViT backbone for any input, but
    ``DPTModel`` calls the hybrid embeddings without ``interpolate_pos_encoding``, so they raise on
    any other size. Not a ValueError on purpose: ``setup`` would report it as missing weights.
    """
    if not config.is_hybrid:
        return
    image_size = config.image_size
    expected = tuple(image_size) if isinstance(image_size, list | tuple) else (image_size, image_size)
    if expected != (input_size, input_size):
        raise UserError(
            f"{name}: this DPT-Hybrid checkpoint takes {expected[0]}x{expected[1]} inputs only; "
            f"set label.{name}.input_size to {expected[0]}"
        )
