"""Compact, lossless encodings for label maps, shared by the map labelers and their readers.

PNG keeps maps small, lossless and viewable: 8-bit for class ids and normals, 16-bit for depth.
OpenCV encodes several times faster than Pillow, which matters at one map per image per labeler.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def encode_png(array: np.ndarray) -> bytes:
    """(H, W) uint8/uint16 or (H, W, 3) uint8 RGB -> PNG bytes."""
    if array.ndim == 3:
        array = array[:, :, ::-1]  # OpenCV writes BGR
    ok, data = cv2.imencode(".png", np.ascontiguousarray(array), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError(f"cannot encode a {array.dtype} array of shape {array.shape} as PNG")
    return data.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W) uint8/uint16 or (H, W, 3) uint8 RGB, as written by ``encode_png``."""
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ValueError("not a PNG label map")
    return array[:, :, ::-1].copy() if array.ndim == 3 else array


def resize_maps(maps: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size): model outputs back to the label view's size."""
    if maps.shape[-2:] == (size, size):
        return maps
    if mode == "nearest":
        return F.interpolate(maps, size=(size, size), mode="nearest")
    return F.interpolate(maps, size=(size, size), mode=mode, align_corners=False)
