"""min_size: photos too small to train on (the shorter side of the original, before resizing).

The download keeps the original width and height (img2dataset's ``original_width`` and
``original_height``); a photo whose shorter side is below the threshold is removed. An upscaled
thumbnail looks like a photo at 256 px but carries none of its detail.
"""

from __future__ import annotations

from four_m.core.curation import FilterConfig, FilterSpec
from four_m.filters.base import Rows, Scorer

FILTER = FilterSpec(
    name="min_size",
    phase="image",
    kind="keep_at_least",
    implementation="four_m.filters.min_size:MinSize",
    config=FilterConfig(threshold=64.0),
    score="shorter side of the original photo (pixels)",
)


class MinSize(Scorer):
    def values(self, rows: Rows) -> list[float | None]:
        return [float(min(size)) if size else None for size in rows.sizes]

    def missing(self, rows: Rows, index: int) -> str | None:
        return super().missing(rows, index) or (None if rows.sizes[index] else "original size not recorded")
