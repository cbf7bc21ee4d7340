"""nsfw: LAION's CLIP-based NSFW detector, an MLP with ReLUs on the CLIP image embedding
(1024, 2048, 1024, 256 hidden, a probability out). LAION-5B marked rows with p >= 0.5 unsafe; here
rows above the threshold are removed."""

from __future__ import annotations

from four_m.core.curation import FilterSpec, HeadConfig
from four_m.filters.heads import Head, HeadScorer

FILTER = FilterSpec(
    name="nsfw",
    phase="label",
    kind="keep_at_most",
    implementation="four_m.filters.nsfw:Nsfw",
    config=HeadConfig(threshold=0.5),
    reads=("clip",),
    columns=("clip_embedding",),
    score="probability the photo is not safe for work",
)


class Nsfw(HeadScorer):
    head = Head(hidden=(1024, 2048, 1024, 256), activation="sigmoid_out")
