"""The label view: the centred square of an image's shorter side, resized, on which every label is defined.

Maps are stored at ``label.size`` on this view and boxes are normalised to it; later stages cut RGB
the same way, and cut 4M's aligned crops (``core.crops``) out of it with :func:`cut_crop`, so all
modalities of a sample stay aligned. It is part of the on-disk contract, so the
label stage, the tokenizers and the previews all cut it with these functions (numpy and OpenCV only).
"""

from __future__ import annotations

import cv2
import numpy as np

from four_m.core.crops import WHOLE, Crop


def centre_square(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[top : top + side, left : left + side]


def resize_square(square: np.ndarray, size: int) -> np.ndarray:
    # INTER_AREA when shrinking (no aliasing), bilinear when enlarging.
    interpolation = cv2.INTER_AREA if square.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(square, (size, size), interpolation=interpolation)


def decode_rgb(data: bytes) -> np.ndarray:
    """JPEG/PNG/WebP bytes -> (H, W, 3) uint8 RGB; grey images are expanded to three channels.
    ValueError for bytes that are no image (OpenCV asserts on an empty buffer, and on its own limits)."""
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    except cv2.error as err:
        raise ValueError(f"cannot decode the stored image (OpenCV: {err.err})") from None
    if image is None:
        raise ValueError("cannot decode the stored image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def label_view(data: bytes | None, size: int, crop: Crop | None = None) -> np.ndarray | None:
    """The (size, size, 3) label view of stored image bytes, or its crop ``crop`` at that size (cut
    from the full-resolution square); None where there are none or they do not decode (the stages
    count such rows as failed; a preview just leaves them out)."""
    try:
        square = centre_square(decode_rgb(data)) if data else None
    except ValueError:
        return None
    return cut_crop(square, crop or WHOLE, size) if square is not None else None


MAX_CHANNELS = 512
"""OpenCV resizes at most this many channels at once."""


def cut_crop(view: np.ndarray, crop: Crop, side: int, nearest: bool = False) -> np.ndarray:
    """Crop ``crop`` of a square (S, S[, C]) label view, resized to ``side`` and mirrored if the crop is.

    ``nearest`` for values that must not be blended (class ids, binary edges); otherwise
    INTER_AREA when shrinking and bilinear when enlarging, as :func:`resize_square`. OpenCV
    resizes at most 512 channels at once, so wider feature maps go in slices.
    """
    top, left, bottom, right = crop.pixels(view.shape[0])
    region = view[top:bottom, left:right]
    if nearest:
        interpolation = cv2.INTER_NEAREST
    else:
        interpolation = cv2.INTER_AREA if min(region.shape[:2]) > side else cv2.INTER_LINEAR
    if region.ndim == 3 and region.shape[2] > MAX_CHANNELS:
        slices = range(0, region.shape[2], MAX_CHANNELS)
        resized = np.concatenate([_resize(region[:, :, i : i + MAX_CHANNELS], side, interpolation) for i in slices], 2)
    else:
        resized = _resize(region, side, interpolation)
    return np.ascontiguousarray(resized[:, ::-1]) if crop.flip else resized


def _resize(region: np.ndarray, side: int, interpolation: int) -> np.ndarray:
    resized = cv2.resize(region, (side, side), interpolation=interpolation)
    return resized[:, :, None] if region.ndim == 3 and resized.ndim == 2 else resized  # cv2 drops a lone channel
