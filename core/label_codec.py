"""Compact, lossless encodings for label maps: the labelers write them, tokenizers and cards read them.

PNG keeps maps small, lossless and viewable: 8-bit for class ids and normals, 16-bit for depth.
OpenCV encodes several times faster than Pillow, which matters at one map per image per labeler.
Part of the on-disk contract, so it lives in ``core`` and imports no torch: readers such as
``make card`` decode maps without loading a deep-learning stack.
"""

from __future__ import annotations

import cv2
import numpy as np


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
