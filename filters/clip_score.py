"""clip_score: how well the caption describes the image (CLIP image-text cosine similarity).

The CLIP labeler embeds each image and its alt-text with both towers of one CLIP model and stores
their cosine similarity (``labels/clip``'s ``caption_similarity``); this filter keeps pairs at or
above the threshold. LAION-400M kept ViT-B/32 scores >= 0.3; DataComp's baseline keeps the top
30 % by ViT-L/14 score (about 0.24-0.28). A random-init CLIP's scores mean nothing: its files say so.
"""

from __future__ import annotations

from four_m.core.curation import FilterConfig, FilterSpec
from four_m.filters.base import Rows, Scorer

FILTER = FilterSpec(
    name="clip_score",
    phase="label",
    kind="keep_at_least",
    implementation="four_m.filters.clip_score:TextImageSimilarity",
    config=FilterConfig(threshold=0.28),
    reads=("clip",),
    columns=("caption_similarity",),
    score="cosine similarity of the CLIP image and caption embeddings",
)


class TextImageSimilarity(Scorer):
    def values(self, rows: Rows) -> list[float | None]:
        return rows.labels["clip"]["caption_similarity"].to_pylist()
