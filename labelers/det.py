"""Object detection with ultralytics YOLO, COCO's 80 classes: boxes for 4M's ``det`` modality.

Boxes are (x0, y0, x1, y1) normalised to [0, 1] on the label view, with the class name and the
score; boxes under ``score_threshold`` are not stored. The tiny variant is ultralytics' own
``yolov8n.yaml`` with random weights, saved as a ``.pt`` and loaded back with ``YOLO(path)``, the
production loader (which also takes ``yolov8x.pt``-style files). Random-init models name their
classes '0'..'79': those are mapped to COCO's names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from four_m.core.config import DetConfig
from four_m.labelers.base import Labeler
from four_m.labelers.coco import COCO_THINGS

BOX_FORMAT = "x0,y0,x1,y1 in [0,1] of the label view; class name; score"
TINY_ARCHITECTURE = "yolov8n.yaml"
TINY_WEIGHTS = "yolo.pt"
BOX_TYPE = pa.struct(
    [
        ("x0", pa.float32()),
        ("y0", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("class", pa.string()),
        ("score", pa.float32()),
    ]
)


class DetLabeler(Labeler):
    name = "det"
    cfg: DetConfig

    def provenance(self) -> dict[str, str]:
        return {**super().provenance(), "score_threshold": str(self.cfg.score_threshold), "box_format": BOX_FORMAT}

    def schema(self) -> pa.Schema:
        return pa.schema([("det", pa.list_(BOX_TYPE))])

    def build_tiny(self, directory: Path) -> None:
        from ultralytics import YOLO

        YOLO(TINY_ARCHITECTURE).save(directory / TINY_WEIGHTS)

    @property
    def source(self) -> str:
        return self.cfg.model if self.cfg.model is not None else str(self.tiny_dir / TINY_WEIGHTS)

    def fetch(self) -> str:
        """Ultralytics' release assets (yolov8x.pt, yolo11x.pt, ...) are fetched to the configured path."""
        from ultralytics.utils.downloads import attempt_download_asset

        return str(attempt_download_asset(self.cfg.model))

    def load(self, source: str, revision: str | None) -> None:
        from ultralytics import YOLO
        from ultralytics.utils import patches

        # ultralytics' patched Image.open would pip-install pi-heif on the first unknown image.
        patches._pil_plugins_registered = True

        if not Path(source).is_file():
            raise FileNotFoundError(f"no YOLO weights file at {source}")
        self.model = YOLO(source)
        names = self.model.names
        numeric = all(str(names[i]) == str(i) for i in names)
        self.class_names = [COCO_THINGS[i] if numeric else names[i] for i in sorted(names)]

    def label(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        import torch

        # ultralytics' select_device() sets torch's CPU threads to cpu_count - 1 for the whole
        # process (1 on two cores), slowing every other labeler in it: keep the caller's setting.
        threads = torch.get_num_threads()
        try:
            results = self._predict(pixels)
        finally:
            torch.set_num_threads(threads)
        return [{"det": self._boxes(result)} for result in results]

    def _predict(self, pixels: np.ndarray) -> list:
        return self.model.predict(
            [image[:, :, ::-1] for image in pixels],  # ultralytics takes BGR arrays, like cv2
            imgsz=self.cfg.input_size,
            conf=self.cfg.score_threshold,
            max_det=self.cfg.max_boxes,
            device=str(self.device),
            verbose=False,
        )

    def _boxes(self, result) -> list[dict[str, Any]]:
        boxes = result.boxes
        corners = boxes.xyxyn.clamp(0, 1).cpu().numpy()
        return [
            {
                "x0": float(x0),
                "y0": float(y0),
                "x1": float(x1),
                "y1": float(y1),
                "class": self.class_names[int(cls)],
                "score": float(score),
            }
            for (x0, y0, x1, y1), cls, score in zip(
                corners, boxes.cls.cpu().numpy(), boxes.conf.cpu().numpy(), strict=True
            )
        ]
