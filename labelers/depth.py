"""Depth pseudo-labels: a DPT depth model's relative depth or inverse depth, one 16-bit PNG per image.

Production weights are MiDaS-trained DPT (``Intel/dpt-hybrid-midas``, ``Intel/dpt-large``), Depth
Anything V2 (``label.depth.architecture: depth_anything``; a ViT-DINOv2 encoder and a DPT neck,
better and faster), or Omnidata's DPT-Hybrid, 4M's own labeler, converted by ``make models
OMNIDATA_DEPTH=omnidata_dpt_depth_v2.ckpt`` (``labelers.omnidata``). All load through
``AutoModelForDepthEstimation``. MiDaS's and Depth Anything's ``predicted_depth`` is *relative
inverse depth* (disparity up to an unknown scale and shift): larger is nearer. Omnidata's is
*depth* (z-buffer, up to scale and shift), clamped to [0, 1] as Omnidata does: larger is farther.
Either is comparable within one image only, so each map is scaled per image:

    stored v (uint16, 0..65535)  ->  d = depth_min + v / 65535 * (depth_max - depth_min)

with ``depth_min``/``depth_max`` the map's own extremes stored beside it (a constant map stores
zeros and min == max). 16 bits keep 1/65535 of the range, far below the model's own error, and the
extremes keep the raw values recoverable for anyone who wants them. Which quantity a file holds is
in its metadata (``four_m.depth_quantity``): ml-4m's depth tokenizer takes depth, never inverse depth.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from transformers import (
    AutoModelForDepthEstimation,
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Config,
    DPTForDepthEstimation,
    DPTImageProcessor,
)

from four_m.core.config import LabelerConfig
from four_m.core.errors import UserError
from four_m.core.label_codec import encode_png
from four_m.core.modalities import IMAGENET_MEAN, IMAGENET_STD
from four_m.labelers.dpt import DPTLabeler, check_hybrid_size
from four_m.labelers.hf import load_model, normalisation
from four_m.labelers.omnidata import is_converted
from four_m.labelers.resize import resize_maps
from four_m.modalities.depth import ARCHITECTURES, DEPTH, INVERSE_DEPTH, QUANTITY_KEY, DepthConfig

UINT16_MAX = 65535
TINY_DEPTH_ANYTHING = {
    "backbone": {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64},
    "neck_hidden_sizes": [16, 32, 32, 32],
    "fusion_hidden_size": 32,
    "head_hidden_size": 16,
    "reassemble_hidden_size": 32,
}
"""A Depth Anything V2 of about 0.2 M parameters (ViT-S is 25 M): DINOv2's 14 px patches, 4 layers."""


class DepthLabeler(DPTLabeler):
    """Relative inverse depth (or Omnidata's depth) from ``DPTForDepthEstimation``, at the label view's size."""

    name = "depth"
    model_cls = DPTForDepthEstimation
    cfg: DepthConfig

    def __init__(self, cfg: LabelerConfig, *args: Any, **kwargs: Any):
        # A plain LabelerConfig (a caller that knows no depth settings) is a DepthConfig at its defaults.
        cfg = cfg if isinstance(cfg, DepthConfig) else DepthConfig(**dataclasses.asdict(cfg))
        super().__init__(cfg, *args, **kwargs)

    def build_tiny(self, directory) -> None:
        if self.cfg.architecture == "dpt":
            super().build_tiny(directory)
            return
        size, patch = self.cfg.input_size, 14
        if size % patch:
            raise UserError(f"depth: Depth Anything takes inputs in multiples of {patch} px; input_size is {size}")
        backbone = Dinov2Config(
            **TINY_DEPTH_ANYTHING["backbone"],
            patch_size=patch,
            image_size=size,
            out_indices=[1, 2, 3, 4],
            reshape_hidden_states=False,  # the neck reshapes them itself, as in the released configs
        )
        shapes = {k: v for k, v in TINY_DEPTH_ANYTHING.items() if k != "backbone"}
        config = DepthAnythingConfig(backbone_config=backbone, patch_size=patch, **shapes)
        DepthAnythingForDepthEstimation(config).save_pretrained(directory)
        processor = DPTImageProcessor(
            size={"height": size, "width": size}, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)
        )
        processor.save_pretrained(directory)

    def build_production(self, directory) -> None:
        if self.cfg.architecture != "dpt":
            raise UserError("depth: the dry run builds 4M's DPT-Hybrid; set label.depth.architecture to dpt for it")
        super().build_production(directory)

    def load(self, source: str, revision: str | None) -> None:
        """Either architecture through transformers' auto class; a checkpoint of the other one stops."""
        self.model = load_model(AutoModelForDepthEstimation, source, revision, self.device)
        found, wanted = self.model.config.model_type, ARCHITECTURES[self.cfg.architecture]
        if found != wanted:
            raise UserError(
                f"depth: {source!r} is a {found} model, but label.depth.architecture is {self.cfg.architecture}"
            )
        self.mean, self.std = normalisation(source, revision)
        if found == "dpt":
            check_hybrid_size(self.model.config, self.cfg.input_size, self.name)
        self.omnidata = self._omnidata(source, revision)

    def _omnidata(self, source: str, revision: str | None = None) -> bool:
        """Whether ``source`` is Omnidata's depth model converted here (its config says so)."""
        return not self.random_init and is_converted(source, self.name, revision)

    def schema(self) -> pa.Schema:
        return pa.schema(
            [
                pa.field("depth", pa.binary()),
                pa.field("depth_min", pa.float32()),
                pa.field("depth_max", pa.float32()),
            ]
        )

    def provenance(self) -> dict[str, str]:
        if self._omnidata(self.source, self.cfg.revision):
            kind = {"depth_kind": "relative depth (Omnidata's, clamped to [0, 1]), per-image min/max scaling"}
            kind[QUANTITY_KEY] = DEPTH
        else:
            kind = {"depth_kind": "relative inverse depth (disparity), per-image min/max scaling"}
            kind[QUANTITY_KEY] = INVERSE_DEPTH
        architecture = {"architecture": self.cfg.architecture} if self.cfg.architecture != "dpt" else {}
        return {**super().provenance(), **kind, **architecture}

    @torch.inference_mode()
    def label(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        predicted = self.forward(pixels).predicted_depth.float()  # (B, S, S)
        if self.omnidata:  # Omnidata clamps its depth to [0, 1]; 4M's labels are those
            predicted = predicted.clamp(0.0, 1.0)
        maps = resize_maps(predicted.unsqueeze(1), self.view_size)[:, 0]  # (B, V, V)
        low = maps.amin(dim=(1, 2), keepdim=True)  # (B, 1, 1)
        high = maps.amax(dim=(1, 2), keepdim=True)
        span = torch.where(high > low, high - low, torch.ones_like(high))  # a constant map -> all 0
        codes = ((maps - low) / span * UINT16_MAX).round().to(torch.int32).cpu().numpy().astype(np.uint16)
        low_values, high_values = low.flatten().tolist(), high.flatten().tolist()
        return [
            {"depth": encode_png(code), "depth_min": lo, "depth_max": hi}
            for code, lo, hi in zip(codes, low_values, high_values, strict=True)
        ]
