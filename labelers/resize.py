"""Model outputs back to the label view's size, before a map labeler encodes them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_maps(maps: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size): model outputs back to the label view's size."""
    if maps.shape[-2:] == (size, size):
        return maps
    if mode == "nearest":
        return F.interpolate(maps, size=(size, size), mode="nearest")
    return F.interpolate(maps, size=(size, size), mode=mode, align_corners=False)
