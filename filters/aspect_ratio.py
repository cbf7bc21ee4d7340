"""aspect_ratio: panoramas, banners and strips (longer side over shorter side of the original).

4M trains on square crops of the centred square; past about 3:1 that square is a small part of
the photo (img2dataset's own ``max_aspect_ratio`` serves the same purpose at download time).
"""

from __future__ import annotations

from four_m.core.curation import FilterConfig, FilterSpec
from four_m.filters.base import Rows, Scorer

FILTER = FilterSpec(
    name="aspect_ratio",
    phase="image",
    kind="keep_at_most",
    implementation="four_m.filters.aspect_ratio:AspectRatio",
    config=FilterConfig(threshold=3.0),
    score="longer side / shorter side of the original photo",
)


class AspectRatio(Scorer):
    def values(self, rows: Rows) -> list[float | None]:
        return [max(size) / min(size) if size and min(size) > 0 else None for size in rows.sizes]

    def missing(self, rows: Rows, index: int) -> str | None:
        return super().missing(rows, index) or (None if rows.sizes[index] else "original size not recorded")
