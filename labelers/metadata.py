"""Image metadata labels (4M-21): raw values per key, from the image, its url-list row and this
run's other labels. An algorithm over its inputs: as real as they are (counts of a random-init
detector's boxes are noise; brightness is not).

What each key is computed from (keys whose source did not run, or failed for the row, are absent):

=========================  ====================================================================
key                        value
=========================  ====================================================================
original_width / _height   the downloaded photo's size before resizing (img2dataset's record)
caption_n_chars / _words   the caption's characters, whitespace-separated words, and sentences
/ _sentences               (runs ending in . ! ?; a caption without one is one sentence)
n_humans                   ``det`` boxes of class person
n_coco_instances           ``det`` boxes; coco_instance_diversity: their distinct classes
n_sam_instances            ``sam_instance`` masks
colorfulness               Hasler and Süsstrunk's M3 on 0-255 RGB (~0 grey, >100 very colourful)
brightness / contrast      mean / standard deviation of the grey level (0-255)
saturation                 mean HSV saturation (0-255)
entropy                    Shannon entropy of the grey-level histogram, in bits (0-8)
walkability                ``semseg``: share of labelled pixels of ground classes one can walk on
objectness                 ``semseg``: share of labelled pixels of "thing" classes (COCO's 80)
semantic_diversity         ``semseg``: distinct classes present
geometric_complexity       ``normal``: circular variance of the normals, 1 - |mean unit normal|
                           (0 for a plane, near 1 for normals in every direction)
=========================  ====================================================================

Left out, for want of their networks: occlusion_score (amodal masks), watermark_score (a
watermark classifier) and aesthetic_score (an aesthetic predictor). The semseg keys read class ids
as COCO panoptic's 133 (4M's semseg classes).
"""

from __future__ import annotations

import re
from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from four_m.core.coco import COCO_PANOPTIC, COCO_THINGS, NO_CLASS
from four_m.core.label_codec import decode_png
from four_m.labelers.base import DerivedLabeler, LabelBatch
from four_m.modalities.metadata import KEYS, MetadataConfig

WALKABLE = frozenset(
    {
        "floor-wood",
        "floor-other-merged",
        "pavement-merged",
        "road",
        "grass-merged",
        "dirt-merged",
        "sand",
        "gravel",
        "playingfield",
        "platform",
        "railroad",
        "rug-merged",
        "snow",
        "stairs",
    }
)
"""COCO panoptic classes of ground a person can walk on."""
_WALKABLE_IDS = np.array([name in WALKABLE for name in COCO_PANOPTIC] + [False] * (256 - len(COCO_PANOPTIC)))
_THING_IDS = np.arange(256) < len(COCO_THINGS)  # panoptic ids 0..79 are the things
_SENTENCE = re.compile(r"[^.!?]*[^.!?\s][^.!?]*(?:[.!?]+|$)")


def image_statistics(rgb: np.ndarray) -> dict[str, float]:
    """The keys an (S, S, 3) uint8 RGB image alone gives."""
    pixels = rgb.astype(np.float64)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    rg, yb = red - green, (red + green) / 2 - blue
    colorfulness = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    histogram = np.bincount(grey.reshape(-1), minlength=256) / grey.size
    present = histogram[histogram > 0]
    return {
        "colorfulness": float(colorfulness),
        "brightness": float(grey.mean()),
        "contrast": float(grey.std()),
        "saturation": float(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1].mean()),
        "entropy": float(-(present * np.log2(present)).sum()),
    }


def caption_statistics(caption: str) -> dict[str, float]:
    text = caption.strip()
    return {
        "caption_n_chars": float(len(text)),
        "caption_n_words": float(len(text.split())),
        "caption_n_sentences": float(max(1, len(_SENTENCE.findall(text))) if text else 0),
    }


def box_statistics(boxes: list[dict[str, Any]]) -> dict[str, float]:
    classes = [box["class"] for box in boxes]
    return {
        "n_humans": float(classes.count("person")),
        "n_coco_instances": float(len(classes)),
        "coco_instance_diversity": float(len(set(classes))),
    }


def semseg_statistics(ids: np.ndarray) -> dict[str, float]:
    labelled = ids[ids != NO_CLASS]
    if not labelled.size:
        return {"semantic_diversity": 0.0}
    return {
        "walkability": float(_WALKABLE_IDS[labelled].mean()),
        "objectness": float(_THING_IDS[labelled].mean()),
        "semantic_diversity": float(len(np.unique(labelled))),
    }


def normal_statistics(colours: np.ndarray) -> dict[str, float]:
    normals = colours.reshape(-1, 3).astype(np.float64) / 127.5 - 1
    lengths = np.linalg.norm(normals, axis=1)
    unit = normals[lengths > 0.5] / lengths[lengths > 0.5, None]  # mid-grey: no direction
    return {"geometric_complexity": float(1 - np.linalg.norm(unit.mean(0)))} if len(unit) else {}


class MetadataLabeler(DerivedLabeler):
    name = "metadata"
    version = "1"
    cfg: MetadataConfig

    def schema(self) -> pa.Schema:
        return pa.schema([pa.field("metadata", pa.struct([(key, pa.float64()) for key in KEYS]))])

    def provenance(self) -> dict[str, str]:
        return {**super().provenance(), "caption_source": self.cfg.caption_source}

    def label_batch(self, batch: LabelBatch) -> list[dict[str, Any]]:
        return [{"metadata": self._row(batch, row)} for row in range(len(batch))]

    def _row(self, batch: LabelBatch, row: int) -> dict[str, float | None]:
        found: dict[str, float] = image_statistics(batch.pixels[row])
        size = batch.original_sizes[row] if batch.original_sizes else None
        if size is not None:
            found |= {"original_width": float(size[0]), "original_height": float(size[1])}
        caption = self._caption(batch, row)
        if caption is not None:
            found |= caption_statistics(caption)
        if (det := self._label(batch, "det", row)) is not None:
            found |= box_statistics(det["det"] or [])
        if (sam := self._label(batch, "sam_instance", row)) is not None:
            found["n_sam_instances"] = float(len(sam["sam_instance"] or []))
        if (semseg := self._label(batch, "semseg", row)) is not None:
            found |= semseg_statistics(decode_png(semseg["semseg"]))
        if (normal := self._label(batch, "normal", row)) is not None:
            found |= normal_statistics(decode_png(normal["normal"]))
        return {key: found.get(key) for key in KEYS}

    def _caption(self, batch: LabelBatch, row: int) -> str | None:
        if self.cfg.caption_source == "alt_text":
            text = batch.alt_texts[row] if batch.alt_texts else None
        else:
            text = (self._label(batch, "caption", row) or {}).get("caption")
        return text if isinstance(text, str) and text.strip() else None

    @staticmethod
    def _label(batch: LabelBatch, source: str, row: int) -> dict[str, Any] | None:
        rows = batch.labels.get(source)
        return rows[row] if rows is not None else None
