"""Decode each downloaded image once and cut its label view once per model input size.

The label view is the centred square of the image's shorter side: every pseudo-label is defined on
it (maps at ``label.size``, boxes normalised to it), and later stages crop RGB the same way, so
all modalities of a sample stay aligned. Rows without a usable image keep their place with an
error string and zero pixels, which labelers skip.
"""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa
from ray.data.extensions import ArrowTensorArray

from four_m.pipeline.failures import failure_reason

VIEW_ERROR = "view_error"


def pixels_column(size: int) -> str:
    return f"pixels_{size}"


def pixels_of(batch: pa.Table, size: int) -> np.ndarray:
    """The (B, S, S, 3) uint8 pixels of one input size from a pipeline batch."""
    chunks = batch[pixels_column(size)].chunks
    return (
        np.concatenate([np.asarray(chunk.to_numpy()) for chunk in chunks]) if chunks else np.zeros((0, size, size, 3))
    )


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


def add_views(batch: pa.Table, sizes: tuple[int, ...]) -> pa.Table:
    """Ray Data batch function: images/ columns in, one pixel tensor column per input size out."""
    count = batch.num_rows
    views = {size: np.zeros((count, size, size, 3), np.uint8) for size in sizes}
    errors: list[str | None] = [None] * count
    images = batch["jpg"].to_pylist()
    statuses = batch["status"].to_pylist()
    messages = batch["error_message"].to_pylist()
    for row, (data, status) in enumerate(zip(images, statuses, strict=True)):
        if status != "success" or data is None:
            errors[row] = f"no image: download failed ({failure_reason(messages[row])})"
            continue
        try:
            square = centre_square(decode_rgb(data))
        except (ValueError, cv2.error) as err:
            errors[row] = f"no image: {err}"
            continue
        for size in sizes:
            views[size][row] = resize_square(square, size)
    out = batch.drop_columns(["jpg", "status", "error_message"])
    out = out.append_column(VIEW_ERROR, pa.array(errors, pa.string()))
    for size in sizes:
        out = out.append_column(pixels_column(size), ArrowTensorArray.from_numpy(views[size]))
    return out
