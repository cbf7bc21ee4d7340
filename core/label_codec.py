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


def encode_rle(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool mask -> uncompressed run lengths, for instance masks (``sam_instance``).

    The convention, part of the on-disk contract: the mask is flattened in **row-major** order
    (numpy's own, ``mask.ravel()``), and the runs alternate False, True, False, ... starting with a
    run of False, which is 0 when the first pixel is True. The counts sum to H * W. COCO's RLE walks
    the mask column-major (Fortran order, pycocotools' layout); these counts do not, because every
    reader here holds numpy arrays in C order, so neither side transposes. Shape travels beside the
    counts (the label view's side), not in them. An int32 array, not a list: Arrow converts a
    list of Python ints one by one (8 ms an image for SAM's masks), an array in one copy.
    """
    flat = np.ascontiguousarray(mask, dtype=bool).ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], changes, [flat.size])))
    if flat.size and flat[0]:
        runs = np.concatenate(([0], runs))
    return runs.astype(np.int32)


def decode_rle(counts: list[int] | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Run lengths written by ``encode_rle`` -> the (H, W) bool mask of ``shape``."""
    runs = np.asarray(counts, dtype=np.int64)
    height, width = shape
    if runs.ndim != 1 or (runs < 0).any() or int(runs.sum()) != height * width:
        raise ValueError(f"run lengths do not describe a {height}x{width} mask")
    values = np.arange(runs.size) % 2 == 1  # False, True, False, ...
    return np.repeat(values, runs).reshape(height, width)
