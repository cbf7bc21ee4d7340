"""``make sample FROM=rgb TO=depth,normal,...``: a trained 4M predicts modalities from others, and a
PNG grid shows, per row, the inputs | each target's pseudo-label | its prediction.

Rows come from the held-out token shards (never trained on), or from an image and/or caption the
user passes (``IMAGE=``, ``CAPTION=``), tokenized on the fly by the run's own tokenizers; such a
row has no pseudo-label. The user's image file is checked as a downloaded image is (its size in
bytes, its pixel count, that it decodes: ``core/images.py``), before the model loads. Targets
are generated in order and chained: each joins the conditioning of the next, as
``generate.targets`` documents. Every generated token sequence goes back through
its tokenizer's decoder and the renderers of ``make preview-tokens``, so depth is colour-mapped,
normals are RGB, semseg has the palette, boxes are drawn on the image and captions are text.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from four_m.core.config import Config, GenerateConfig
from four_m.core.crops import WHOLE
from four_m.core.dataset_root import atomic_path
from four_m.core.errors import UserError
from four_m.core.images import read_image_file
from four_m.core.modalities import MODALITIES, map_modalities, of_kind, pixel_input_of, pixel_inputs
from four_m.core.views import label_view
from four_m.tokenize.maps import configured
from four_m.tokenize.preview import HEADER, render_value, text_tile
from four_m.tokenize.sources import crop_adapter
from four_m.train.generate import Decoding, Generator, keep_share
from four_m.train.held_out import Labels, held_out_rows
from four_m.train.trained import TrainedRun, load_trained

NO_LABEL = "no pseudo-label: a user input"


class SampleInputError(UserError):
    """A user image or caption that cannot be tokenized, or FROM/TO that do not fit the run."""


@dataclass
class SampleRows:
    """What the grid shows besides the predictions, one entry per row."""

    given: dict[str, list[np.ndarray | None]]
    """Modality -> what the model is shown: ids, or an image's pixels where the run has its pixel input."""
    shown: dict[str, list[Any]]
    """Modality -> the value to draw for a given modality or a target's pseudo-label (None: none)."""
    views: list[np.ndarray]
    """The row's image view, for drawing boxes on."""
    stored: dict[str, list[np.ndarray | None]]
    """Modality -> the row's stored tokens of each target (in-painting keeps some); empty for user input."""


@dataclass(frozen=True)
class UserImage:
    """The user's image file (``IMAGE=``), checked."""

    data: bytes
    view: np.ndarray
    """The image modality's label view of it, as its adapter parses a stored image."""


def write_samples(config: Config, image: Path | None = None, caption: str | None = None) -> Path:
    """Generate and write ``runs/<run>/samples/<from>-to-<to>.png``; returns its path."""
    photo = user_image(config, image) if image is not None else None
    run = load_trained(config)
    given, targets = plan(config.generate, run)
    user = image is not None or caption is not None
    rows = user_rows(config, run, given, photo, caption) if user else held_out_sample_rows(config, run, given, targets)
    inputs = model_inputs(given, run)
    predicted = Generator(run.model).generate(
        {inputs[m]: rows.given[m] for m in given},
        [(t, decoding(config.generate, inputs=inputs)) for t in targets],
        seed=config.generate.seed,
        partial=partial(config.generate, rows),
    )
    decoded = {t: run.tokenizers[t].decode(predicted[t]) for t in targets}
    grid = draw_grid(rows.views[0].shape[0], given, targets, rows, decoded)
    out = run.directory / f"samples/{'+'.join(given)}-to-{'+'.join(targets)}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as temp:
        with temp.open("wb") as handle:
            grid.save(handle, format="PNG")
    return out


def model_inputs(given: tuple[str, ...], run: TrainedRun) -> dict[str, str]:
    """Given modality -> what the model is shown: an image's pixel input where the run has one (4M
    conditions on the photo, not on its lossy tokens), else the modality itself."""
    return {m: pixel_input_of(m, run.modalities) or m for m in given}


def plan(cfg: GenerateConfig, run: TrainedRun) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(given, targets) checked against the run's modalities. Unset, they are the run's task, else
    the image and every other token modality (pixel inputs are never generated). A pixel input given
    by name (``rgb_pixels``) is given as its image (``rgb``), which :func:`model_inputs` shows as pixels."""
    task = run.task
    asked = cfg.given or (task.inputs if task else of_kind("image")[:1])
    unknown = sorted(set(asked) - set(run.modalities))
    if unknown:
        raise SampleInputError(f"run {run.directory.name} has no {unknown}; it knows {', '.join(run.modalities)}")
    images = pixel_inputs()
    given = tuple(dict.fromkeys(images[m].name if m in images else m for m in asked))
    shown = model_inputs(given, run)
    others = tuple(m for m in run.predicted if m not in given and m not in shown.values() and m in MODALITIES)
    targets = cfg.targets or (task.targets if task and not cfg.given else others)
    both = sorted(set(asked) & set(targets))
    if both:
        raise SampleInputError(f"generate.targets: {both} also given: a target cannot be an input")
    unknown = sorted({shown[m] for m in given} - set(run.modalities) | set(targets) - set(run.modalities))
    if unknown:
        raise SampleInputError(f"run {run.directory.name} has no {unknown}; it knows {', '.join(run.modalities)}")
    if not targets:
        raise SampleInputError(f"nothing to generate: generate.given covers all of {', '.join(run.modalities)}")
    not_maps = sorted(m for m in cfg.keep if m not in targets or m not in map_modalities())
    if not_maps:
        raise SampleInputError(f"generate.keep: {not_maps} are not map targets of this sample; only those in-paint")
    return given, targets


def partial(cfg: GenerateConfig, rows: SampleRows) -> dict[str, list[np.ndarray]]:
    """In-painting: per ``generate.keep`` target, its stored tokens with the kept share given."""
    missing = sorted(m for m in cfg.keep if m not in rows.stored or any(ids is None for ids in rows.stored[m]))
    if missing:
        raise SampleInputError(f"generate.keep: {missing} has no stored tokens to keep in a user's own input")
    return {m: keep_share(rows.stored[m], share, cfg.seed) for m, share in cfg.keep.items()}


def decoding(cfg: GenerateConfig, temperature: float | None = None, inputs: dict[str, str] | None = None) -> Decoding:
    """The generate section as one target's decoding; ``temperature`` overrides the section's and its
    schedule (onex would otherwise climb from it towards its min_t); ``inputs`` renames per-condition
    guidance weights to what the model is shown (:func:`model_inputs`)."""
    guidance = cfg.guidance
    if isinstance(guidance, dict) and inputs:
        guidance = {inputs.get(m, m): weight for m, weight in guidance.items()}
    return Decoding(
        steps=cfg.steps,
        order=cfg.order,
        schedule=cfg.schedule,
        temperature=cfg.temperature if temperature is None else temperature,
        temperature_schedule=cfg.temperature_schedule if temperature is None else "constant",
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        guidance=guidance,
        max_tokens=cfg.max_tokens or None,
    )


def held_out_sample_rows(
    config: Config, run: TrainedRun, given: tuple[str, ...], targets: tuple[str, ...]
) -> SampleRows:
    """The first ``generate.samples`` held-out rows that have tokens for every given modality (and
    every one in-painted: ``generate.keep``)."""
    inputs = model_inputs(given, run)
    needed = (*inputs.values(), *config.generate.keep)
    chosen = list(itertools.islice(held_out_rows(config, run.modalities, needed=needed), config.generate.samples))
    if not chosen:
        raise SampleInputError(f"no held-out row has tokens for all of {', '.join(needed)}")
    labels = Labels(config, run.tokenizers)
    return SampleRows(
        given={m: [row.tokens[inputs[m]] for row in chosen] for m in given},
        shown={m: [labels.value(m, row) for row in chosen] for m in (*given, *targets)},
        views=[labels.view(row) for row in chosen],
        stored={m: [row.tokens.get(m) for row in chosen] for m in targets},
    )


def user_image(config: Config, path: Path) -> UserImage:
    """``path`` read with the download stage's limits (``download.max_image_bytes``,
    ``max_image_pixels``) and parsed as the image modality's label view; else one line naming it."""
    try:
        data = read_image_file(Path(path), config.download.max_image_bytes, config.download.max_image_pixels)
        return UserImage(data, configured(of_kind("image")[0], config.label.size, {}).parse(data))
    except (OSError, ValueError) as err:
        raise SampleInputError(f"cannot use image {path}: {err}") from None


def user_rows(
    config: Config, run: TrainedRun, given: tuple[str, ...], image: UserImage | None, caption: str | None
) -> SampleRows:
    """One row from the user's image and/or caption, tokenized here by the run's tokenizers."""
    supplied: dict[str, Any] = {}
    image_modality = of_kind("image")[0]
    if image is not None:
        # Crop 0, the whole label view, as the run's image tokenizer takes it (or at tokenize.crops.size).
        tokenizer = run.tokenizers.get(image_modality) or crop_adapter(image_modality, config, {})
        supplied[image_modality] = tokenizer.crop(image.view, WHOLE)
    if caption is not None:
        supplied.update(dict.fromkeys(of_kind("text", given) or of_kind("text")[:1], caption))
    missing = sorted(set(given) - set(supplied))
    if missing:
        raise SampleInputError(
            f"generate.given is {', '.join(given)}, but only {', '.join(supplied)} was supplied (IMAGE= is"
            f" {image_modality}, CAPTION= is a text modality): set FROM to what you pass"
        )
    inputs = model_inputs(given, run)
    pixels = pixel_input_of(image_modality, run.modalities)
    ids = {m: run.tokenizers[m].encode([supplied[m]]) for m in given if inputs[m] != pixels}
    if pixels in inputs.values():  # the photo itself, cut as the label view at the pixel input's size
        ids[image_modality] = [label_view(image.data, MODALITIES[image_modality].pixel_side)]
    view = (
        configured(image_modality, config.label.size, {}).render(supplied[image_modality])
        if image_modality in supplied
        else None
    )
    return SampleRows(
        given={m: list(ids[m]) for m in given},
        shown={m: [supplied.get(m)] for m in given},
        views=[view if view is not None else np.full((config.tokenize.crops.size,) * 2 + (3,), 128, np.uint8)],
        stored={},
    )


def draw_grid(
    size: int,
    given: tuple[str, ...],
    targets: tuple[str, ...],
    rows: SampleRows,
    decoded: dict[str, list[Any]],
) -> Image.Image:
    """Columns: each given modality, then per target its pseudo-label and the prediction."""
    columns = [(f"{m} (given)", rows.shown[m]) for m in given]
    for t in targets:
        labels = rows.shown.get(t, [NO_LABEL] * len(rows.views))
        columns += [(f"{t} pseudo-label", labels), (f"{t} predicted", decoded[t])]
    column_modalities = [*given, *(t for t in targets for _ in range(2))]
    grid = Image.new("RGB", (len(columns) * size, HEADER + len(rows.views) * size), "white")
    draw = ImageDraw.Draw(grid)
    for c, ((title, values), modality) in enumerate(zip(columns, column_modalities, strict=True)):
        draw.text((c * size + 4, 3), title, fill=(0, 0, 0))
        for r, (value, view) in enumerate(zip(values, rows.views, strict=True)):
            tile = text_tile(NO_LABEL, size) if value is NO_LABEL else render_value(modality, value, view, size)
            grid.paste(Image.fromarray(tile), (c * size, HEADER + r * size))
    return grid
