"""Depth pseudo-labels: a DPT depth model's relative inverse depth, one 16-bit PNG per image.

Production weights are MiDaS-trained DPT (``Intel/dpt-hybrid-midas``, ``Intel/dpt-large``). Their
``predicted_depth`` is *relative inverse depth* (disparity up to an unknown scale and shift): larger
is nearer, and values are comparable within one image only. So each map is scaled per image:

    stored v (uint16, 0..65535)  ->  d = depth_min + v / 65535 * (depth_max - depth_min)

with ``depth_min``/``depth_max`` the map's own extremes stored beside it (a constant map stores
zeros and min == max). 16 bits keep 1/65535 of the range, far below the model's own error, and the
extremes keep the raw values recoverable for anyone who wants them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch
from transformers import DPTForDepthEstimation

from four_m.core.label_codec import encode_png
from four_m.labelers.dpt import DPTLabeler
from four_m.labelers.resize import resize_maps

UINT16_MAX = 65535


class DepthLabeler(DPTLabeler):
    """Relative inverse depth from ``DPTForDepthEstimation``, at the label view's size."""

    name = "depth"
    model_cls = DPTForDepthEstimation

    def schema(self) -> pa.Schema:
        return pa.schema(
            [
                pa.field("depth", pa.binary()),
                pa.field("depth_min", pa.float32()),
                pa.field("depth_max", pa.float32()),
            ]
        )

    def provenance(self) -> dict[str, str]:
        return {**super().provenance(), "depth_kind": "relative inverse depth (disparity), per-image min/max scaling"}

    @torch.inference_mode()
    def label(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        disparity = self.forward(pixels).predicted_depth.float()  # (B, S, S)
        maps = resize_maps(disparity.unsqueeze(1), self.view_size)[:, 0]  # (B, V, V)
        low = maps.amin(dim=(1, 2), keepdim=True)  # (B, 1, 1)
        high = maps.amax(dim=(1, 2), keepdim=True)
        span = torch.where(high > low, high - low, torch.ones_like(high))  # a constant map -> all 0
        codes = ((maps - low) / span * UINT16_MAX).round().to(torch.int32).cpu().numpy().astype(np.uint16)
        low_values, high_values = low.flatten().tolist(), high.flatten().tolist()
        return [
            {"depth": encode_png(code), "depth_min": lo, "depth_max": hi}
            for code, lo, hi in zip(codes, low_values, high_values, strict=True)
        ]
