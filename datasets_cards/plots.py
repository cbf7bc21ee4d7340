"""The card's pictures: plots drawn from the statistics, and small copies of the root's own images.

Everything the card embeds is written under ``<root>/card/``, so ``README.md`` and ``card/``
render anywhere together (the committed sample card too): plots (matplotlib, Agg) drawn only from
``DatasetStats``, downscaled preview grids, and the training runs' loss curves. A plot without data
(no boxes found, say) is not drawn; the card says why in words.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import matplotlib
import numpy as np
from PIL import Image

from four_m.core.dataset_root import DatasetRoot, atomic_path
from four_m.core.modalities import MODALITIES, ModalitySpec
from four_m.datasets_cards.stats import DatasetStats, LabelerStats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

FOLDER = "card"
TOP_CLASSES = 20
PREVIEW_WIDTH = 1440
"""Preview grids are 3-6k px photo mosaics (one column per modality, two per token modality); this
width keeps a copy of 13-25 columns readable at about 1 MB."""


@dataclass(frozen=True)
class Figure:
    path: str
    """Relative to the root: how README.md links it."""
    caption: str


def write_figures(stats: DatasetStats, root: DatasetRoot) -> dict[str, Figure]:
    """Draw and copy every picture the card shows into ``<root>/card/``; keyed by what it shows.

    Pictures left there by an earlier card that this one does not show are removed.
    """
    folder = root / FOLDER
    figures: dict[str, Figure] = {}
    for modality, labels in stats.labels.items():
        spec = MODALITIES[modality]
        if labels is not None and spec.kind in KIND_PLOTS:
            _, draw, caption = KIND_PLOTS[spec.kind]
            figure = draw(spec, labels)
            if figure is not None:
                figures[plot_key(spec)] = Figure(_save_plot(figure, folder / f"{plot_key(spec)}.png", root), caption)
    for key, (draw, caption) in PLOTS.items():
        figure = draw(stats)
        if figure is not None:
            figures[key] = Figure(_save_plot(figure, folder / f"{key}.png", root), caption)
    for preview in stats.previews:
        name = Path(preview).stem
        figures[f"preview_{name}"] = Figure(
            _save_thumbnail(root / preview, folder / f"preview_{name}.png", root), f"{preview}, downscaled"
        )
    for run in stats.runs:
        curve = root / f"runs/{run.name}/loss.png"
        if curve.is_file():
            with atomic_path(folder / f"loss_{run.name}.png") as temp:
                temp.write_bytes(curve.read_bytes())
            figures[f"loss_{run.name}"] = Figure(f"{FOLDER}/loss_{run.name}.png", f"runs/{run.name}: training loss")
    kept = {root / f.path for f in figures.values()}
    for stale in folder.glob("*.png"):
        if stale not in kept:
            stale.unlink()
    return figures


def _save_plot(figure: plt.Figure, final: Path, root: DatasetRoot) -> str:
    figure.tight_layout()
    with atomic_path(final) as temp:
        with temp.open("wb") as handle:
            figure.savefig(handle, format="png")
    plt.close(figure)
    return final.relative_to(root.path).as_posix()


def _save_thumbnail(source: Path, final: Path, root: DatasetRoot) -> str:
    with source.open("rb") as handle, Image.open(handle) as image:
        image = image.convert("RGB")
        image.thumbnail((PREVIEW_WIDTH, PREVIEW_WIDTH * 4))
        with atomic_path(final) as temp, temp.open("wb") as out:
            image.quantize(256).save(out, format="PNG", optimize=True)  # a palette: a third of the bytes
    return final.relative_to(root.path).as_posix()


def _bars(names: list[str], values: list[float], xlabel: str, title: str) -> plt.Figure:
    figure, axis = plt.subplots(figsize=(6, 0.25 * len(names) + 1.2), dpi=100)
    axis.barh(names[::-1], values[::-1], color="#4c72b0")
    axis.set_xlabel(xlabel)
    axis.set_title(title, fontsize=10)
    axis.grid(axis="x", alpha=0.3)
    return figure


def _boxes_classes(spec: ModalitySpec, labels: LabelerStats) -> plt.Figure | None:
    if not labels.details.get("boxes"):
        return None
    top = list(labels.details["class_boxes"].items())[:TOP_CLASSES]
    title = f"{spec.name}: boxes per class ({labels.sampled_rows} images)"
    return _bars([n for n, _ in top], [v for _, v in top], "boxes", title)


def _class_shares(spec: ModalitySpec, labels: LabelerStats) -> plt.Figure | None:
    if not labels.details.get("class_pixel_share"):
        return None
    top = list(labels.details["class_pixel_share"].items())[:TOP_CLASSES]
    title = f"{spec.name}: share of pixels per class ({labels.sampled_rows} images)"
    return _bars([n for n, _ in top], [100 * v for _, v in top], "% of pixels", title)


def _value_histogram(spec: ModalitySpec, labels: LabelerStats) -> plt.Figure | None:
    if not labels.sampled_rows:
        return None
    counts = np.asarray(labels.details["normalised_histogram"], np.float64)
    edges = np.linspace(0, 1, labels.details["bins"] + 1)
    figure, axis = plt.subplots(figsize=(6, 3), dpi=100)
    axis.bar(edges[:-1], counts / counts.sum(), width=np.diff(edges), align="edge", color="#55a868", edgecolor="white")
    axis.set_xlabel("stored value (0..65535 -> 0..1)")
    axis.set_ylabel("share of pixels")
    axis.set_title(f"{spec.name}: value histogram ({labels.sampled_rows} images)", fontsize=10)
    return figure


def _text_lengths(spec: ModalitySpec, labels: LabelerStats) -> plt.Figure | None:
    if not labels.sampled_rows:
        return None
    figure, axis = plt.subplots(figsize=(6, 3), dpi=100)
    for name, words in labels.details["words"].items():
        histogram = words["histogram"]
        axis.bar([int(k) for k in histogram], list(histogram.values()), alpha=0.6, label=name)
    axis.set_xlabel("words per text")
    axis.set_ylabel("texts")
    axis.legend()
    axis.set_title(f"{spec.name} lengths ({labels.sampled_rows} labelled images)", fontsize=10)
    return figure


def _codebook_usage(stats: DatasetStats) -> plt.Figure | None:
    trained = {m: s.metrics.get("codebook_usage", 0.0) for m, s in stats.tokenizers.items() if s is not None}
    stored = {m: s.ids_used for m, s in stats.tokens.items() if s is not None}
    names = list(dict.fromkeys([*trained, *stored]))
    if not names:
        return None
    x = np.arange(len(names))
    figure, axis = plt.subplots(figsize=(6, 3), dpi=100)
    axis.bar(x - 0.2, [trained.get(m, 0.0) for m in names], 0.4, label="training batches (trained.json)")
    axis.bar(x + 0.2, [stored.get(m, 0.0) for m in names], 0.4, label="stored tokens (ids used / vocabulary)")
    axis.set_xticks(x, names)
    axis.set_ylim(0, 1)
    axis.set_ylabel("share of the vocabulary")
    axis.legend(fontsize=8)
    axis.set_title("codebook usage", fontsize=10)
    return figure


KIND_PLOTS: Mapping[str, tuple[str, Callable[[ModalitySpec, LabelerStats], plt.Figure | None], str]] = MappingProxyType(
    {
        "boxes": ("classes", _boxes_classes, "Boxes per class (most frequent classes)"),
        "class_map": ("classes", _class_shares, "Share of pixels per class (most frequent classes)"),
        "continuous_map": ("values", _value_histogram, "Histogram of the stored, per-image normalised values"),
        "text": ("lengths", _text_lengths, "Words per text (generated, and alt-texts where kept)"),
    }
)
"""Kind -> (the plot's name after the modality's, draw it from the labels' stats or None, caption)."""

PLOTS: dict[str, tuple[Callable[[DatasetStats], plt.Figure | None], str]] = {
    "codebook_usage": (_codebook_usage, "Share of each vocabulary in use: while training, and in the stored tokens"),
}
"""Plots of the whole run: key -> (draw from the stats or return None, caption)."""


def plot_key(spec: ModalitySpec) -> str:
    """The key (and file name) of a modality's label plot: ``depth_values``, ``det_classes``..."""
    return f"{spec.name}_{KIND_PLOTS[spec.kind][0]}" if spec.kind in KIND_PLOTS else ""
