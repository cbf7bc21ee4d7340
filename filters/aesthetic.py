"""aesthetic: LAION's improved aesthetic predictor, a linear MLP on the CLIP image embedding
(1024, 128, 64, 16 then 1; trained on SAC, LAION-Logos and AVA ratings, 1-10). LAION-Aesthetics
kept scores >= 5, 6 or 6.5; its published weights expect CLIP ViT-L/14 embeddings (768 wide)."""

from __future__ import annotations

from four_m.core.curation import FilterSpec, HeadConfig
from four_m.filters.heads import Head, HeadScorer

FILTER = FilterSpec(
    name="aesthetic",
    phase="label",
    kind="keep_at_least",
    implementation="four_m.filters.aesthetic:Aesthetic",
    config=HeadConfig(threshold=5.0),
    reads=("clip",),
    columns=("clip_embedding",),
    score="predicted aesthetic rating (1-10)",
)


class Aesthetic(HeadScorer):
    head = Head(hidden=(1024, 128, 64, 16), activation="none")
