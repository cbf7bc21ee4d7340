"""The base of the feature-map labelers (CLIP, DINOv2): patch features stored as one flat float16
list per image, row-major (patch row, patch column, channel), its (grid, grid, dim) shape in the
files' ``four_m.feature_shape``, which the ``feature_map`` kind's readers unflatten by."""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import numpy as np
import pyarrow as pa

from four_m.labelers.pretrained import PretrainedLabeler


class FeatureMapLabeler(PretrainedLabeler):
    @abstractmethod
    def patch_and_dim(self) -> tuple[int, int]:
        """(patch size, feature width) of the configured model, read from its config (no weights)."""

    def shape(self) -> tuple[int, int, int]:
        """(grid, grid, dim) of one image's features: the patch grid the input size gives."""
        patch, dim = self.patch_and_dim()
        grid = self.cfg.input_size // patch
        return grid, grid, dim

    def schema(self) -> pa.Schema:
        return pa.schema([pa.field(self.name, pa.list_(pa.float16(), math.prod(self.shape())))])

    def provenance(self) -> dict[str, str]:
        return {**super().provenance(), "feature_shape": "x".join(map(str, self.shape()))}

    def payloads(self, flat: np.ndarray) -> list[dict[str, Any]]:
        """(B, grid * grid * dim) float16 features -> one payload per image."""
        return [{self.name: row} for row in flat]
