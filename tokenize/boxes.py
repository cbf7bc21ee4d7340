"""Detections <-> 4M's box sequences, in the vocabulary shared with captions (``tokenize.text``).

A value is one image's boxes, the det labeler's rows: ``{"x0", "y0", "x1", "y1", "class",
"score"}`` with corners in [0, 1] of the image. The sequence is, per box,
``v0=<x0> v1=<y0> v2=<x1> v3=<y1> <class>`` and then ``[EOS]``, where a coordinate ``c`` becomes
bin ``round(c * (bins - 1))`` and decodes to ``bin / (bins - 1)``.

Boxes come nearest-to-the-origin first (by their binned top-left corner, ties by y0, x0, class,
x1, y1), so the order is a function of the tokens alone and the cap drops the farthest boxes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import numpy as np

from four_m.core.crops import Crop
from four_m.tokenize.base import TOKEN_DTYPE, TokenizerInputError
from four_m.tokenize.coded import CodedSequenceTokenizer
from four_m.tokenize.text import CLASS_NAMES, COORDINATE_AXES

CORNERS = ("x0", "y0", "x1", "y1")
"""Box keys in coordinate-axis order: ``CORNERS[a]`` is token ``v{a}=``."""
TOKENS_PER_BOX = len(CORNERS) + 1


class BoxSequenceTokenizer(CodedSequenceTokenizer):
    """One image's boxes <-> coordinate and class tokens of the shared text vocabulary.

    Boxes scoring below ``cfg.min_box_score`` are dropped; a box without a score (``None`` or
    absent, e.g. ground truth or a decoded box) is kept. Scores are not tokenized, so decoded
    boxes carry ``"score": None``. Within the ``cfg.max_tokens`` cap only whole boxes are kept,
    and ``[EOS]`` is always last.
    """

    modality = "boxes"

    def encode(self, values: Sequence[Sequence[Mapping[str, Any]]]) -> list[np.ndarray]:
        out = []
        for boxes in _as_list(values, "a sequence of box lists, one per image"):
            kept = [self._binned(box) for box in _as_list(boxes, "a list of box dicts per image")]
            kept = sorted((b for b in kept if b is not None), key=_nearest_first)
            kept = kept[: (self.max_tokens - 1) // TOKENS_PER_BOX]
            ids = [self._box_ids(corners, name) for corners, name in kept]
            row = np.asarray([i for box_ids in ids for i in box_ids] + [self.text.eos_id], dtype=TOKEN_DTYPE)
            self.check_ids(row, "encode")
            out.append(row)
        return out

    def crop(self, value: Sequence[Mapping[str, Any]], crop: Crop) -> list[dict[str, Any]]:
        return crop_boxes(value, crop)

    def decode(self, ids: Sequence[np.ndarray]) -> list[list[dict[str, Any]]]:
        """Boxes up to the first ``[EOS]``.

        Generated sequences may be malformed: a box is read only from four coordinate tokens in
        axis order followed by a class token; anything else in between (a missing or repeated
        axis, a word, an out-of-vocabulary id) discards the partial box, and reading resumes at
        the next ``v0=`` token.
        """
        coordinates = self.text.coordinate_ids
        classes = self.text.class_ids
        out = []
        for row in ids:
            boxes: list[dict[str, Any]] = []
            pending: list[int] = []
            for i in np.asarray(row).tolist():
                if i == self.text.eos_id:
                    break
                if i in coordinates:
                    axis, bin_ = divmod(i - coordinates.start, self.bins)
                    if axis == len(pending):
                        pending.append(bin_)
                    else:  # out of order: the partial box is garbled; a v0= starts the next one
                        pending = [bin_] if axis == 0 else []
                    continue
                if i in classes and len(pending) == COORDINATE_AXES:
                    boxes.append(self._box(pending, self.text.class_names[i - classes.start]))
                pending = []
            out.append(boxes)
        return out

    def _binned(self, box: Any) -> tuple[tuple[int, ...], str] | None:
        """``(bins of x0, y0, x1, y1), class`` of a box to keep, None for one under the score threshold."""
        if not isinstance(box, Mapping):
            raise TokenizerInputError(f"boxes: expected a dict per box, got {type(box).__name__} {box!r:.80}")
        name = box.get("class")
        if not isinstance(name, str) or name not in CLASS_NAMES:
            raise TokenizerInputError(f"boxes: unknown class {name!r} (expected one of the 80 COCO class names)")
        score = box.get("score")
        if score is not None and _number(score, "score") < self.text.cfg.min_box_score:
            return None
        corners = tuple(self._bin(_number(box.get(key), key)) for key in CORNERS)
        return corners, name

    def _bin(self, value: float) -> int:
        return min(max(round(value * (self.bins - 1)), 0), self.bins - 1)

    def _box_ids(self, corners: tuple[int, ...], name: str) -> list[int]:
        return [self.text.coordinate_id(axis, b) for axis, b in enumerate(corners)] + [self.text.class_id(name)]

    def _box(self, corners: list[int], name: str) -> dict[str, Any]:
        return {
            **{key: b / (self.bins - 1) for key, b in zip(CORNERS, corners, strict=True)},
            "class": name,
            "score": None,
        }


def crop_boxes(boxes: Sequence[Mapping[str, Any]], crop: Crop) -> list[dict[str, Any]]:
    """The boxes of crop ``crop`` of the label view, in the crop's [0, 1] coordinates, as 4M
    re-crops its boxes (albumentations' ``bbox_crop``, then a mirror of x): clipped to the crop,
    dropped when nothing of them is left inside (4M's ``min_visibility`` 0), mirrored with the crop.
    Other keys (class, score) are kept."""
    out = []
    for box in _as_list(boxes, "a list of box dicts per image"):
        if not isinstance(box, Mapping):
            raise TokenizerInputError(f"boxes: expected a dict per box, got {type(box).__name__} {box!r:.80}")
        x0, y0, x1, y1 = (_number(box.get(key), key) for key in CORNERS)
        x0, x1 = (min(max((x - crop.left) / crop.width, 0.0), 1.0) for x in (x0, x1))
        y0, y1 = (min(max((y - crop.top) / crop.height, 0.0), 1.0) for y in (y0, y1))
        if x1 <= x0 or y1 <= y0:
            continue
        if crop.flip:
            x0, x1 = 1.0 - x1, 1.0 - x0
        out.append({**box, "x0": x0, "y0": y0, "x1": x1, "y1": y1})
    return out


def _nearest_first(box: tuple[tuple[int, ...], str]) -> tuple:
    """Squared bin distance of the top-left corner to the origin (exact in integers), then tie-breaks."""
    (x0, y0, x1, y1), name = box
    return x0 * x0 + y0 * y0, y0, x0, name, x1, y1


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise TokenizerInputError(f"boxes: box {key!r} must be a finite number, got {value!r:.80}")
    return float(value)


def _as_list(value: Any, expected: str) -> list:
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence | np.ndarray):
        raise TokenizerInputError(f"boxes: expected {expected}, got {type(value).__name__} {value!r:.80}")
    return list(value)
