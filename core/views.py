"""The label view: the centred square of an image's shorter side, resized, on which every label is defined.

Maps are stored at ``label.size`` on this view and boxes are normalised to it; later stages cut RGB
the same way, so all modalities of a sample stay aligned. It is part of the on-disk contract, so the
label stage, the tokenizers and the previews all cut it with these functions (numpy and OpenCV only).
"""

from __future__ import annotations

import cv2
import numpy as np


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
    """JPEG/PNG/WebP bytes -> (H, W, 3) uint8 RGB; grey images are expanded to three channels."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("cannot decode the stored image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def label_view(data: bytes | None, size: int) -> np.ndarray | None:
    """The (size, size, 3) label view of stored image bytes; None where there are none or they do not
    decode (the stages count such rows as failed; a preview just leaves them out)."""
    try:
        return resize_square(centre_square(decode_rgb(data)), size) if data else None
    except ValueError:
        return None
