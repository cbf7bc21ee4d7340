"""watermark: a watermark probability from a linear probe on the CLIP image embedding.

LAION's own watermark detector is an EfficientNet on pixels; a probe on the embedding that is
already stored costs nothing more to run, and is what this filter declares: a logistic head (one
linear layer, a probability out) whose weights a user trains on labelled watermarks (a safetensors
file, ``curate.watermark.model``). Without them it is random-init and says so."""

from __future__ import annotations

from four_m.core.curation import FilterSpec, HeadConfig
from four_m.filters.heads import Head, HeadScorer

FILTER = FilterSpec(
    name="watermark",
    phase="label",
    kind="keep_at_most",
    implementation="four_m.filters.watermark:Watermark",
    config=HeadConfig(threshold=0.8),
    reads=("clip",),
    columns=("clip_embedding",),
    score="probability the photo carries a watermark",
)


class Watermark(HeadScorer):
    head = Head(hidden=(), activation="sigmoid_out")
