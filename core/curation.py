"""The curation contract: which filters exist, where their decisions live, how a removed row reads.

A *filter* is declared once, in its own module of ``four_m.filters`` (or a plugin's, through the
``four_m.filters`` entry point group), as a :class:`FilterSpec`: its name, when it runs (``image``:
before labelling, from the downloaded bytes, so a duplicate is never labelled; ``label``: after the
labels it reads), what it is (a score kept above or below a threshold, or a duplicate search) and
its default config section (``curate.<name>``). Everything else (the config section, the stage's
work, the report) is derived from the declaration.

The curate stage writes, per ``images/`` shard, ``curation/decisions/<shard>.parquet``: one row per
image and filter, ``key, phase, filter, score, threshold, kept, duplicate_of, error``. Label,
tokenize and the loader read it (only here: this module is the one reader) and skip removed rows,
which keep their place with the error :func:`curated` writes, counted by :func:`curated_reason`.
This module imports no stage and no heavy library: the card and the loader read it too.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from importlib.metadata import entry_points
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from four_m.core import storage
from four_m.core.dataset_root import DatasetRoot, shard_name
from four_m.core.errors import UserError
from four_m.core.failures import ERROR, curated, is_curated

log = logging.getLogger(__name__)
DECISIONS = "curation/decisions"
SCORES = "curation/scores"
PAIRS = "curation/pairs"
STAGE = "curate"
IMAGE, LABEL = "image", "label"
PHASES = (IMAGE, LABEL)
ENTRY_POINTS = "four_m.filters"
BUILT_IN = "four_m.filters"

DECISION_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("phase", pa.string()),
        pa.field("filter", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("threshold", pa.float64()),
        pa.field("kept", pa.bool_()),
        pa.field("duplicate_of", pa.string()),
        pa.field("error", pa.string()),
    ]
)


class FilterError(UserError):
    """A filter declaration that cannot be used; the message names the filter and its origin."""


DECIDES = {"decides": True}
"""Field metadata: a setting that shapes decisions (a threshold, a search's buckets), not the stored
scores, so changing it never scores a row again (``score_settings``)."""
RUNTIME = {"runtime_only": True}
"""Field metadata: a setting that changes neither scores nor decisions (a batch size)."""


@dataclass(frozen=True)
class FilterConfig:
    """``curate.<filter>``: the threshold a decision is made against (the score is stored, so a
    new threshold re-decides without computing anything again)."""

    threshold: float = field(default=0.0, metadata=DECIDES)
    batch_size: int = field(default=64, metadata=RUNTIME)
    """Rows scored together (the embedding heads and image hashing batch their rows)."""


@dataclass(frozen=True)
class DuplicateConfig(FilterConfig):
    """A duplicate search: pairs whose distance is at most ``threshold`` are duplicates; of each
    group of duplicates one image is kept (the one with the most pixels, then the smallest key)."""


@dataclass(frozen=True)
class SemanticConfig(DuplicateConfig):
    """SemDeDup's search: k-means on the embeddings, then pairs within ``threshold`` (cosine
    distance) inside each cluster."""

    clusters: int = field(default=8, metadata=DECIDES)
    """k of the k-means; SemDeDup used 50,000 for LAION-440M (about 10,000 images a cluster)."""
    fit_sample: int = field(default=100_000, metadata=DECIDES)
    """At most this many embeddings fit the centroids, sampled evenly across shards: the driver
    holds only these, never every row's."""
    iterations: int = field(default=25, metadata=DECIDES)
    seed: int = field(default=0, metadata=DECIDES)


@dataclass(frozen=True)
class HeadConfig(FilterConfig):
    """A small head on the CLIP image embedding (aesthetic, NSFW, watermark): production weights
    from a local safetensors file or a hub id at a pinned revision; null builds the same head
    random-init, seeded, and its scores say so."""

    model: str | None = None
    revision: str | None = None


@dataclass(frozen=True)
class FilterSpec:
    """One curation filter, declared once."""

    name: str
    phase: Literal["image", "label"]
    kind: Literal["keep_at_least", "keep_at_most", "duplicate"]
    """``keep_at_least``: a row is kept when its score >= threshold; ``keep_at_most``: <=;
    ``duplicate``: a pairwise search whose threshold is a distance."""
    implementation: str
    """``module:Class`` of its scorer (a :class:`four_m.filters.base.Scorer`), imported where it runs."""
    config: FilterConfig = field(default_factory=FilterConfig)
    reads: tuple[str, ...] = ()
    """The label modalities whose files it reads (a ``label`` filter's inputs)."""
    columns: tuple[str, ...] = ()
    """The columns it reads from those files (beside ``key`` and ``error``): never a whole file."""
    score: str = ""
    """What its score is, with its unit, for reports and cards."""

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise FilterError(f"filter {self.name!r}: phase must be one of {PHASES}, not {self.phase!r}")
        if self.phase == IMAGE and self.reads:
            raise FilterError(f"filter {self.name!r}: an image filter runs before labelling and reads no labels")
        if self.kind == "duplicate" and not isinstance(self.config, DuplicateConfig):
            raise FilterError(f"filter {self.name!r}: a duplicate search takes a DuplicateConfig")


def score_settings(cfg: FilterConfig) -> dict[str, Any]:
    """The settings of a filter that shape its stored scores: what a score shard's hash covers."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if not f.metadata}


def decide_threshold(spec: FilterSpec, score: float, threshold: float) -> bool:
    """Whether a row with ``score`` is kept by a threshold filter at ``threshold``."""
    return score >= threshold if spec.kind == "keep_at_least" else score <= threshold


class _Registry:
    """Every filter: the built-in modules of ``four_m.filters``, then the entry point group's."""

    def __init__(self) -> None:
        self._specs: dict[str, FilterSpec] | None = None

    def _loaded(self) -> dict[str, FilterSpec]:
        if self._specs is None:
            specs: dict[str, FilterSpec] = {}
            for spec in _discover():
                if spec.name in specs:
                    raise FilterError(f"filter {spec.name!r} is declared twice")
                specs[spec.name] = spec
            self._specs = specs
        return self._specs

    def __getitem__(self, name: str) -> FilterSpec:
        return self._loaded()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded())

    def __contains__(self, name: object) -> bool:
        return name in self._loaded()

    def items(self):
        return self._loaded().items()


FILTERS = _Registry()


def _discover() -> list[FilterSpec]:
    """The built-in filters (every module of ``four_m.filters`` with a ``FILTER``; its helper modules
    have none), then each entry point's: a ``FilterSpec`` or a module holding one as ``FILTER``."""
    package = importlib.import_module(BUILT_IN)
    modules = [importlib.import_module(m.name) for m in pkgutil.iter_modules(package.__path__, f"{BUILT_IN}.")]
    found = [m.FILTER for m in modules if isinstance(getattr(m, "FILTER", None), FilterSpec)]
    for point in entry_points(group=ENTRY_POINTS):
        target: Any = point.load()
        spec = getattr(target, "FILTER", target)
        if not isinstance(spec, FilterSpec):
            raise FilterError(f"entry point {point.name} = {point.value}: not a FilterSpec nor a module with FILTER")
        found.append(spec)
    return found


def decisions_file(root: DatasetRoot, shard: int) -> storage.RootPath:
    return root / f"{DECISIONS}/{shard_name(shard)}.parquet"


def removed_rows(root: DatasetRoot, shard: int, phases: tuple[str, ...] = PHASES) -> dict[str, str]:
    """Per removed key of ``shard``, the error its later rows carry (:func:`curated`): the first
    filter in the decisions' order that removed it, among ``phases``. Empty where the shard was
    never curated: curation is a stage one may skip."""
    file = decisions_file(root, shard)
    if not file.is_file():
        return {}
    table = storage.read_table(file, columns=["key", "phase", "filter", "kept", "duplicate_of"])
    mask = pc.and_(pc.invert(pc.fill_null(table["kept"], True)), pc.is_in(table["phase"], pa.array(phases)))
    removed: dict[str, str] = {}
    for row in table.filter(mask).to_pylist():
        removed.setdefault(row["key"], curated(row["filter"], row["duplicate_of"]))
    return removed


def owes_rows(root: DatasetRoot, file: storage.RootPath, shard: int) -> bool:
    """Whether a finished label file skipped rows (``curated``) that the current decisions keep:
    a filter loosened since it was labelled, so the shard must be labelled again. Tightened
    filters never make a shard owe rows: rows removed since stay labelled and later stages skip them."""
    errors = storage.read_table(file, columns=["key", ERROR])
    skipped = [k for k, e in zip(errors["key"].to_pylist(), errors[ERROR].to_pylist(), strict=True) if is_curated(e)]
    if not skipped:
        return False
    removed = removed_rows(root, shard, (IMAGE,))
    return any(key not in removed for key in skipped)
