"""``make preview-tokens``: PNG grids of what the tokens keep.

``tokens.png``: for each of a few samples and each tokenized modality, the value of crop 0 as read
from ``images/`` or ``labels/`` and the value decoded back from ``tokens/`` by its tokenizer (maps
through the VQ decoder; captions and boxes through the text tokenizer), rendered by the modality's
adapter or as text / drawn boxes. What you see is what the trainer will learn to predict.
``crops.png``: one image's stored crops side by side, for the image and every modality.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw

from four_m.core import storage
from four_m.core.config import Config
from four_m.core.crops import Crop
from four_m.core.dataset_root import DatasetRoot, atomic_path, shard_name
from four_m.core.failures import SUCCESS
from four_m.core.modalities import MAP_KINDS, MODALITIES, ModalitySpec
from four_m.core.storage import RootPath
from four_m.core.views import label_view
from four_m.tokenize.label_preview import palette_tile, render_boxes, table_tile
from four_m.tokenize.maps import ADAPTERS
from four_m.tokenize.registry import load_tokenizer
from four_m.tokenize.shard import token_file
from four_m.tokenize.sources import read_whole_view
from four_m.tokenize.store import read_crops, read_token_rows

HEADER = 18


def write_token_preview(config: Config, samples: int = 6, shard: int = 0) -> Path:
    """Write ``<root>/preview/tokens.png`` for the first ``samples`` rows with an image of one shard:
    crop 0 (the whole label view) as the tokenizers saw it, beside its tokens decoded."""
    root = DatasetRoot(config.root)
    size = config.tokenize.crops.size
    modalities = _tokenized(root, config, shard)
    views = _views(_images(root, shard), size)
    chosen = list(views)[:samples]
    columns = [f"{m} {kind}" for m in modalities for kind in ("original", "from tokens")]
    grid, _ = _canvas(columns, len(chosen), size)
    for m_index, modality in enumerate(modalities):
        tokenizer = load_tokenizer(root, modality)
        rows = read_whole_view(root, modality, shard, config, tokenizer)
        _, ids = read_token_rows(token_file(root, modality, shard))
        for line, index in enumerate(chosen):
            original, decoded = rows.values[index], None
            if ids[index] is not None:
                (decoded,) = tokenizer.decode([_crop_ids(ids[index], 0)])
            for offset, value in enumerate((original, decoded)):
                tile = render_value(modality, value, views[index], size)
                grid.paste(Image.fromarray(tile), ((2 * m_index + offset) * size, HEADER + line * size))
    return _saved(grid, root / "preview/tokens.png")


def write_crop_preview(config: Config, shard: int = 0) -> Path:
    """Write ``<root>/preview/crops.png``: the stored crops of the shard's first row with an image,
    side by side (one column per crop), for the image and for every tokenized modality decoded from
    that crop's tokens. Aligned crops show the same region in every row; a modality stored once
    (captions, palettes, metadata) shows the same value under every crop."""
    root = DatasetRoot(config.root)
    size = config.tokenize.crops.size
    modalities = _tokenized(root, config, shard)
    cropped = [m for m in modalities if MODALITIES[m].cropped]
    if not cropped:
        raise FileNotFoundError(f"no cropped modality (a map, boxes) is tokenized in shard {shard}")
    images = _images(root, shard)
    index = next(iter(_views(images, size)))
    crops = [Crop.from_row(r) for r in read_crops(token_file(root, cropped[0], shard))[index]]
    views = [label_view(images[index]["jpg"], size, crop) for crop in crops]
    columns = [f"crop {i}{' (flipped)' if c.flip else ''}" for i, c in enumerate(crops)]
    grid, draw = _canvas(columns, 1 + len(modalities), size)
    for column, view in enumerate(views):
        grid.paste(Image.fromarray(view), (column * size, HEADER))
    for line, modality in enumerate(modalities, start=1):
        _, ids = read_token_rows(token_file(root, modality, shard))
        tokenizer = load_tokenizer(root, modality)
        for column, view in enumerate(views):
            value = tokenizer.decode([_crop_ids(ids[index], column)])[0] if ids[index] is not None else None
            tile = render_value(modality, value, view, size)
            grid.paste(Image.fromarray(tile), (column * size, HEADER + line * size))
        draw.text((4, HEADER + line * size + 3), modality, fill=(255, 255, 0))
    return _saved(grid, root / "preview/crops.png")


def _crop_ids(ids: np.ndarray | list[np.ndarray], crop: int) -> np.ndarray:
    """A row's ids of crop ``crop``: a modality stored once has the same ids under every crop."""
    return ids[crop] if isinstance(ids, list) else ids


def _tokenized(root: DatasetRoot, config: Config, shard: int) -> list[str]:
    return [m for m in MODALITIES if m in config.tokenize.modalities and token_file(root, m, shard).is_file()]


def _images(root: DatasetRoot, shard: int) -> list[dict]:
    return storage.read_table(root / f"images/{shard_name(shard)}.parquet", columns=["jpg", "status"]).to_pylist()


def _views(images: list[dict], size: int) -> dict[int, np.ndarray]:
    """Row index -> its crop-0 view, for the rows whose image downloaded and decodes."""
    views = {i: label_view(row["jpg"], size) for i, row in enumerate(images) if row["status"] == SUCCESS}
    return {i: view for i, view in views.items() if view is not None}


def _canvas(columns: list[str], rows: int, size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    grid = Image.new("RGB", (len(columns) * size, HEADER + rows * size), "white")
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(columns):
        draw.text((column * size + 4, 3), title, fill=(0, 0, 0))
    return grid, draw


def _saved(grid: Image.Image, out: RootPath) -> RootPath:
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
