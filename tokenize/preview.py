"""``make preview-tokens``: a PNG grid of what the tokens keep, original beside reconstruction.

For each of a few samples and each tokenized modality: the value as read from ``images/`` or
``labels/`` and the value decoded back from ``tokens/`` by its tokenizer (maps through the VQ
decoder; captions and boxes through the text tokenizer), rendered by the modality's adapter or
as text / drawn boxes. What you see is what the trainer will learn to predict.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw

from four_m.core import storage
from four_m.core.config import Config
from four_m.core.dataset_root import DatasetRoot, atomic_path, shard_name
from four_m.core.failures import SUCCESS
from four_m.core.modalities import MAP_KINDS, MODALITIES, ModalitySpec
from four_m.core.views import label_view
from four_m.tokenize.label_preview import palette_tile, render_boxes, table_tile
from four_m.tokenize.maps import ADAPTERS
from four_m.tokenize.registry import load_tokenizer
from four_m.tokenize.shard import token_file
from four_m.tokenize.sources import read_rows
from four_m.tokenize.store import read_token_rows

HEADER = 18


def write_token_preview(config: Config, samples: int = 6, shard: int = 0) -> Path:
    """Write ``<root>/preview/tokens.png`` for the first ``samples`` rows with an image of one shard."""
    root = DatasetRoot(config.root)
    size = config.label.size
    modalities = [m for m in MODALITIES if m in config.tokenize.modalities and token_file(root, m, shard).is_file()]
    images = storage.read_table(root / f"images/{shard_name(shard)}.parquet", columns=["jpg", "status"]).to_pylist()
    views = {i: label_view(row["jpg"], size) for i, row in enumerate(images) if row["status"] == SUCCESS}
    chosen = [i for i, view in views.items() if view is not None][:samples]
    columns = [f"{m} {kind}" for m in modalities for kind in ("original", "from tokens")]
    grid = Image.new("RGB", (len(columns) * size, HEADER + len(chosen) * size), "white")
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(columns):
        draw.text((column * size + 4, 3), title, fill=(0, 0, 0))
    for m_index, modality in enumerate(modalities):
        rows = read_rows(root, modality, shard, config)
        _, ids = read_token_rows(token_file(root, modality, shard))
        tokenizer = load_tokenizer(root, modality)
        for line, index in enumerate(chosen):
            original, decoded = rows.values[index], None
            if ids[index] is not None:
                (decoded,) = tokenizer.decode([ids[index]])
            for offset, value in enumerate((original, decoded)):
                tile = render_value(modality, value, views[index], size)
                grid.paste(Image.fromarray(tile), ((2 * m_index + offset) * size, HEADER + line * size))
    out = root / "preview/tokens.png"
    with atomic_path(out) as temp, temp.open("wb") as handle:
        grid.save(handle, format="PNG")
    return out


def render_value(modality: str, value, view: np.ndarray, size: int) -> np.ndarray:
    """One modality's value (as a tokenizer decodes it, or as read from labels/) as a size x size RGB tile."""
    if value is None:
        return text_tile("absent", size, background=(60, 60, 60), colour=(255, 200, 200))
    spec = MODALITIES[modality]
    return RENDERERS[spec.kind](spec, value, view, size)


def _render_map(spec: ModalitySpec, value, view: np.ndarray, size: int) -> np.ndarray:
    tile = ADAPTERS[spec.name].render(value)
    return np.asarray(Image.fromarray(tile).resize((size, size), Image.NEAREST))


def text_tile(text: str, size: int, background=(250, 250, 250), colour=(20, 20, 20)) -> np.ndarray:
    image = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(image).multiline_text((6, 6), textwrap.fill(text, width=size // 7), fill=colour)
    return np.asarray(image)


RENDERERS = MappingProxyType(
    {
        **dict.fromkeys(MAP_KINDS, _render_map),
        "boxes": lambda spec, boxes, view, size: render_boxes(spec, {spec.column: boxes}, view, {}),
        "text": lambda spec, text, view, size: text_tile(text, size),
        "palette": lambda spec, palettes, view, size: palette_tile(palettes, size),
        "metadata": lambda spec, entries, view, size: table_tile(entries, size),
    }
)
"""Per kind: (modality, value, the image's label view, tile side) -> RGB tile."""
