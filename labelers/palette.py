"""Colour palette labels: k-means in CIELAB, k = 1..7, on the label view (an algorithm: real labels).

4M-21 extracted its palettes with PyPalette (k-means on RGB pixels). We cluster in CIELAB instead,
where Euclidean distance approximates perceived colour difference, so the means are the colours a
person would name rather than RGB averages that drift towards grey. Each palette lists its colours
by the share of pixels they stand for, most first; k-means++ seeding from a fixed seed makes the
labels deterministic. An image with fewer distinct colours than ``k`` repeats one of them (at the end, with no pixels).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from four_m.labelers.base import AlgorithmicLabeler
from four_m.modalities.color_palette import PaletteConfig

LENGTHS = range(1, 8)
"""4M-21's palette sizes: 1 to 7 colours, all seven stored per image."""


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> float32 CIELAB (L in [0, 100], a and b about [-128, 127])."""
    return cv2.cvtColor(rgb.reshape(-1, 1, 3).astype(np.float32) / 255, cv2.COLOR_RGB2LAB).reshape(rgb.shape)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """(..., 3) float CIELAB -> uint8 RGB (out-of-gamut colours clipped)."""
    rgb = cv2.cvtColor(lab.reshape(-1, 1, 3).astype(np.float32), cv2.COLOR_LAB2RGB).reshape(lab.shape)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def squared_distances(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(N, K) squared Euclidean distances, summed axis by axis in the order ``.sum(-1)`` adds them
    (so the same bits): a reduction over an axis of three costs numpy more than the arithmetic."""
    total = (points[:, 0, None] - centres[None, :, 0]) ** 2
    for axis in (1, 2):
        total += (points[:, axis, None] - centres[None, :, axis]) ** 2
    return total


def kmeans(
    points: np.ndarray, weights: np.ndarray, k: int, iterations: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted Lloyd's k-means with k-means++ seeding over distinct colours (``weights``: how many
    pixels have each) -> (k centres, pixels per centre), most first."""
    weights = weights.astype(np.float64)
    centres = [points[rng.choice(len(points), p=weights / weights.sum())]]
    nearest_distance = squared_distances(points, centres[0][None])[:, 0]
    for _ in range(1, k):
        distance = weights * nearest_distance
        total = distance.sum()
        # No colour left away from the centres (fewer distinct colours than k): repeat the first.
        centres.append(points[rng.choice(len(points), p=distance / total)] if total > 0 else centres[0])
        np.minimum(nearest_distance, squared_distances(points, centres[-1][None])[:, 0], out=nearest_distance)
    centres = np.asarray(centres, np.float64)
    for _ in range(iterations):
        nearest = squared_distances(points, centres).argmin(1)
        mass = np.bincount(nearest, weights, minlength=k)
        sums = np.stack([np.bincount(nearest, weights * points[:, axis], minlength=k) for axis in range(3)], 1)
        moved = np.where(mass[:, None] > 0, sums / np.maximum(mass, 1e-12)[:, None], centres)
        if np.allclose(moved, centres):
            break
        centres = moved
    nearest = squared_distances(points, centres).argmin(1)
    counts = np.bincount(nearest, weights, minlength=k)
    order = np.argsort(-counts, kind="stable")
    return centres[order], counts[order]


def sampled_colours(rgb: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct colours of a ``side`` x ``side`` grid of the image's pixels and how often each
    occurs. The grid is symmetric (``linspace`` from the first to the last pixel), so a mirrored
    image gives the very same colours, and the k-means sees a set, not an order: a flipped image
    has the same palettes."""
    rows = np.linspace(0, rgb.shape[0] - 1, side).round().astype(int)
    columns = np.linspace(0, rgb.shape[1] - 1, side).round().astype(int)
    return np.unique(rgb[rows][:, columns].reshape(-1, 3), axis=0, return_counts=True)


def palettes(rgb: np.ndarray, cfg: PaletteConfig) -> list[list[int]]:
    """(S, S, 3) uint8 RGB -> seven palettes, the k-th a flat [R, G, B, ...] of k colours."""
    colours, counts = sampled_colours(rgb, cfg.sample_side)
    points = rgb_to_lab(colours[:, None])[:, 0].astype(np.float64)
    found = []
    for k in LENGTHS:
        centres, _ = kmeans(points, counts, k, cfg.iterations, np.random.default_rng(k))
        found.append(lab_to_rgb(centres).reshape(-1).tolist())
    return found


class PaletteLabeler(AlgorithmicLabeler):
    name = "color_palette"
    version = "1"
    cfg: PaletteConfig

    def schema(self) -> pa.Schema:
        return pa.schema([pa.field("color_palette", pa.list_(pa.list_(pa.uint8())))])

    def provenance(self) -> dict[str, str]:
        return {
            **super().provenance(),
            "palette_encoding": "7 lists, the k-th flat R,G,B of k colours, most pixels first",
            "palette_method": f"k-means++ in CIELAB on {self.cfg.sample_side}x{self.cfg.sample_side} px",
        }

    def label(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        return [{"color_palette": palettes(rgb, self.cfg)} for rgb in pixels]
