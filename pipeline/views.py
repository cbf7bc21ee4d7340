"""The label stage's side of the label views: decode each downloaded image once, cut it once per input size.

The views themselves (``core.views``) are the on-disk contract; this module only packs them into
pipeline batches as tensor columns. Rows without a usable image keep their place with an error
string and zero pixels, which labelers skip.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import cv2
import numpy as np
import pyarrow as pa
from ray.data.extensions import ArrowTensorArray

from four_m.core.failures import SUCCESS, download_failed, no_image
from four_m.core.views import centre_square, decode_rgb, resize_square

VIEW_ERROR = "view_error"


def pixels_column(size: int) -> str:
    return f"pixels_{size}"


def pixels_of(batch: pa.Table, size: int) -> np.ndarray:
    """The (B, S, S, 3) uint8 pixels of one input size from a pipeline batch."""
    chunks = batch[pixels_column(size)].chunks
    return (
        np.concatenate([np.asarray(chunk.to_numpy()) for chunk in chunks]) if chunks else np.zeros((0, size, size, 3))
    )


def add_views(batch: pa.Table, sizes: tuple[int, ...], removed: Mapping[str, str] = MappingProxyType({})) -> pa.Table:
    """images/ columns in, one pixel tensor column per input size out; a row that curation
    ``removed`` (key -> its error) is neither decoded nor labelled."""
    count = batch.num_rows
    views = {size: np.zeros((count, size, size, 3), np.uint8) for size in sizes}
    errors: list[str | None] = [None] * count
    images = batch["jpg"].to_pylist()
    statuses = batch["status"].to_pylist()
    messages = batch["error_message"].to_pylist()
    keys = batch["key"].to_pylist() if removed else [None] * count
    for row, (data, status) in enumerate(zip(images, statuses, strict=True)):
        if keys[row] in removed:
            errors[row] = removed[keys[row]]
            continue
        if status != SUCCESS or data is None:
            errors[row] = download_failed(messages[row])
            continue
        try:
            square = centre_square(decode_rgb(data))
        except (ValueError, cv2.error) as err:
            errors[row] = no_image(str(err))
            continue
        for size in sizes:
            views[size][row] = resize_square(square, size)
    out = batch.drop_columns(["jpg", "status", "error_message"])
    out = out.append_column(VIEW_ERROR, pa.array(errors, pa.string()))
    for size in sizes:
        out = out.append_column(pixels_column(size), ArrowTensorArray.from_numpy(views[size]))
    return out
