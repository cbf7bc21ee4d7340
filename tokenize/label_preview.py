"""``make preview``: a PNG grid to look at the labels: image | depth | normals | segmentation | boxes | CLIP | caption.

One renderer per kind of modality (a mapping, not a chain of ifs), each turning one stored row into an
RGB tile of the label view's size, so the grid shows exactly what is on disk. Maps are drawn by
the tokenizers' adapters (``tokenize.maps``), which is why this preview lives in ``tokenize/``
beside the token preview rather than in ``labelers/``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw

from four_m.core import storage
from four_m.core.config import Config
from four_m.core.dataset_root import DatasetRoot, atomic_path
from four_m.core.failures import SUCCESS
from four_m.core.label_codec import decode_png, decode_rle
from four_m.core.modalities import MODALITIES, ModalitySpec, labelled_modalities
from four_m.core.provenance import RANDOM_INIT
from four_m.core.views import label_view
from four_m.tokenize.maps import ADAPTERS, feature_shape

Tile = np.ndarray  # (S, S, 3) uint8


def render_continuous(spec: ModalitySpec, row: dict, view: Tile, meta: dict[bytes, bytes]) -> Tile:
    values = decode_png(row[spec.column]).astype(np.float32) / 65535.0
    return ADAPTERS[spec.name].render(values[None])


def render_direction(spec: ModalitySpec, row: dict, view: Tile, meta: dict[bytes, bytes]) -> Tile:
    return decode_png(row[spec.column])  # stored as colours already: (n + 1) / 2


def render_classes(spec: ModalitySpec, row: dict, view: Tile, meta: dict[bytes, bytes]) -> Tile:
    return ADAPTERS[spec.name].render(decode_png(row[spec.column]))


def render_boxes(spec: ModalitySpec, row: dict, view: Tile, meta: dict[bytes, bytes]) -> Tile:
    image = Image.fromarray(view.copy())
    draw = ImageDraw.Draw(image)
    side = view.shape[0]
    for box in row[spec.column]:
        corners = [box["x0"] * side, box["y0"] * side, box["x1"] * side, box["y1"] * side]
        draw.rectangle(corners, outline=(255, 40, 40), width=2)
        score = f" {box['score']:.2f}" if box.get("score") is not None else ""  # decoded boxes have none
        draw.text((corners[0] + 2, corners[1] + 1), f"{box['class']}{score}", fill=(255, 255, 0))
    return np.asarray(image)


def render_features(spec: ModalitySpec, row: dict, view: Tile, meta: dict[bytes, bytes]) -> Tile:
    """The first three principal components of the patch features, as colours."""
    shape = feature_shape(meta, spec.name)
    features = np.asarray(row[spec.column], np.float32).reshape(shape).transpose(2, 0, 1)  # (D, G, G)
    small = ADAPTERS[spec.name].render(features)
    return np.asarray(Image.fromarray(small).resize(view.shape[:2], Image.NEAREST))


def render_text(spec: ModalitySpec, row: dict, view: Tile, meta: dict[bytes, bytes]) -> Tile:
    image = Image.new("RGB", view.shape[:2], (250, 250, 250))
    draw = ImageDraw.Draw(image)
    text = f"{spec.name}: {row[spec.column]}"
    if spec.alt_text:
        text += f"\n\nalt-text: {row.get('alt_text') or ''}"
    wrapped = "\n".join(textwrap.fill(p, width=view.shape[0] // 7) for p in text.split("\n"))
    draw.multiline_text((6, 6), wrapped, fill=(20, 20, 20))
    return np.asarray(image)


def render_edges(spec: ModalitySpec, row: dict, view: Tile, meta: dict[bytes, bytes]) -> Tile:
    return ADAPTERS[spec.name].render((decode_png(row[spec.column]) > 127).astype(np.float32)[None])


def palette_tile(palettes: list, side: int) -> Tile:
    """Swatches: one band per palette (1 to 7 colours, top to bottom), each split among its colours."""
    tile = np.full((side, side, 3), 250, np.uint8)
    bands = max(len(palettes), 1)
    for band, colours in enumerate(palettes):
        rgb = np.asarray(colours, np.uint8).reshape(-1, 3)
        top, bottom = band * side // bands, (band + 1) * side // bands
        edges = np.linspace(0, side, len(rgb) + 1).astype(int)
        for colour, left, right in zip(rgb, edges[:-1], edges[1:], strict=True):
            tile[top : bottom - 1, left:right] = colour
    return tile


def table_tile(entries: Mapping[str, object], side: int) -> Tile:
    """A key/value table (metadata), one line per present key."""
    image = Image.new("RGB", (side, side), (250, 250, 250))
    present = {key: value for key, value in entries.items() if value is not None}
    lines = [f"{key}: {value:.3g}" if isinstance(value, float) else f"{key}: {value}" for key, value in present.items()]
    ImageDraw.Draw(image).multiline_text((4, 4), "\n".join(lines), fill=(20, 20, 20), spacing=1)
    return np.asarray(image)


def render_palette(spec: ModalitySpec, row: dict, view: Tile, meta: dict[bytes, bytes]) -> Tile:
    return palette_tile(row[spec.column], view.shape[0])


def render_metadata(spec: ModalitySpec, row: dict, view: Tile, meta: dict[bytes, bytes]) -> Tile:
    return table_tile({k: v for k, v in row[spec.column].items() if v is not None}, view.shape[0])


def render_instances(spec: ModalitySpec, row: dict, view: Tile, meta: dict[bytes, bytes]) -> Tile:
    """Each instance mask in its own colour over the dimmed view (largest drawn first, so small
    instances stay visible on top)."""
    side = view.shape[0]
    tile = (view.astype(np.float32) * 0.35).astype(np.uint8)
    for index, mask in sorted(enumerate(row[spec.column] or []), key=lambda item: -item[1]["area"]):
        inside = decode_rle(mask["counts"], (side, side))
        tile[inside] = _INSTANCE_COLOURS[index % len(_INSTANCE_COLOURS)]
    return tile


_INSTANCE_COLOURS = np.random.default_rng(1).integers(60, 256, size=(64, 3), dtype=np.uint8)

Renderer = Callable[[ModalitySpec, dict, Tile, dict[bytes, bytes]], Tile]
"""(the modality, its stored row, the label view, the file's metadata) -> RGB tile."""

RENDERERS: Mapping[str, Renderer] = MappingProxyType(
    {
        "continuous_map": render_continuous,
        "direction_map": render_direction,
        "class_map": render_classes,
        "feature_map": render_features,
        "boxes": render_boxes,
        "text": render_text,
        "edge_map": render_edges,
        "palette": render_palette,
        "metadata": render_metadata,
        "instances": render_instances,
    }
)
"""Per labelled kind: how one stored row is drawn."""


def write_label_preview(config: Config, samples: int = 8, shard: int = 0) -> Path:
    """Write ``<root>/preview/labels.png`` for the first ``samples`` labelled rows of one shard."""
    root = DatasetRoot(config.root)
    size = config.label.size
    images = storage.read_table(root / f"images/{shard:05d}.parquet").to_pylist()
    labelled = [MODALITIES[n] for n in labelled_modalities()]
    modalities = [s.name for s in labelled if (root / f"{s.folder}/{shard:05d}.parquet").is_file()]
    tables = {n: storage.read_table(root / f"{MODALITIES[n].folder}/{shard:05d}.parquet") for n in modalities}
    rows = {n: t.to_pylist() for n, t in tables.items()}
    views = {i: label_view(r["jpg"], size) for i, r in enumerate(images) if r["status"] == SUCCESS}
    chosen = [i for i, view in views.items() if view is not None][:samples]
    header = 18
    grid = Image.new("RGB", ((1 + len(modalities)) * size, header + len(chosen) * size), "white")
    draw = ImageDraw.Draw(grid)
    for column, name in enumerate(["image", *modalities]):
        random_init = name in tables and tables[name].schema.metadata.get(b"four_m.model") == RANDOM_INIT.encode()
        draw.text((column * size + 4, 3), f"{name}{' (RANDOM-INIT)' if random_init else ''}", fill=(0, 0, 0))
    for line, index in enumerate(chosen):
        view = views[index]
        tiles = [view] + [_tile(MODALITIES[n], rows[n][index], view, tables[n].schema.metadata) for n in modalities]
        for column, tile in enumerate(tiles):
            grid.paste(Image.fromarray(tile), (column * size, header + line * size))
    out = root / "preview/labels.png"
    with atomic_path(out) as temp, temp.open("wb") as handle:
        grid.save(handle, format="PNG")
    return out


def _tile(spec: ModalitySpec, row: dict, view: Tile, meta: dict[bytes, bytes]) -> Tile:
    if row.get("error"):
        tile = Image.new("RGB", view.shape[:2], (60, 60, 60))
        ImageDraw.Draw(tile).multiline_text((6, 6), textwrap.fill(row["error"], 30), fill=(255, 200, 200))
        return np.asarray(tile)
    return RENDERERS[spec.kind](spec, row, view, meta)
