"""Canny edge labels: OpenCV's Canny detector on the grey label view (an algorithm: real labels)."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from four_m.core.label_codec import encode_png
from four_m.labelers.base import AlgorithmicLabeler
from four_m.modalities.canny_edge import CannyConfig


def canny_edges(rgb: np.ndarray, cfg: CannyConfig) -> np.ndarray:
    """(S, S, 3) uint8 RGB -> (S, S) bool edges (thresholds from the median unless fixed in ``cfg``)."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if cfg.blur > 1:
        grey = cv2.GaussianBlur(grey, (cfg.blur, cfg.blur), 0)
    if cfg.low_threshold is None:
        median = float(np.median(grey))
        low, high = max(0.0, (1 - cfg.sigma) * median), min(255.0, (1 + cfg.sigma) * median)
    else:
        low, high = cfg.low_threshold, cfg.high_threshold
    return cv2.Canny(grey, low, high, L2gradient=True) > 0


def edge_png(edges: np.ndarray, view_size: int) -> bytes:
    """(S, S) bool edges -> an 8-bit PNG of 0 / 255 at the label view's side (nearest: edges stay thin)."""
    if edges.shape[0] != view_size:
        edges = cv2.resize(edges.astype(np.uint8), (view_size, view_size), interpolation=cv2.INTER_NEAREST) > 0
    return encode_png(edges.astype(np.uint8) * 255)


class CannyLabeler(AlgorithmicLabeler):
    name = "canny_edge"
    version = f"opencv {cv2.__version__}"
    cfg: CannyConfig

    def schema(self) -> pa.Schema:
        return pa.schema([pa.field("canny_edge", pa.binary())])

    def provenance(self) -> dict[str, str]:
        cfg = self.cfg
        thresholds = (
            f"auto from the median, sigma {cfg.sigma:g}"
            if cfg.low_threshold is None
            else f"{cfg.low_threshold:g} / {cfg.high_threshold:g}"
        )
        return {**super().provenance(), "edge_encoding": "8-bit PNG, 255 = edge", "thresholds": thresholds}

    def label(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        return [{"canny_edge": edge_png(canny_edges(rgb, self.cfg), self.view_size)} for rgb in pixels]
