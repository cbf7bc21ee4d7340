"""``make curate-report``: what curation decided, to look at.

Writes under ``<root>/curation/report/``:

- ``scores.png``: per threshold filter, the histogram of its stored scores with its threshold
  drawn (and, for a duplicate search, the histogram of the distances it found within it);
- ``removed.png``: a grid of removed rows, each with its reason and, for a duplicate, the copy
  that was kept beside it.

Reads ``curation/decisions/`` a shard at a time: the histograms are accumulated over fixed bins
(a first pass finds each score's range), so the report's memory does not grow with the rows, and
only the few images shown are decoded.
"""

from __future__ import annotations

import io
import logging
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from four_m.core import storage
from four_m.core.config import Config
from four_m.core.curation import DECISIONS, FILTERS
from four_m.core.dataset_root import DatasetRoot, atomic_path
from four_m.core.errors import UserError
from four_m.pipeline.stage import images_file

log = logging.getLogger(__name__)
REPORT = "curation/report"
BINS = 40
EXAMPLES = 12
"""Removed rows shown in the grid: the first ones, in shard and row order."""


class CurateReportError(UserError):
    """Nothing to report: the curate stage has not run on this root."""


def write_curate_report(config: Config) -> list[storage.RootPath]:
    root = DatasetRoot(config.root)
    files = sorted((root / DECISIONS).glob("[0-9]*.parquet")) if (root / DECISIONS).exists() else []
    if not files:
        raise CurateReportError(f"no decisions under {root / DECISIONS}: run make curate first")
    return [_scores_figure(root, files), _removed_figure(root, files)]


def _scores_figure(root: DatasetRoot, files: list) -> storage.RootPath:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranges: dict[str, list[float]] = {}
    thresholds: dict[str, float] = {}
    for file in files:
        table = storage.read_table(file, columns=["filter", "score", "threshold"]).filter(
            pc.is_valid(pc.field("score"))
        )
        for name in set(table["filter"].to_pylist()):
            scores = table.filter(pc.equal(table["filter"], name))
            low, high = pc.min(scores["score"]).as_py(), pc.max(scores["score"]).as_py()
            ranges.setdefault(name, [low, high])
            ranges[name] = [min(ranges[name][0], low), max(ranges[name][1], high)]
            thresholds[name] = scores["threshold"][0].as_py()
    counts: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(BINS, np.int64))
    edges = {n: np.linspace(lo, max(hi, thresholds[n], lo + 1e-9), BINS + 1) for n, (lo, hi) in ranges.items()}
    for file in files:
        table = storage.read_table(file, columns=["filter", "score"]).filter(pc.is_valid(pc.field("score")))
        for name in edges:
            scores = table.filter(pc.equal(table["filter"], name))["score"].to_numpy()
            counts[name] += np.histogram(scores, bins=edges[name])[0]
    names = [n for n in FILTERS if n in edges]
    figure, axes = plt.subplots(len(names) or 1, 1, figsize=(7, 2.2 * max(len(names), 1)), squeeze=False)
    for axis, name in zip(axes[:, 0], names, strict=False):
        spec = FILTERS[name]
        axis.stairs(counts[name], edges[name], fill=True, alpha=0.6)
        axis.axvline(thresholds[name], color="crimson", linestyle="--", label=f"threshold {thresholds[name]:g}")
        what = "distances of the pairs found" if spec.kind == "duplicate" else spec.kind.replace("_", " ")
        axis.set_title(f"{name}: {spec.score} ({what})", fontsize=8)
        axis.legend(fontsize=7)
    figure.tight_layout()
    return _save(figure, root / f"{REPORT}/scores.png")


def _removed_figure(root: DatasetRoot, files: list) -> storage.RootPath:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    examples: list[dict] = []
    for file in files:
        table = storage.read_table(file).filter(pc.equal(pc.field("kept"), False))
        for row in table.to_pylist():  # a row removed by several filters is shown once, by the first
            if row["key"] not in {e["key"] for e in examples} and len(examples) < EXAMPLES:
                examples.append(row)
    wanted = {e["key"] for e in examples} | {e["duplicate_of"] for e in examples if e["duplicate_of"]}
    images = _images(root, wanted)
    rows = max(len(examples), 1)
    figure, axes = plt.subplots(rows, 2, figsize=(5, 2.4 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for (left, right), example in zip(axes, examples, strict=False):
        score = f", score {example['score']:.3g}" if example["score"] is not None else ""
        _show(left, images.get(example["key"]), f"{example['key']}: removed by {example['filter']}{score}")
        if example["duplicate_of"]:
            _show(right, images.get(example["duplicate_of"]), f"kept: {example['duplicate_of']}")
    if not examples:
        axes[0, 0].set_title("curation removed no row", fontsize=8)
    figure.tight_layout()
    return _save(figure, root / f"{REPORT}/removed.png")


def _images(root: DatasetRoot, keys: set[str]) -> dict[str, np.ndarray]:
    """The decoded images of ``keys``, found shard by shard (only their rows are read whole)."""
    from PIL import Image

    found: dict[str, np.ndarray] = {}
    for file in sorted((root / DECISIONS).glob("[0-9]*.parquet")):
        if len(found) == len(keys):
            break
        image_file = images_file(root, int(file.stem))
        table = storage.read_table(image_file, columns=["key", "jpg"])
        table = table.filter(pc.is_in(table["key"], value_set=pa.array(sorted(keys))))
        for key, data in zip(table["key"].to_pylist(), table["jpg"].to_pylist(), strict=True):
            if data:
                with Image.open(io.BytesIO(data)) as opened:
                    found[key] = np.asarray(opened.convert("RGB"))
    return found


def _show(axis, image: np.ndarray | None, title: str) -> None:
    if image is not None:
        axis.imshow(image)
    axis.set_title(title, fontsize=7)


def _save(figure, final: storage.RootPath) -> storage.RootPath:
    import matplotlib.pyplot as plt

    final.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    with atomic_path(final) as temp:
        temp.write_bytes(buffer.getvalue())
    return final
