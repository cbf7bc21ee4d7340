"""What a filter's scorer is: rows in, one score (or duplicate signature) per row out.

The curate stage (``pipeline.curate``) hands a scorer :class:`Rows` of one shard at a time and
stores what it returns; decisions are made later from the stored values, so a new threshold never
runs a scorer again. A scorer that raises on a batch is retried row by row by the stage: the row
that alone fails is counted with its error and kept (a filter that cannot judge a row does not
remove it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from four_m.core.curation import FilterConfig, FilterSpec
from four_m.core.failures import ERROR


@dataclass
class Rows:
    """A batch of one shard's rows, as a scorer reads them."""

    keys: list[str]
    images: list[bytes | None]
    """The stored image bytes; None where the download failed."""
    sizes: list[tuple[int, int] | None]
    """Each photo's (width, height) before the download resized it, where recorded."""
    captions: list[str | None]
    labels: dict[str, pa.Table]
    """Per label modality the filter reads, its rows (a failed label's payload is null)."""

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, index: int) -> Rows:
        """Row ``index`` alone: the stage's fallback when a batch fails."""
        return Rows(
            keys=self.keys[index : index + 1],
            images=self.images[index : index + 1],
            sizes=self.sizes[index : index + 1],
            captions=self.captions[index : index + 1],
            labels={n: t.slice(index, 1) for n, t in self.labels.items()},
        )


class Scorer(ABC):
    """Scores rows for one filter. ``value_type`` is what the stage stores per row."""

    value_type: pa.DataType = pa.float64()
    random_init: bool = False
    """True where the scores come from a network without trained weights (said in every summary)."""

    def __init__(self, spec: FilterSpec, cfg: FilterConfig, models_dir: Path):
        self.spec, self.cfg, self.models_dir = spec, cfg, models_dir

    @abstractmethod
    def values(self, rows: Rows) -> list[Any]:
        """One value per row (None where the row has nothing to score, e.g. no image), or raise."""

    def missing(self, rows: Rows, index: int) -> str | None:
        """Why row ``index`` cannot be scored (no image, no label), or None."""
        if self.spec.phase == "image":
            return None if rows.images[index] is not None else "no image"
        for name in self.spec.reads:
            error = rows.labels[name][ERROR][index].as_py()
            if error:
                return f"no {name} label ({error})"
        return None


class DuplicateScorer(Scorer):
    """A duplicate search's scorer: a signature per row, the buckets a pair must share to be
    compared, and the distance of compared pairs."""

    def fit(self, sample: np.ndarray) -> None:  # noqa: B027 - most searches need no fitting
        """See a sample of stored signatures before bucketing (k-means centroids, say)."""

    def state(self) -> Any:
        """What :meth:`fit` learnt, shipped to the bucketing tasks (None: nothing)."""
        return None

    def load_state(self, state: Any) -> None:  # noqa: B027 - most searches need no fitting
        """Take what :meth:`fit` learnt, in a bucketing task."""

    @abstractmethod
    def buckets(self, signatures: np.ndarray) -> np.ndarray:
        """(rows, b) int64 bucket ids: a pair is compared when it shares one (in the same column)."""

    @abstractmethod
    def distances(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """Distances of the pairs (left[i], right[i])."""

    @abstractmethod
    def as_array(self, values: pa.ChunkedArray | pa.Array) -> np.ndarray:
        """Stored signatures -> the array :meth:`buckets` and :meth:`distances` take."""
