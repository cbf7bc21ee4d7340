"""``make eval``'s figures: one metric and one trivial baseline per predicted modality, in numpy.

A trained 4M predicts each modality from rgb; its tokens, decoded by the modality's tokenizer, are
values in the form of ``tokenize.maps`` and ``tokenize.boxes`` and are compared here with the
pseudo-labels of a held-out shard. Every metric pools over all samples (pixels, boxes, tokens), so
updating sample by sample gives the same figures as one sample that holds them all; a figure with
nothing to average over is NaN.

One metric and one baseline class per *kind* of modality (``METRIC_KINDS``, ``BASELINE_KINDS``),
named after the kind; every registered modality of the kind gets them, under its own name.

==============  ==========================================  =============================================
kind (4M-7)     prediction and label of one sample          result keys (each result also has ``samples``)
==============  ==========================================  =============================================
continuous_map  float (1, H, W): e.g. normalised inverse    ``abs_rel``, ``delta_1.25`` (of 1 + value)
(depth)         depth
direction_map   float (3, H, W)                             ``angular_error_deg``, ``within_11.25deg``
(normal)
class_map       int (H, W) class ids, 255 = no class        ``miou``, ``pixel_accuracy``
(semseg)
boxes (det)     list of box dicts (``tokenize.boxes``)      ``map_50``
text (caption)  1-D token ids, ``[EOS]`` last               ``token_accuracy``
feature_map     float (D, G, G) features                    ``cosine``
(clip)
edge_map        float (1, H, W) of 0 / 1                    ``edge_f1`` (within 2 px at 224)
(canny_edge)
palette         palettes: lists of flat R, G, B (0-255)     ``delta_e`` (CIEDE2000), ``well_formed``
(color_palette)
metadata        prediction ``{key: bin}``, label raw values ``bin_accuracy``
(metadata)
image (rgb)     float (3, H, W) in [0, 1]                   ``psnr_db`` (per image, then the mean),
                                                            ``abs_error`` (per pixel and channel)
==============  ==========================================  =============================================

Baselines predict one fixed value for every sample, fitted on labels (say, the training shards):
they are the floor a model has to beat, as the tokenizer's own reconstruction is its ceiling.
``results_table`` lays such columns side by side.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from numbers import Real
from types import MappingProxyType
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from four_m.core.coco import COCO_PANOPTIC, NO_CLASS
from four_m.core.errors import UserError
from four_m.core.modalities import MODALITIES
from four_m.tokenize.boxes import CORNERS
from four_m.tokenize.maps import edge_counts, edge_f1
from four_m.tokenize.metadata import binned
from four_m.tokenize.text import EOS, SPECIAL_TOKENS

EOS_ID = SPECIAL_TOKENS.index(EOS)
"""``[EOS]`` in the shared text vocabulary: where a caption ends."""
CONTINUOUS_MAP_OFFSET = 1.0
"""Added to both depth maps before relative errors are taken (see ``ContinuousMapMetric``)."""
DELTA_THRESHOLD = 1.25
DIRECTION_MIN_LENGTH = 0.5
"""A label normal shorter than this has no direction: the labeler's zero vector is stored as
mid-grey and reads back about 0.007 long, while a real normal is about 1 long."""
DIRECTION_CLOSE_DEG = 11.25
BOX_IOU = 0.5


class MetricInputError(UserError):
    """A prediction, label or baseline input that cannot be used; the message names the modality and why."""


class Metric(Protocol):
    """Accumulates one modality's figures, one sample at a time."""

    name: str

    def update(self, prediction: Any, label: Any) -> None: ...

    def result(self) -> dict[str, float]:
        """The figures over every sample so far, and ``samples``: their count."""
        ...


class Baseline(Protocol):
    """Predicts one fixed value of its modality for every sample, fitted on labels."""

    name: str

    def fit(self, labels: Iterable[Any]) -> None:
        """Fit on ``labels`` alone (a refit starts over)."""
        ...

    def predict(self) -> Any: ...


# --- checking inputs ---------------------------------------------------------------------------


def _float_map(name: str, value: Any, channels: int | None, role: str) -> np.ndarray:
    """``value`` as a finite float64 (C, H, W) array, C = ``channels`` where given."""
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 3 or (channels is not None and array.shape[0] != channels):
        wanted = f"({channels}, H, W)" if channels is not None else "(C, H, W)"
        raise MetricInputError(f"{name}: expected a {wanted} {role}, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise MetricInputError(f"{name}: the {role} has non-finite values")
    return array


def _class_map(name: str, value: Any, classes: int, role: str) -> np.ndarray:
    """``value`` as an (H, W) integer array of class ids, or ``NO_CLASS`` where ``role`` is a label."""
    array = np.asarray(value)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise MetricInputError(f"{name}: expected an (H, W) integer {role}, got {array.dtype} {array.shape}")
    bad = (array < 0) | (array >= classes)
    if role == "label":
        bad &= array != NO_CLASS
    if bad.any():
        raise MetricInputError(f"{name}: {role} class ids {np.unique(array[bad])[:5].tolist()} not in [0, {classes})")
    return array.astype(np.int64)


def _same_shape(name: str, prediction: np.ndarray, label: np.ndarray) -> None:
    if prediction.shape != label.shape:
        raise MetricInputError(f"{name}: prediction shape {prediction.shape} differs from label shape {label.shape}")


def _ids(name: str, value: Any, role: str) -> np.ndarray:
    """A 1-D integer id array (an empty one of any dtype is fine)."""
    array = np.asarray(value)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise MetricInputError(f"{name}: expected 1-D integer token ids as the {role}, got {array.dtype} {array.shape}")
    return array.astype(np.int64)


def _until_eos(ids: np.ndarray, eos_id: int) -> np.ndarray:
    """The ids up to and including the first ``[EOS]``: what a decoder would have stopped at."""
    ends = np.flatnonzero(ids == eos_id)
    return ids[: ends[0] + 1] if ends.size else ids


def _number(name: str, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise MetricInputError(f"{name}: {what} must be a finite number, got {value!r:.80}")
    return float(value)


def _boxes(name: str, boxes: Any, role: str) -> tuple[np.ndarray, list[str], list[float]]:
    """One image's box dicts -> corners (N, 4), class names, scores (absent or None: 1.0)."""
    if isinstance(boxes, str | bytes | Mapping) or not isinstance(boxes, Sequence):
        raise MetricInputError(f"{name}: expected a list of box dicts as the {role}, got {type(boxes).__name__}")
    corners, names, scores = [], [], []
    for box in boxes:
        if not isinstance(box, Mapping) or not isinstance(box.get("class"), str):
            raise MetricInputError(f"{name}: expected box dicts with a class name in the {role}, got {box!r:.80}")
        corners.append([_number(name, box.get(key), f"{role} box {key!r}") for key in CORNERS])
        names.append(box["class"])
        score = box.get("score")
        scores.append(1.0 if score is None else _number(name, score, f"{role} box 'score'"))
    return np.asarray(corners, dtype=np.float64).reshape(-1, len(CORNERS)), names, scores


# --- metrics -----------------------------------------------------------------------------------


class _PixelMeans(ABC):
    """Means of per-pixel quantities over the valid pixels of all samples together."""

    name: ClassVar[str]
    keys: ClassVar[tuple[str, ...]]
    channels: ClassVar[int | None]

    def __init__(self) -> None:
        self.samples = 0
        self._sums = np.zeros(len(self.keys))
        self._pixels = 0

    def update(self, prediction: Any, label: Any) -> None:
        predicted = _float_map(self.name, prediction, self.channels, "prediction")
        truth = _float_map(self.name, label, self.channels, "label")
        _same_shape(self.name, predicted, truth)
        quantities = self._per_pixel(predicted, truth)  # (len(keys), valid pixels)
        self._sums += quantities.sum(axis=1)
        self._pixels += quantities.shape[1]
        self.samples += 1

    def result(self) -> dict[str, float]:
        means = self._sums / self._pixels if self._pixels else np.full(len(self.keys), np.nan)
        return {**dict(zip(self.keys, means.tolist(), strict=True)), "samples": self.samples}

    @abstractmethod
    def _per_pixel(self, prediction: np.ndarray, label: np.ndarray) -> np.ndarray:
        """One sample's (C, H, W) maps -> (len(keys), valid pixels) per-pixel quantities."""


class ContinuousMapMetric(_PixelMeans):
    """abs-rel, mean |p - g| / g, and delta, the share of pixels with max(p/g, g/p) < 1.25.

    Labels are relative inverse depth min-max normalised per image to [0, 1] (``labelers.depth``);
    the model predicts the same normalised map. That normalisation already fixes the scale and
    shift relative depth leaves open, so nothing is aligned per image: median or least-squares
    scaling would pardon a prediction for a range the labels pin down. But a normalised map is 0 at
    its farthest pixel, where abs-rel divides by zero, and near 0 over whole far regions (sky),
    where a tiny absolute error becomes a huge relative one. So p and g are the values plus 1, as in
    the depth tokenizer's own metric (``ContinuousMapAdapter.metric_sums``): the tokenizer-ceiling figure is
    the tokenizer's. Read as disparity, 1 + value is a scene whose farthest point is twice as far as
    its nearest: abs-rel is at most 1 per pixel and delta is lenient (a difference of 0.25 passes
    at the far end). Every pixel of such a label is valid (g >= 1).
    """

    name = "continuous_map"
    keys = ("abs_rel", f"delta_{DELTA_THRESHOLD:g}")
    channels = 1

    def _per_pixel(self, prediction: np.ndarray, label: np.ndarray) -> np.ndarray:
        predicted, truth = prediction + CONTINUOUS_MAP_OFFSET, label + CONTINUOUS_MAP_OFFSET
        valid = truth > 0
        predicted, truth = predicted[valid], truth[valid]
        # Without division: a prediction at or below zero is never within the threshold.
        within = (predicted > 0) & (np.maximum(predicted, truth) < DELTA_THRESHOLD * np.minimum(predicted, truth))
        return np.stack([np.abs(predicted - truth) / truth, within])


def _cosines(prediction: np.ndarray, label: np.ndarray) -> np.ndarray:
    """(C, N) vectors -> (N,) cosine similarities; a zero-length vector has cosine 0 with anything."""
    lengths = np.linalg.norm(prediction, axis=0) * np.linalg.norm(label, axis=0)
    return np.clip((prediction * label).sum(axis=0) / np.maximum(lengths, 1e-12), -1.0, 1.0)


class DirectionMapMetric(_PixelMeans):
    """Mean angle in degrees between predicted and label normals, and the share under 11.25 degrees.

    Both are normalised first, so only directions count; pixels whose label has no direction
    (shorter than ``DIRECTION_MIN_LENGTH``) are left out.
    """

    name = "direction_map"
    keys = ("angular_error_deg", f"within_{DIRECTION_CLOSE_DEG:g}deg")
    channels = 3

    def _per_pixel(self, prediction: np.ndarray, label: np.ndarray) -> np.ndarray:
        valid = np.linalg.norm(label, axis=0) > DIRECTION_MIN_LENGTH  # (H, W)
        angles = np.degrees(np.arccos(_cosines(prediction[:, valid], label[:, valid])))
        return np.stack([angles, angles < DIRECTION_CLOSE_DEG])


class FeatureMapMetric(_PixelMeans):
    """Mean cosine similarity of the predicted and label feature vectors at each grid position."""

    name = "feature_map"
    keys = ("cosine",)
    channels = None

    def _per_pixel(self, prediction: np.ndarray, label: np.ndarray) -> np.ndarray:
        return _cosines(prediction.reshape(len(prediction), -1), label.reshape(len(label), -1))[None]


class ImageMetric:
    """PSNR in dB per image (peak 1, as the rgb tokenizer's own figure; a perfect image counts as
    100 dB, its MSE floored at 1e-10), averaged over images; and the mean absolute error per pixel
    and channel. What a ``caption -> rgb`` task is scored by."""

    name = "image"

    def __init__(self) -> None:
        self.samples = 0
        self._psnr = 0.0
        self._abs = 0.0
        self._values = 0

    def update(self, prediction: Any, label: Any) -> None:
        predicted = _float_map(self.name, prediction, 3, "prediction")
        truth = _float_map(self.name, label, 3, "label")
        _same_shape(self.name, predicted, truth)
        error = predicted - truth
        self._psnr += 10 * math.log10(1 / max(float((error**2).mean()), 1e-10))
        self._abs += float(np.abs(error).sum())
        self._values += error.size
        self.samples += 1

    def result(self) -> dict[str, float]:
        if not self.samples:
            return {"psnr_db": math.nan, "abs_error": math.nan, "samples": 0}
        return {"psnr_db": self._psnr / self.samples, "abs_error": self._abs / self._values, "samples": self.samples}


class ClassMapMetric:
    """mIoU and pixel accuracy over all samples' labelled pixels, pooled (torchmetrics' multiclass
    Jaccard index, macro, and accuracy, micro: each sums one confusion matrix over every update).

    The mean runs over the classes seen in the labels or the predictions of the whole set
    (torchmetrics gives a class in neither weight 0): a class predicted but never labelled counts
    with IoU 0 (the tokenizer's own metric averages only over labelled classes). Pixels labelled
    ``NO_CLASS`` (no class) are left out.
    """

    name = "class_map"

    def __init__(self, classes: int = len(COCO_PANOPTIC)) -> None:
        self.classes = classes
        self.samples = 0
        self._pixels = 0  # labelled pixels: with none, both figures are NaN (torchmetrics' accuracy says 0)
        # Inputs are checked by _class_map, whose messages name the modality.
        options = {"num_classes": classes, "ignore_index": NO_CLASS, "validate_args": False}
        self._iou = MulticlassJaccardIndex(average="macro", **options)
        self._accuracy = MulticlassAccuracy(average="micro", **options)

    def update(self, prediction: Any, label: Any) -> None:
        predicted = _class_map(self.name, prediction, self.classes, "prediction")
        truth = _class_map(self.name, label, self.classes, "label")
        _same_shape(self.name, predicted, truth)
        predicted, truth = torch.from_numpy(predicted), torch.from_numpy(truth)
        self._iou.update(predicted, truth)
        self._accuracy.update(predicted, truth)
        self._pixels += int((truth != NO_CLASS).sum())
        self.samples += 1

    def result(self) -> dict[str, float]:
        if not self._pixels:
            return {"miou": math.nan, "pixel_accuracy": math.nan, "samples": self.samples}
        return {
            "miou": float(self._iou.compute()),
            "pixel_accuracy": float(self._accuracy.compute()),
            "samples": self.samples,
        }


def _iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """(P, 4) and (L, 4) corner boxes -> (P, L) intersection over union; 0 where the union is empty."""
    low = np.maximum(boxes[:, None, :2], others[None, :, :2])
    high = np.minimum(boxes[:, None, 2:], others[None, :, 2:])
    intersection = np.clip(high - low, 0, None).prod(axis=2)

    def area(b: np.ndarray) -> np.ndarray:
        return np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)

    union = area(boxes)[:, None] + area(others)[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def _average_precision(hits: np.ndarray, positives: int) -> float:
    """All-point interpolated AP of ranked predictions (True: a true positive) against ``positives`` boxes."""
    true_positives = np.cumsum(hits)
    precision = true_positives / np.arange(1, len(hits) + 1)
    recall = true_positives / positives
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this recall or beyond
    return float((np.diff(recall, prepend=0.0) * envelope).sum())


class BoxesMetric:
    """Box mAP at IoU 0.5: per class, all-point interpolated AP (VOC 2010+), then the mean.

    Within an image, predictions are matched in order of score to the unmatched label box of
    their class with the highest IoU of at least 0.5 (COCO's greedy matching). A prediction without
    a score (decoded boxes carry None) counts as 1.0; ties keep the given order, image after
    image, so unscored predictions are ranked as they come. Label boxes' scores are ignored.
    Classes without label boxes are left out of the mean; with no label box at all, ``map_50``
    is NaN.

    Not torchmetrics' ``MeanAveragePrecision``: it needs a COCO backend (pycocotools or
    faster-coco-eval, compiled packages this project does not otherwise install), and it samples
    precision at COCO's 101 recall points instead of taking the exact area. Measured with
    pycocotools 2.0.11 and torchmetrics 1.9.0: the same figures on this module's tests, but on 20
    random sets of 10 images (two classes, jittered and missed boxes) up to 0.037 apart (0.004
    higher on average), which is more than the gaps ``make eval`` reports between its columns.
    """

    name = "boxes"

    def __init__(self) -> None:
        self.samples = 0
        self._positives: Counter[str] = Counter()
        self._ranked: list[tuple[str, float, int, bool]] = []  # class, score, arrival, true positive

    def update(self, prediction: Any, label: Any) -> None:
        boxes, names, scores = _boxes(self.name, prediction, "prediction")
        label_boxes, label_names, _ = _boxes(self.name, label, "label")
        self._positives.update(label_names)
        overlaps = _iou(boxes, label_boxes)  # (P, L)
        same_class = np.asarray([[n == m for m in label_names] for n in names], dtype=bool).reshape(overlaps.shape)
        candidates = np.where(same_class & (overlaps >= BOX_IOU), overlaps, -1.0)
        for i in sorted(range(len(names)), key=lambda i: -scores[i]):  # stable: ties keep the given order
            best = int(candidates[i].argmax()) if label_names else -1
            hit = best >= 0 and candidates[i, best] >= 0
            if hit:
                candidates[:, best] = -1.0  # matched: no other prediction can take it
            self._ranked.append((names[i], scores[i], len(self._ranked), hit))
        self.samples += 1

    def result(self) -> dict[str, float]:
        ranked = sorted(self._ranked, key=lambda r: (-r[1], r[2]))
        precisions = [
            _average_precision(np.asarray([hit for name, _, _, hit in ranked if name == cls], dtype=bool), count)
            for cls, count in self._positives.items()
        ]
        return {"map_50": float(np.mean(precisions)) if precisions else math.nan, "samples": self.samples}


class TextMetric:
    """Token accuracy: position-wise equal ids over the label's length, ``[EOS]`` included.

    Both sides end at their first ``[EOS]`` (what follows it is not part of the caption, so it can
    neither score nor hide); a prediction shorter than the label misses the rest.
    """

    name = "text"

    def __init__(self, eos_id: int = EOS_ID) -> None:
        self.eos_id = eos_id
        self.samples = 0
        self._correct = 0
        self._tokens = 0

    def update(self, prediction: Any, label: Any) -> None:
        predicted = _until_eos(_ids(self.name, prediction, "prediction"), self.eos_id)
        truth = _until_eos(_ids(self.name, label, "label"), self.eos_id)
        shared = min(len(predicted), len(truth))
        self._correct += int((predicted[:shared] == truth[:shared]).sum())
        self._tokens += len(truth)
        self.samples += 1

    def result(self) -> dict[str, float]:
        accuracy = self._correct / self._tokens if self._tokens else math.nan
        return {"token_accuracy": accuracy, "samples": self.samples}


class EdgeMetric:
    """Edge F1 (``tokenize.maps.edge_counts``): precision and recall of edge pixels within a small
    distance of the other side's edges, pooled over all pixels of all samples."""

    name = "edge_map"

    def __init__(self) -> None:
        self.samples = 0
        self._counts = np.zeros(4)

    def update(self, prediction: Any, label: Any) -> None:
        predicted = _float_map(self.name, prediction, 1, "prediction")
        truth = _float_map(self.name, label, 1, "label")
        _same_shape(self.name, predicted, truth)
        self._counts += edge_counts(predicted[:1] > 0.5, truth[:1] > 0.5)
        self.samples += 1

    def result(self) -> dict[str, float]:
        f1 = edge_f1(self._counts)
        return {"edge_f1": math.nan if f1 is None else f1, "samples": self.samples}


def _palettes(name: str, value: Any, role: str) -> list[np.ndarray]:
    """A palette value (one or several palettes) -> (k, 3) uint8 RGB arrays."""
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise MetricInputError(f"{name}: {role} must be a list of palettes, got {type(value).__name__}")
    found = []
    for colours in value:
        flat = np.asarray(colours, dtype=np.int64).reshape(-1)
        if flat.size == 0 or flat.size % 3 or flat.min() < 0 or flat.max() > 255:
            raise MetricInputError(f"{name}: {role} has a palette that is not RGB colours of 0-255: {flat.tolist()}")
        found.append(flat.reshape(-1, 3).astype(np.uint8))
    return found


def _lab(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab  # scikit-image: only where palettes are scored

    return rgb2lab(rgb[None].astype(np.float64) / 255)[0]


def palette_distance(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean CIEDE2000 between two palettes of one length, colours matched one to one so that the
    sum is least (a palette is a set: its order says only which colour covers more)."""
    from scipy.optimize import linear_sum_assignment
    from skimage.color import deltaE_ciede2000

    costs = deltaE_ciede2000(_lab(predicted)[:, None], _lab(truth)[None])
    rows, columns = linear_sum_assignment(costs)
    return float(costs[rows, columns].mean())


class PaletteMetric:
    """Colour distance of predicted palettes: each predicted palette against the label's stored
    palette of the same length (CIEDE2000 after optimal matching, ``delta_e``, lower is better),
    averaged over the palettes predicted; ``well_formed`` is the share of predictions holding one."""

    name = "palette"

    def __init__(self) -> None:
        self.samples = 0
        self._distances: list[float] = []
        self._formed = 0

    def update(self, prediction: Any, label: Any) -> None:
        truth = {len(p): p for p in _palettes(self.name, label, "label")}
        predicted = [p for p in _palettes(self.name, prediction, "prediction") if len(p) in truth]
        self._distances += [palette_distance(p, truth[len(p)]) for p in predicted]
        self._formed += bool(predicted)
        self.samples += 1

    def result(self) -> dict[str, float]:
        distance = float(np.mean(self._distances)) if self._distances else math.nan
        formed = self._formed / self.samples if self.samples else math.nan
        return {"delta_e": distance, "well_formed": formed, "samples": self.samples}


def _metadata_bins(name: str, value: Any, role: str) -> dict[str, int]:
    """A prediction is already ``{key: bin}`` (decoded tokens); a label holds raw values to bin."""
    if not isinstance(value, Mapping):
        raise MetricInputError(f"{name}: {role} must be a dict of metadata, got {type(value).__name__}")
    if role == "prediction":
        return {k: int(v) for k, v in value.items()}
    return binned(value)


class MetadataMetric:
    """Bin accuracy: the share of the label's keys whose predicted bin is the label's bin (a key
    the prediction lacks is wrong), pooled over all keys of all samples."""

    name = "metadata"

    def __init__(self) -> None:
        self.samples = 0
        self._correct = 0
        self._keys = 0

    def update(self, prediction: Any, label: Any) -> None:
        predicted = _metadata_bins(self.name, prediction, "prediction")
        truth = _metadata_bins(self.name, label, "label")
        self._correct += sum(predicted.get(key) == bin_ for key, bin_ in truth.items())
        self._keys += len(truth)
        self.samples += 1

    def result(self) -> dict[str, float]:
        return {"bin_accuracy": self._correct / self._keys if self._keys else math.nan, "samples": self.samples}


METRIC_KINDS: Mapping[str, type[Metric]] = MappingProxyType(
    {
        "continuous_map": ContinuousMapMetric,
        "direction_map": DirectionMapMetric,
        "class_map": ClassMapMetric,
        "feature_map": FeatureMapMetric,
        "boxes": BoxesMetric,
        "text": TextMetric,
        "edge_map": EdgeMetric,
        "palette": PaletteMetric,
        "metadata": MetadataMetric,
        "image": ImageMetric,
    }
)
"""Kind -> its metric class."""


# --- baselines ---------------------------------------------------------------------------------


def _unfitted(name: str) -> MetricInputError:
    return MetricInputError(f"{name}: the baseline has seen no labels; fit it on at least one")


class _MeanMapBaseline:
    """The per-pixel mean of the labels' valid pixels: the best constant map in squared error."""

    name: ClassVar[str]
    channels: ClassVar[int | None]

    def __init__(self) -> None:
        self._sum: np.ndarray | None = None  # (C, H, W)
        self._count: np.ndarray | None = None  # (H, W) valid labels per pixel

    def fit(self, labels: Iterable[Any]) -> None:
        self._sum = self._count = None
        for label in labels:
            value = _float_map(self.name, label, self.channels, "label")
            if self._sum is None:
                self._sum, self._count = np.zeros_like(value), np.zeros(value.shape[1:])
            _same_shape(self.name, value, self._sum)
            valid = self._valid(value)
            self._sum += np.where(valid, value, 0.0)
            self._count += valid

    def predict(self) -> np.ndarray:
        if self._sum is None:
            raise _unfitted(self.name)
        return (self._sum / np.maximum(self._count, 1)).astype(np.float32)

    def _valid(self, label: np.ndarray) -> np.ndarray:
        return np.ones(label.shape[1:], dtype=bool)


class ImageBaseline(_MeanMapBaseline):
    """The mean image of the labels: a caption -> rgb model must draw more than the average photo."""

    name = "image"
    channels = 3


class ContinuousMapBaseline(_MeanMapBaseline):
    name = "continuous_map"
    channels = 1


class FeatureMapBaseline(_MeanMapBaseline):
    name = "feature_map"
    channels = None


class DirectionMapBaseline(_MeanMapBaseline):
    """The per-pixel mean direction: the mean of the labels with a direction, normalised."""

    name = "direction_map"
    channels = 3

    def predict(self) -> np.ndarray:
        mean = super().predict()
        return mean / np.maximum(np.linalg.norm(mean, axis=0), 1e-12)

    def _valid(self, label: np.ndarray) -> np.ndarray:
        return np.linalg.norm(label, axis=0) > DIRECTION_MIN_LENGTH


class ClassMapBaseline:
    """The per-pixel most frequent labelled class; pixels never labelled get the overall most frequent one."""

    name = "class_map"

    def __init__(self, classes: int = len(COCO_PANOPTIC)) -> None:
        self.classes = classes
        self._counts: np.ndarray | None = None  # (classes, H, W)

    def fit(self, labels: Iterable[Any]) -> None:
        self._counts = None
        for label in labels:
            value = _class_map(self.name, label, self.classes, "label")
            if self._counts is None:
                self._counts = np.zeros((self.classes, *value.shape), dtype=np.int64)
            _same_shape(self.name, value, self._counts[0])
            rows, columns = np.nonzero(value != NO_CLASS)
            self._counts[value[rows, columns], rows, columns] += 1  # each pixel once: no repeated index

    def predict(self) -> np.ndarray:
        if self._counts is None:
            raise _unfitted(self.name)
        overall = self._counts.sum(axis=(1, 2))
        if not overall.any():
            raise MetricInputError(f"{self.name}: the labels have no labelled pixel to fit the baseline on")
        return np.where(self._counts.any(axis=0), self._counts.argmax(axis=0), overall.argmax())


class BoxesBaseline:
    """One box: the most frequent label class, at the mean corners of that class's label boxes, score 1.

    Predicting no boxes would score 0 by construction and say nothing; this box is what the labels
    alone suggest. Labels without any box give no boxes.
    """

    name = "boxes"

    def __init__(self) -> None:
        self._boxes: dict[str, list[np.ndarray]] | None = None

    def fit(self, labels: Iterable[Any]) -> None:
        boxes: dict[str, list[np.ndarray]] = {}
        samples = 0
        for label in labels:
            corners, names, _ = _boxes(self.name, label, "label")
            for box, name in zip(corners, names, strict=True):
                boxes.setdefault(name, []).append(box)
            samples += 1
        self._boxes = boxes if samples else None

    def predict(self) -> list[dict[str, Any]]:
        if self._boxes is None:
            raise _unfitted(self.name)
        if not self._boxes:
            return []
        # Ties go to the class seen first.
        name = max(self._boxes, key=lambda n: len(self._boxes[n]))
        mean = np.mean(self._boxes[name], axis=0)
        return [{**dict(zip(CORNERS, mean.tolist(), strict=True)), "class": name, "score": 1.0}]


class TextBaseline:
    """At each position, the most frequent label token among the labels that reach it, to the first ``[EOS]``.

    Labels that ended earlier do not vote, and ``[EOS]`` is a token like any other, so the
    sequence ends where most captions still running end there. Ties go to the smaller id. A single
    most frequent caption would be no baseline: real captions are almost all distinct.
    """

    name = "text"

    def __init__(self, eos_id: int = EOS_ID) -> None:
        self.eos_id = eos_id
        self._votes: list[Counter[int]] | None = None  # one per position

    def fit(self, labels: Iterable[Any]) -> None:
        votes: list[Counter[int]] = []
        samples = 0
        for label in labels:
            ids = _until_eos(_ids(self.name, label, "label"), self.eos_id).tolist()
            votes.extend(Counter() for _ in range(len(ids) - len(votes)))
            for position, token in enumerate(ids):
                votes[position][token] += 1
            samples += 1
        self._votes = votes if samples else None

    def predict(self) -> np.ndarray:
        if self._votes is None:
            raise _unfitted(self.name)
        ids = []
        for votes in self._votes:
            ids.append(min(votes, key=lambda token: (-votes[token], token)))
            if ids[-1] == self.eos_id:
                break
        else:
            ids.append(self.eos_id)  # every caption ends with [EOS], even one no label ran past
        return np.asarray(ids, dtype=np.int64)


class EdgeBaseline:
    """The pixels where edges are most frequent in the labels, as many as the labels' mean edge
    density: a fixed map with the right amount of edge where edges usually are (a per-pixel mean
    thresholded at one half would be blank, edges being rare everywhere)."""

    name = "edge_map"

    def __init__(self) -> None:
        self._sum: np.ndarray | None = None
        self._samples = 0

    def fit(self, labels: Iterable[Any]) -> None:
        self._sum, self._samples = None, 0
        for label in labels:
            value = _float_map(self.name, label, 1, "label")[0] > 0.5
            self._sum = value.astype(np.float64) if self._sum is None else self._sum + value
            self._samples += 1

    def predict(self) -> np.ndarray:
        if self._sum is None:
            raise _unfitted(self.name)
        count = round(self._sum.sum() / self._samples)
        edges = np.zeros(self._sum.size, np.float32)
        edges[np.argsort(-self._sum.reshape(-1), kind="stable")[:count]] = 1.0
        return edges.reshape(1, *self._sum.shape)


class PaletteBaseline:
    """Per palette length and rank, the mean colour (in CIELAB) of the labels' palettes: the
    average palette of each size."""

    name = "palette"

    def __init__(self) -> None:
        self._sums: dict[int, np.ndarray] = {}
        self._counts: Counter[int] = Counter()

    def fit(self, labels: Iterable[Any]) -> None:
        self._sums, self._counts = {}, Counter()
        for label in labels:
            for palette in _palettes(self.name, label, "label"):
                self._sums[len(palette)] = self._sums.get(len(palette), 0) + _lab(palette)
                self._counts[len(palette)] += 1

    def predict(self) -> list[list[int]]:
        if not self._sums:
            raise _unfitted(self.name)
        from skimage.color import lab2rgb

        found = []
        for length in sorted(self._sums):
            rgb = lab2rgb(self._sums[length][None] / self._counts[length])[0]
            found.append(np.clip(np.round(rgb * 255), 0, 255).astype(int).reshape(-1).tolist())
        return found


class MetadataBaseline:
    """Per key, the labels' most frequent bin (ties to the smaller)."""

    name = "metadata"

    def __init__(self) -> None:
        self._votes: dict[str, Counter[int]] = {}

    def fit(self, labels: Iterable[Any]) -> None:
        self._votes = {}
        for label in labels:
            for key, bin_ in _metadata_bins(self.name, label, "label").items():
                self._votes.setdefault(key, Counter())[bin_] += 1

    def predict(self) -> dict[str, int]:
        if not self._votes:
            raise _unfitted(self.name)
        return {key: min(votes, key=lambda b, votes=votes: (-votes[b], b)) for key, votes in self._votes.items()}


BASELINE_KINDS: Mapping[str, type[Baseline]] = MappingProxyType(
    {
        "continuous_map": ContinuousMapBaseline,
        "direction_map": DirectionMapBaseline,
        "class_map": ClassMapBaseline,
        "feature_map": FeatureMapBaseline,
        "boxes": BoxesBaseline,
        "text": TextBaseline,
        "edge_map": EdgeBaseline,
        "palette": PaletteBaseline,
        "metadata": MetadataBaseline,
        "image": ImageBaseline,
    }
)
"""Kind -> its baseline class."""


def _per_modality(kinds: Mapping[str, type]) -> Mapping[str, type]:
    """Each registered modality of a kind in ``kinds`` -> that kind's class, named after the modality
    (its ``name`` labels messages and results)."""
    return MappingProxyType(
        {
            name: type(kinds[spec.kind].__name__, (kinds[spec.kind],), {"name": name})
            for name, spec in MODALITIES.items()
            if spec.kind in kinds
        }
    )


METRICS: Mapping[str, type[Metric]] = _per_modality(METRIC_KINDS)
"""Predicted modality -> its metric class; ``METRICS[name]()`` starts an empty accumulator."""
BASELINES: Mapping[str, type[Baseline]] = _per_modality(BASELINE_KINDS)
"""Predicted modality -> its baseline class; ``BASELINES[name]()`` is unfitted."""


# --- reporting ---------------------------------------------------------------------------------


def _cell(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "n/a"
    return str(int(value)) if metric == "samples" else f"{value:.4g}"


def _json_number(value: float, metric: str) -> float | int | None:
    return None if math.isnan(value) else int(value) if metric == "samples" else value


def results_table(columns: Mapping[str, Mapping[str, Mapping[str, float]]]) -> tuple[str, dict[str, Any]]:
    """Columns of results side by side: a Markdown table and the same figures as JSON-ready data.

    Args:
        columns: column name (say ``baseline``, ``model``, ``tokenizer ceiling``) -> modality ->
            that modality's ``result()``.

    Returns:
        The table, one row per modality and metric in the order first seen, "-" where a column has
        no such figure and "n/a" where it is NaN; and ``{"columns": [...], "results": {modality:
        {metric: {column: value}}}}`` with NaN as None (JSON has no NaN).
    """
    figures: dict[str, dict[str, dict[str, float]]] = {}
    for column, modalities in columns.items():
        for modality, result in modalities.items():
            for metric, value in result.items():
                figures.setdefault(modality, {}).setdefault(metric, {})[column] = float(value)
    names = list(columns)
    lines = ["| " + " | ".join(["modality", "metric", *names]) + " |", "|" + "---|" * (len(names) + 2)]
    for modality, metrics in figures.items():
        for metric, cells in metrics.items():
            lines.append("| " + " | ".join([modality, metric, *(_cell(cells.get(c), metric) for c in names)]) + " |")
    results = {
        modality: {metric: {c: _json_number(v, metric) for c, v in cells.items()} for metric, cells in metrics.items()}
        for modality, metrics in figures.items()
    }
    return "\n".join(lines) + "\n", {"columns": names, "results": results}
