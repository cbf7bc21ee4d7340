"""semantic_duplicate: different photos of the same thing (SemDeDup on CLIP image embeddings).

SemDeDup (Abbas et al. 2023) and NeMo Curator: k-means on the embeddings, then, inside each
cluster, pairs whose cosine distance is at most ``threshold`` are duplicates. Here the centroids
are fitted on a bounded sample (``fit_sample``) and each shard's rows are bucketed by their
nearest centroid in a task of their own, so no process ever holds every embedding; a cluster's
pairs are compared in its shuffle partition. SemDeDup removed 50 % of LAION-440M at eps 0.07 (on
its own embeddings) with no loss of accuracy.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from four_m.core.curation import FilterSpec, SemanticConfig
from four_m.filters.base import DuplicateScorer, Rows

FILTER = FilterSpec(
    name="semantic_duplicate",
    phase="label",
    kind="duplicate",
    implementation="four_m.filters.semantic_duplicate:SemanticDuplicate",
    config=SemanticConfig(threshold=0.07),
    reads=("clip",),
    columns=("clip_embedding",),
    score="cosine distance of CLIP image embeddings within a k-means cluster",
)


class SemanticDuplicate(DuplicateScorer):
    value_type = pa.list_(pa.float16())

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.centroids: np.ndarray | None = None

    def values(self, rows: Rows) -> list:
        return rows.labels["clip"]["clip_embedding"].to_pylist()

    def as_array(self, values: pa.ChunkedArray | pa.Array) -> np.ndarray:
        chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
        flat = [np.asarray(c.flatten().to_numpy(zero_copy_only=False), np.float32) for c in chunks]
        width = values.type.list_size if isinstance(values.type, pa.FixedSizeListType) else None
        joined = np.concatenate(flat) if flat else np.zeros(0, np.float32)
        rows = len(values)
        vectors = joined.reshape(rows, width or (joined.size // max(rows, 1)))
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def fit(self, sample: np.ndarray) -> None:
        """Spherical k-means (cosine), seeded, on the sample; k is at most the sample's rows."""
        if not len(sample):
            return  # nothing to search: no bucketing task will ask
        rng = np.random.default_rng(self.cfg.seed)
        k = max(1, min(self.cfg.clusters, len(sample)))
        centroids = sample[rng.choice(len(sample), k, replace=False)]
        for _ in range(self.cfg.iterations):
            nearest = np.argmax(sample @ centroids.T, axis=1)
            for c in range(k):
                members = sample[nearest == c]
                if len(members):
                    mean = members.sum(axis=0)
                    centroids[c] = mean / max(np.linalg.norm(mean), 1e-12)
        self.centroids = centroids

    def state(self) -> np.ndarray | None:
        return self.centroids

    def load_state(self, state: np.ndarray | None) -> None:
        self.centroids = state

    def buckets(self, signatures: np.ndarray) -> np.ndarray:
        return np.argmax(signatures @ self.centroids.T, axis=1).astype(np.int64)[:, None]

    def distances(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        return (1.0 - np.einsum("ij,ij->i", left, right)).astype(np.float64)
