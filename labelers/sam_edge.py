"""SAM edge labels: the boundaries of the SAM instance masks, as 4M-21 derives its SAM edges."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from four_m.core.label_codec import decode_rle
from four_m.labelers.base import DerivedLabeler, LabelBatch
from four_m.labelers.canny import edge_png

_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


def instance_boundaries(masks: list[np.ndarray], side: int) -> np.ndarray:
    """(S, S) bool: pixels of a mask with a 4-neighbour outside it (inner boundaries, so touching
    instances give one line each side, and a mask at the border has no edge along the border)."""
    edges = np.zeros((side, side), bool)
    for mask in masks:
        inside = mask.astype(np.uint8)
        edges |= (inside > 0) & (cv2.erode(inside, _CROSS, borderType=cv2.BORDER_REPLICATE) == 0)
    return edges


class SamEdgeLabeler(DerivedLabeler):
    name = "sam_edge"
    version = "1"

    def schema(self) -> pa.Schema:
        return pa.schema([pa.field("sam_edge", pa.binary())])

    def provenance(self) -> dict[str, str]:
        return {**super().provenance(), "edge_encoding": "8-bit PNG, 255 = edge"}

    def label_batch(self, batch: LabelBatch) -> list[dict[str, Any]]:
        out = []
        for row in batch.labels["sam_instance"]:
            if row is None:
                raise ValueError("no sam_instance label for this image")
            masks = row["sam_instance"] or []
            side = _side(masks, self.view_size)
            decoded = [decode_rle(m["counts"], (side, side)) for m in masks]
            out.append({"sam_edge": edge_png(instance_boundaries(decoded, side), self.view_size)})
        return out


def _side(masks: list[dict[str, Any]], view_size: int) -> int:
    """The masks' side: the label view's, which the SAM labeler stores them at (their run lengths
    sum to side * side)."""
    if not masks:
        return view_size
    side = int(np.sqrt(sum(masks[0]["counts"])))
    if side * side != sum(masks[0]["counts"]):
        raise ValueError(f"a sam_instance mask's run lengths sum to {sum(masks[0]['counts'])}, not a square")
    return side
