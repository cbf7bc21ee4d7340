"""One adapter per map *kind*: everything the shared VQ tokenizer needs to know about a map.

The VQ architecture (``tokenize.vq``) is the same for every map; an adapter owns what differs:
reading the stored labels into values, the model's input layer and output head, the training loss,
the reconstruction metric, turning model outputs back into values, checking values, and rendering
one for previews. It is written once per kind (``ModalitySpec.kind``); every modality of that kind
(4M-7's in brackets) gets an instance that knows its name and payload column.

================  ============================  ==========================  ===============================
kind              value (one numpy array)       stored as                   loss / metric
================  ============================  ==========================  ===============================
image (rgb)       float32 (3, S, S) in [0, 1]   images/ ``jpg``, label view L1 + MSE / PSNR in dB
continuous_map    float32 (1, S, S) in [0, 1]   16-bit PNG, v / 65535       L1 / abs-rel of 1 + value
(depth)
direction_map     float32 (3, S, S) in [-1, 1]  8-bit RGB PNG, v / 255*2-1  1 - cos + L1 / angular error
(normal)
class_map         int64 (S, S), 255 = no class  8-bit PNG of class ids      cross-entropy / mIoU
(semseg)
feature_map       float32 (D, G, G)             float16 list in (G, G, D)   1 - cos + MSE / cosine
(clip, dinov2)
edge_map          float32 (1, S, S) of 0 / 1    8-bit PNG of 0 / 255        weighted BCE + Dice / edge F1
(canny_edge)
================  ============================  ==========================  ===============================

Adapters are frozen dataclasses. ``ADAPTERS`` holds 4M's settings (224 px maps, 133 classes,
feature maps on their tokenizer's grid, 14 x 14 for CLIP) and is never mutated; a tokenizer of
another size or class count gets its own copy from ``configured``. Reading never depends on those
settings: label files carry their own shapes.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Any, ClassVar

import cv2
import matplotlib
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from four_m.core.coco import COCO_PANOPTIC, NO_CLASS
from four_m.core.crops import Crop
from four_m.core.errors import UserError
from four_m.core.failures import SUCCESS, download_failed
from four_m.core.label_codec import decode_png
from four_m.core.modalities import MODALITIES, ModalitySpec
from four_m.core.views import centre_square, cut_crop, decode_rgb, resize_square
from four_m.modalities.depth import INVERSE_DEPTH, QUANTITY_KEY
from four_m.tokenize.base import TokenizerInputError

ReadResult = tuple[list[np.ndarray | None], list[str | None]]
"""What reading a table gives: one value per row (None where absent) and why it is absent."""


@dataclass(frozen=True, kw_only=True)
class MapAdapter(ABC):
    size: int = 224
    """Side of the value maps: the label view (for a feature map, its feature grid)."""

    modality: str
    """The modality this adapter reads (a registered name whose spec is of this adapter's kind)."""
    column: str
    """The stored table's payload column (the spec's ``column``)."""

    kind: ClassVar[str]
    """The ``ModalitySpec.kind`` this adapter serves: every modality of that kind uses it."""
    dtype: ClassVar[type[np.generic]]
    flippable: ClassVar[bool]
    """Whether a horizontally flipped value is still a true value (the training augmentation)."""
    nearest: ClassVar[bool] = False
    """Crops are resized without blending values (class ids, binary edges)."""
    on_grid: ClassVar[bool] = False
    """Values sit on the token grid (feature maps): crops are cut from the grid and keep its size,
    instead of being resized to ``tokenize.crops.size``."""
    metric_name: ClassVar[str]

    @property
    @abstractmethod
    def shape(self) -> tuple[int, ...]: ...

    @property
    @abstractmethod
    def expected(self) -> str:
        """What a value must be, in words, for error messages."""

    def params(self) -> dict[str, Any]:
        """What a saved tokenizer records besides the size (class count, feature width)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("size", "modality", "column")}

    @classmethod
    def params_of(cls, schema: pa.Schema) -> dict[str, Any]:
        """The params a label file implies, from its metadata: a tokenizer for it is built with these."""
        return {}

    @classmethod
    def registry_settings(cls, spec: ModalitySpec) -> dict[str, Any]:
        """Settings of ``spec``'s instance in ``ADAPTERS`` that its declaration decides, not the class."""
        return {}

    # --- reading stored labels ---

    def read(self, table: pa.Table) -> ReadResult:
        """A stored table -> (values, errors), row for row; a failed or empty row is None + why."""
        values: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for payload, error in zip(self._payloads(table), self._failures(table), strict=True):
            value = None
            if error is None and payload is None:
                error = f"{self.modality}: no {self.column} payload"
            elif error is None:
                try:
                    value = self.parse(payload)
                except (ValueError, cv2.error) as err:
                    error = f"{self.modality}: {err}"
            values.append(value)
            errors.append(error)
        return values, errors

    def _payloads(self, table: pa.Table) -> list[Any]:
        return table[self.column].to_pylist()

    def _failures(self, table: pa.Table) -> list[str | None]:
        return table["error"].to_pylist()

    @abstractmethod
    def parse(self, payload: Any) -> np.ndarray:
        """One stored payload -> its value; ValueError for one that cannot be decoded."""

    # --- crops (core.crops) ---

    def crop(self, value: np.ndarray, crop: Crop) -> np.ndarray:
        """Crop ``crop`` of a label-view value (any side), as a value at this adapter's size.

        Cut in float32 (nearest-neighbour values stay exact) and cast back to the kind's dtype; a
        mirrored crop is then made true to the mirror by :meth:`mirrored`.
        """
        planar = (value if value.ndim == 2 else value.transpose(1, 2, 0)).astype(np.float32)
        cut = cut_crop(planar, crop, self.size, self.nearest)
        cut = (cut if value.ndim == 2 else cut.transpose(2, 0, 1)).astype(self.dtype)
        return self.mirrored(cut) if crop.flip else np.ascontiguousarray(cut)

    def mirrored(self, value: np.ndarray) -> np.ndarray:
        """A horizontally mirrored value (already flipped pixel-wise) made true to the mirror: most
        kinds need nothing; directions negate their horizontal component."""
        return np.ascontiguousarray(value)

    # --- checking values ---

    def check(self, value: Any) -> None:
        """Raise ``TokenizerInputError`` unless ``value`` is a value of this modality at this size."""
        if not isinstance(value, np.ndarray) or value.dtype != self.dtype or value.shape != self.shape:
            got = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
            raise TokenizerInputError(f"{self.modality}: expected {self.expected}, got {got}")
        problem = self._range_problem(value)
        if problem:
            raise TokenizerInputError(f"{self.modality}: expected {self.expected}, got {problem}")

    @abstractmethod
    def _range_problem(self, value: np.ndarray) -> str | None: ...

    # --- the model's ends, its loss and metric ---

    @abstractmethod
    def input_layer(self, width: int) -> nn.Module:
        """(B, *value shape) batch -> (B, width, S, S) features."""

    @abstractmethod
    def head(self, width: int) -> nn.Module:
        """(B, width, S, S) features -> (B, outputs, S, S) raw outputs."""

    @abstractmethod
    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Raw outputs and the batch of values they reconstruct -> scalar reconstruction loss."""

    @abstractmethod
    def to_values(self, output: torch.Tensor) -> torch.Tensor:
        """Raw outputs -> a (B, *value shape) batch of values."""

    @abstractmethod
    def metric_sums(self, predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Additive statistics of one (B, *value shape) batch: summed over batches, ``metric`` reads them."""

    @abstractmethod
    def metric(self, sums: np.ndarray) -> float | None:
        """The reconstruction metric from summed ``metric_sums``; None where it is undefined."""

    @abstractmethod
    def render(self, value: np.ndarray) -> np.ndarray:
        """One value -> (S, S, 3) uint8 RGB for previews."""


class FloatMapAdapter(MapAdapter):
    """Maps of ``channels`` floats per pixel within [low, high]: 3x3 convolutions at both ends."""

    dtype = np.float32
    low: ClassVar[float]
    high: ClassVar[float]

    @property
    @abstractmethod
    def channels(self) -> int: ...

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.channels, self.size, self.size)

    @property
    def expected(self) -> str:
        bounds = f"in [{self.low:g}, {self.high:g}]" if math.isfinite(self.low) else "finite"
        return f"float32 {self.shape} {bounds}"

    def crop(self, value: np.ndarray, crop: Crop) -> np.ndarray:
        """The crop, kept within [low, high]: OpenCV's area and bilinear weights sum to 1 only up to
        rounding, so a white region of an RGB view came out at 1 + 1 ulp and failed :meth:`check`."""
        return np.clip(super().crop(value, crop), self.low, self.high)

    def _range_problem(self, value: np.ndarray) -> str | None:
        low, high = value.min(), value.max()
        # Written so that NaN fails too: every comparison with NaN is False.
        return None if self.low <= low and high <= self.high else f"values in [{low:g}, {high:g}]"

    def input_layer(self, width: int) -> nn.Module:
        return nn.Conv2d(self.channels, width, 3, padding=1)

    def head(self, width: int) -> nn.Module:
        return nn.Conv2d(width, self.channels, 3, padding=1)

    def to_values(self, output: torch.Tensor) -> torch.Tensor:
        return output.clamp(self.low, self.high)

    def metric(self, sums: np.ndarray) -> float | None:
        """Float maps sum (total, count) of a per-item quantity; the metric is its mean."""
        total, count = sums
        return float(total / count) if count else None


class ImageAdapter(FloatMapAdapter):
    kind = "image"
    channels = 3
    low, high = 0.0, 1.0
    flippable = True
    metric_name = "psnr_db"

    def _failures(self, table: pa.Table) -> list[str | None]:
        statuses, messages = table["status"].to_pylist(), table["error_message"].to_pylist()
        return [
            None if status == SUCCESS else download_failed(message)
            for status, message in zip(statuses, messages, strict=True)
        ]

    def parse(self, payload: bytes) -> np.ndarray:
        # The label view, cut exactly as the labels were: centred square of the shorter side, resized.
        pixels = resize_square(centre_square(decode_rgb(payload)), self.size)  # (S, S, 3) uint8
        return pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(output, target) + F.mse_loss(output, target)

    def metric_sums(self, predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """(sum, count) of per-image PSNR; a perfect image counts as 100 dB (MSE floored at 1e-10)."""
        mse = ((predictions - targets) ** 2).mean(axis=(1, 2, 3), dtype=np.float64)  # (B,)
        psnr = 10 * np.log10(1 / np.maximum(mse, 1e-10))
        return np.array([psnr.sum(), len(psnr)])

    def render(self, value: np.ndarray) -> np.ndarray:
        return (value.transpose(1, 2, 0) * 255).round().astype(np.uint8)


@dataclass(frozen=True, kw_only=True)
class ContinuousMapAdapter(FloatMapAdapter):
    """Per-image normalised relative inverse depth, or depth (``quantity``, from the label files);
    ``depth_min``/``depth_max`` are not part of the value."""

    quantity: str = INVERSE_DEPTH
    """``inverse_depth`` (MiDaS, Depth Anything) or ``depth`` (Omnidata): the label files'
    ``four_m.depth_quantity``; a file without it holds inverse depth."""

    kind = "continuous_map"
    channels = 1
    low, high = 0.0, 1.0
    flippable = True
    metric_name = "abs_rel"

    @classmethod
    def params_of(cls, schema: pa.Schema) -> dict[str, Any]:
        quantity = (schema.metadata or {}).get(f"four_m.{QUANTITY_KEY}".encode(), INVERSE_DEPTH.encode())
        return {"quantity": quantity.decode()}

    def parse(self, payload: bytes) -> np.ndarray:
        codes = decode_png(payload)
        if codes.dtype != np.uint16 or codes.ndim != 2:
            raise ValueError(f"expected a 16-bit one-channel PNG, got {codes.dtype} {codes.shape}")
        return (codes.astype(np.float32) / np.float32(65535))[None]  # (1, S, S)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(output, target)

    def metric_sums(self, predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """(sum, count) of |p - t| / (1 + t): abs-rel of the depths shifted by 1.

        Values are normalised to [0, 1] per image and include 0, where plain abs-rel divides by zero;
        shifting both sides by 1 keeps the measure relative and bounded (at most 1 per pixel).
        """
        relative = np.abs(predictions - targets) / (1 + targets)
        return np.array([relative.sum(dtype=np.float64), relative.size])

    def render(self, value: np.ndarray) -> np.ndarray:
        return (matplotlib.colormaps["magma"](value[0])[:, :, :3] * 255).astype(np.uint8)


class DirectionMapAdapter(FloatMapAdapter):
    """Surface normals. A mirrored crop negates x (:meth:`mirrored`); tokenizer training does not flip them."""

    kind = "direction_map"
    channels = 3
    low, high = -1.0, 1.0
    flippable = False
    metric_name = "angular_error_deg"

    def parse(self, payload: bytes) -> np.ndarray:
        colours = decode_png(payload)
        if colours.dtype != np.uint8 or colours.ndim != 3 or colours.shape[2] != 3:
            raise ValueError(f"expected an 8-bit RGB PNG, got {colours.dtype} {colours.shape}")
        return colours.transpose(2, 0, 1).astype(np.float32) / np.float32(127.5) - 1  # v / 255 * 2 - 1

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # The angle is what matters; L1 also pins the length, which the cosine alone leaves free.
        return (1 - F.cosine_similarity(output, target, dim=1)).mean() + F.l1_loss(output, target)

    def to_values(self, output: torch.Tensor) -> torch.Tensor:
        return F.normalize(output, dim=1).clamp(-1.0, 1.0)

    def mirrored(self, value: np.ndarray) -> np.ndarray:
        """In a mirror a surface facing right faces left: x (channel 0) changes sign, as 4M's
        ``255 - x`` on its 8-bit normals."""
        value = value.copy()
        value[0] = -value[0]
        return value

    def metric_sums(self, predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """(sum, count) of per-pixel angles in degrees, over pixels whose target has a direction.

        A labeler's zero vector is stored as mid-grey and reads back about 0.007 long; any real
        normal is about 1 long, so a target shorter than 0.5 has no direction to compare with.
        """
        dot = (predictions * targets).sum(axis=1)  # (B, S, S)
        lengths = np.linalg.norm(predictions, axis=1) * np.linalg.norm(targets, axis=1)
        valid = np.linalg.norm(targets, axis=1) > 0.5
        cosine = np.clip(dot[valid] / np.maximum(lengths[valid], 1e-12), -1.0, 1.0)
        return np.array([np.degrees(np.arccos(cosine)).sum(dtype=np.float64), valid.sum()])

    def render(self, value: np.ndarray) -> np.ndarray:
        return ((value.transpose(1, 2, 0) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


EDGE_TOLERANCE = 2
"""Pixels (at 224 px) by which an edge may miss its true position and still count: BSDS-style edge
benchmarks allow a small distance (~0.75% of the diagonal), and a one-pixel shift of a thin edge
would otherwise score zero."""


def edge_counts(predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(matched predicted, predicted, matched true, true) edge pixels of (B, S, S) binary maps: a
    predicted pixel matches when a true edge lies within :data:`EDGE_TOLERANCE` pixels (scaled from
    224 px to the maps' side, at least one), and vice versa. Additive over batches; :func:`edge_f1`
    reads them."""
    tolerance = max(1, round(EDGE_TOLERANCE * targets.shape[-1] / 224))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1,) * 2)
    sums = np.zeros(4, np.float64)
    for guess, truth in zip(predictions.astype(bool), targets.astype(bool), strict=True):
        near_truth = cv2.dilate(truth.astype(np.uint8), kernel).astype(bool)
        near_guess = cv2.dilate(guess.astype(np.uint8), kernel).astype(bool)
        sums += [(guess & near_truth).sum(), guess.sum(), (truth & near_guess).sum(), truth.sum()]
    return sums


def edge_f1(counts: np.ndarray) -> float | None:
    """F1 of edge precision and recall from summed :func:`edge_counts`; None without any edge."""
    matched_guess, guessed, matched_truth, true = counts
    if not guessed and not true:
        return None
    precision = matched_guess / guessed if guessed else 0.0
    recall = matched_truth / true if true else 0.0
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


class EdgeAdapter(FloatMapAdapter):
    """Binary edge maps (Canny's, SAM's instance boundaries), stored as 8-bit PNGs of 0 / 255.

    Trained with binary cross-entropy (edges ~10% of pixels, weighted up by ``EDGE_WEIGHT`` so the
    all-black map is not a cheap minimum) plus a soft Dice term, the usual pairing for thin
    structures; decoded maps are the pixels whose probability passes one half.
    """

    kind = "edge_map"
    channels = 1
    low, high = 0.0, 1.0
    flippable = True
    nearest = True
    metric_name = "edge_f1"

    EDGE_WEIGHT: ClassVar[float] = 4.0

    def parse(self, payload: bytes) -> np.ndarray:
        codes = decode_png(payload)
        if codes.dtype != np.uint8 or codes.ndim != 2:
            raise ValueError(f"expected an 8-bit one-channel PNG, got {codes.dtype} {codes.shape}")
        return (codes > 127).astype(np.float32)[None]  # (1, S, S) of 0 / 1

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = torch.tensor(self.EDGE_WEIGHT, device=output.device)
        bce = F.binary_cross_entropy_with_logits(output, target, pos_weight=weight)
        probability = torch.sigmoid(output)
        dice = 1 - (2 * (probability * target).sum() + 1) / (probability.sum() + target.sum() + 1)
        return bce + dice

    def to_values(self, output: torch.Tensor) -> torch.Tensor:
        return (output > 0).to(torch.float32)  # sigmoid(output) > 1/2

    def metric_sums(self, predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
        return edge_counts(predictions[:, 0] > 0.5, targets[:, 0] > 0.5)

    def metric(self, sums: np.ndarray) -> float | None:
        return edge_f1(sums)

    def render(self, value: np.ndarray) -> np.ndarray:
        return np.repeat((value[0] > 0.5).astype(np.uint8)[:, :, None] * 255, 3, axis=2)


class ClassEmbedding(nn.Module):
    """(B, S, S) class ids -> (B, width, S, S): a one-hot 1x1 convolution without the one-hot."""

    def __init__(self, classes: int, width: int):
        super().__init__()
        self.classes = classes
        self.table = nn.Embedding(classes + 1, width)  # row ``classes``: no class (255)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.where(ids == NO_CLASS, self.classes, ids)
        # contiguous: convolutions on the permuted view fall back to a slow, copying kernel
        return self.table(ids).permute(0, 3, 1, 2).contiguous()  # (B, S, S, width) -> (B, width, S, S)


_PALETTE = np.random.default_rng(0).integers(40, 256, size=(256, 3), dtype=np.uint8)
_PALETTE[NO_CLASS] = 0  # no class: black


@dataclass(frozen=True, kw_only=True)
class ClassMapAdapter(MapAdapter):
    """Class-id maps; decoded maps are the argmax over classes, so they never say "no class"."""

    classes: int = len(COCO_PANOPTIC)

    kind = "class_map"
    dtype = np.int64
    flippable = True
    nearest = True
    metric_name = "miou"

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.size, self.size)

    @property
    def expected(self) -> str:
        return f"int64 {self.shape} of class ids in [0, {self.classes}) or {NO_CLASS} (no class)"

    @classmethod
    def params_of(cls, schema: pa.Schema) -> dict[str, Any]:
        names = (schema.metadata or {}).get(b"four_m.classes")
        if names is None:
            raise TokenizerInputError("class_map: the label file has no four_m.classes metadata (its class names)")
        return {"classes": len(json.loads(names))}

    def parse(self, payload: bytes) -> np.ndarray:
        ids = decode_png(payload)
        if ids.dtype != np.uint8 or ids.ndim != 2:
            raise ValueError(f"expected an 8-bit one-channel PNG, got {ids.dtype} {ids.shape}")
        return ids.astype(np.int64)

    def _range_problem(self, value: np.ndarray) -> str | None:
        bad = (value < 0) | ((value >= self.classes) & (value != NO_CLASS))
        return f"class ids {np.unique(value[bad])[:5].tolist()}" if bad.any() else None

    def input_layer(self, width: int) -> nn.Module:
        return ClassEmbedding(self.classes, width)

    def head(self, width: int) -> nn.Module:
        # A per-pixel classifier, the mirror of the embedding: a 3x3 conv to 133 channels at full
        # resolution would cost more than the rest of the model.
        return nn.Conv2d(width, self.classes, 1)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Summed then divided by the labelled pixels: the mean alone is NaN for a batch without any.
        summed = F.cross_entropy(output, target, ignore_index=NO_CLASS, reduction="sum")
        return summed / (target != NO_CLASS).sum().clamp_min(1)

    def to_values(self, output: torch.Tensor) -> torch.Tensor:
        return output.argmax(dim=1)

    def metric_sums(self, predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Per class: (intersection, target area, predicted area) over labelled pixels, flattened."""
        labelled = targets != NO_CLASS
        truth, guess = targets[labelled], predictions[labelled]
        areas = [truth[truth == guess], truth, guess]
        return np.concatenate([np.bincount(a, minlength=self.classes)[: self.classes] for a in areas])

    def metric(self, sums: np.ndarray) -> float | None:
        """Mean IoU over the classes present in the targets."""
        intersection, truth, guess = sums.reshape(3, self.classes).astype(np.float64)
        present = truth > 0
        if not present.any():
            return None
        return float((intersection[present] / (truth + guess - intersection)[present]).mean())

    def render(self, value: np.ndarray) -> np.ndarray:
        return _PALETTE[value]


FEATURE_SHAPE = b"four_m.feature_shape"
"""A feature-map label file's (grid, grid, dim), written by its labeler's provenance ("16x16x768")."""
LEGACY_FEATURE_SHAPE = b"four_m.clip_shape"
"""The same, as clip label files wrote it before the feature-map kind had a second modality."""


def feature_shape(metadata: Mapping[bytes, bytes] | None, modality: str | None = None) -> tuple[int, int, int]:
    """(rows, columns, dim) of a feature-map label file, from its schema's metadata.

    ``modality`` names the file in errors; without it, the file's own ``four_m.modality`` does.
    """
    metadata = metadata or {}
    name = modality or metadata.get(b"four_m.modality", b"feature map").decode()
    shape = metadata.get(FEATURE_SHAPE, metadata.get(LEGACY_FEATURE_SHAPE))
    if shape is None:
        raise TokenizerInputError(f"{name}: the label file has no four_m.feature_shape metadata (like 16x16x768)")
    try:
        rows, columns, dim = (int(n) for n in shape.split(b"x"))
    except ValueError:
        raise TokenizerInputError(f"{name}: four_m.feature_shape {shape.decode()!r} is not like 16x16x768") from None
    return rows, columns, dim


@dataclass(frozen=True, kw_only=True)
class FeatureMapAdapter(FloatMapAdapter):
    """Dense patch features (CLIP, DINOv2); their grid is the token grid, so ``size`` is that grid
    (no resampling).

    Not flipped in tokenizer training: the features of a mirrored image are not the mirrored
    features. Crops are cut from the label view's grid and resampled bilinearly to the grid, and a
    mirrored crop mirrors the grid: an approximation of 4M, which runs the feature network on every
    crop (here the network runs once per image, in the label stage).
    """

    size: int = 14
    """4M's CLIP-B/16 grid; ``ADAPTERS`` gives each modality its tokenizer's grid instead."""
    dim: int = 512
    """CLIP-B/16's projection width, until a label file gives its own (``params_of``)."""

    kind = "feature_map"
    low, high = -math.inf, math.inf
    flippable = False
    on_grid = True
    metric_name = "cosine"

    @property
    def channels(self) -> int:
        return self.dim

    @classmethod
    def params_of(cls, schema: pa.Schema) -> dict[str, Any]:
        return {"dim": feature_shape(schema.metadata)[2]}

    @classmethod
    def registry_settings(cls, spec: ModalitySpec) -> dict[str, Any]:
        # The features already sit on the token grid: 14 x 14 for CLIP-B/16, 16 x 16 for DINOv2-B/14.
        return {"size": spec.tokenizer_config.grid}

    def _payloads(self, table: pa.Table) -> list[Any]:
        """(G, G, D) float16 arrays, None for null rows, without a Python float per feature."""
        shape = feature_shape(table.schema.metadata, self.modality)
        column = table[self.column].combine_chunks()
        present = ~column.is_null().to_numpy(zero_copy_only=False)
        flat = column.flatten().to_numpy(zero_copy_only=False)  # nulls left out
        if flat.size != present.sum() * math.prod(shape):
            raise TokenizerInputError(
                f"{self.modality}: {flat.size} features in {present.sum()} rows; "
                f"expected {'x'.join(map(str, shape))} per row"
            )
        rows = iter(flat.reshape(-1, *shape))
        return [next(rows) if here else None for here in present]

    def parse(self, payload: np.ndarray) -> np.ndarray:
        return payload.transpose(2, 0, 1).astype(np.float32)  # (G, G, D) -> (D, G, G)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (1 - F.cosine_similarity(output, target, dim=1)).mean() + F.mse_loss(output, target)

    def metric_sums(self, predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """(sum, count) of the cosine similarity of each grid cell's feature vector."""
        dot = (predictions * targets).sum(axis=1)  # (B, G, G)
        lengths = np.linalg.norm(predictions, axis=1) * np.linalg.norm(targets, axis=1)
        cosine = dot / np.maximum(lengths, 1e-12)
        return np.array([cosine.sum(dtype=np.float64), cosine.size])

    def render(self, value: np.ndarray) -> np.ndarray:
        """The first three principal components of the features, as colours, at the grid's size."""
        dim, rows, columns = value.shape
        features = value.reshape(dim, -1).T  # (G*G, D)
        centred = features - features.mean(0)
        _, _, components = np.linalg.svd(centred, full_matrices=False)
        projected = centred @ components[:3].T  # (G*G, <=3)
        projected = (projected - projected.min(0)) / (np.ptp(projected, 0) + 1e-6)
        colours = np.zeros((len(features), 3), np.float32)
        colours[:, : projected.shape[1]] = projected
        return (colours.reshape(rows, columns, 3) * 255).astype(np.uint8)


ADAPTER_KINDS: Mapping[str, type[MapAdapter]] = MappingProxyType(
    {
        a.kind: a
        for a in (
            ImageAdapter,
            ContinuousMapAdapter,
            DirectionMapAdapter,
            ClassMapAdapter,
            FeatureMapAdapter,
            EdgeAdapter,
        )
    }
)
"""Map kind -> its adapter class: the one place a kind's behaviour is written."""

ADAPTERS: Mapping[str, MapAdapter] = MappingProxyType(
    {
        name: ADAPTER_KINDS[spec.kind](
            modality=name, column=spec.column, **ADAPTER_KINDS[spec.kind].registry_settings(spec)
        )
        for name, spec in MODALITIES.items()
        if spec.layout == "map"
    }
)
"""Map modality -> its kind's adapter at 4M's settings. Read-only: use ``configured`` for other settings."""


def configured(modality: str, size: int, params: Mapping[str, Any]) -> MapAdapter:
    """The registry's adapter for ``modality`` at ``size`` with ``params`` (e.g. ``{"classes": 5}``)."""
    if modality not in ADAPTERS:
        raise UserError(f"no VQ adapter for {modality!r}; known: {', '.join(ADAPTERS)}")
    adapter = ADAPTERS[modality]
    unknown = sorted(set(params) - set(adapter.params()))
    if unknown:
        raise UserError(f"{modality}: unknown adapter params {unknown}; known: {sorted(adapter.params())}")
    return replace(adapter, size=size, **params)
