"""``make card``: a Hugging Face dataset card for one run, written as ``<root>/README.md``.

The YAML header is what the Hub reads (license, sources, sizes, task categories, one config per
folder of shards with its ``data_files`` glob, and ``dataset_info`` with features and row counts),
so the root itself is a Hub-ready dataset repository. The body states the run's real statistics
(``stats``) with the pictures of ``plots``; ``card/stats.json`` holds every number, per shard.
Nothing here reads a number from anywhere else, and a stage that has not run says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from huggingface_hub import DatasetCard, DatasetCardData

from four_m.core.config import AlgorithmConfig, CardConfig, Config, load_config
from four_m.core.dataset_root import DatasetRoot, write_text_atomic
from four_m.core.modalities import MODALITIES, ModalitySpec
from four_m.datasets_cards.plots import FOLDER, Figure, plot_key, write_figures
from four_m.datasets_cards.stats import (
    DatasetStats,
    FolderStats,
    LabelerStats,
    TokenStats,
    collect_stats,
    planned_stats,
)

NOT_RUN = "not run yet"
TEMPLATES = Path(__file__).resolve().parent
SIZE_CATEGORIES = ("n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B")
SIZE_CATEGORIES += ("1B<n<10B", "10B<n<100B", "100B<n<1T", "n>1T")
"""The Hub's size bins, one per power of ten from 1K rows."""


def write_card(config: Config) -> Path:
    """Write ``README.md``, ``card/*.png`` and ``card/stats.json`` into the config's root; returns the card."""
    root = DatasetRoot(config.root)
    stats = collect_stats(root, config)
    figures = write_figures(stats, root)
    write_text_atomic(root / f"{FOLDER}/stats.json", stats.as_json())
    path = root / "README.md"
    write_text_atomic(path, render_card(stats, config, figures))
    return path


def write_template(config_name: str) -> Path:
    """The card of a run that has not started: ``datasets_cards/<config>/README.md`` (e.g. cc12m)."""
    config = load_config(config_name)
    path = TEMPLATES / config_name / "README.md"
    write_text_atomic(path, render_card(planned_stats(config), config, {}))
    return path


def render_card(stats: DatasetStats, config: Config, figures: dict[str, Figure]) -> str:
    """The whole card: YAML header + Markdown body (checked by parsing it back as a DatasetCard)."""
    body = "\n".join(_body(stats, config, figures))
    return DatasetCard(f"---\n{card_data(stats, config.card).to_yaml()}\n---\n\n{body}").content


@dataclass(frozen=True)
class _Folder:
    """A folder of shards: one Hub config, written by one stage."""

    config_name: str
    folder: str
    stage: str
    files: FolderStats | None


def _folders(stats: DatasetStats) -> list[_Folder]:
    folders = [_Folder("images", "images", "download", stats.images)]
    folders += [_Folder(f"labels-{m}", f"labels/{m}", f"label/{m}", s and s.files) for m, s in stats.labels.items()]
    folders += [_Folder(f"tokens-{m}", f"tokens/{m}", f"tokenize/{m}", s and s.files) for m, s in stats.tokens.items()]
    return folders


def card_data(stats: DatasetStats, card: CardConfig) -> DatasetCardData:
    """The Hub's metadata: one config per folder with data, each with its features and sizes."""
    from datasets import DatasetInfo, Features, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict

    present = [f for f in _folders(stats) if f.files is not None]
    listed = present or _folders(stats)  # nothing has run (a template): list the folders it will have
    data = DatasetCardData(
        pretty_name=card.pretty_name,
        license=card.license,
        license_name=card.license_name,
        license_link=card.license_link,
        language=list(card.language),
        annotations_creators=["machine-generated"],
        source_datasets=list(card.source_datasets),
        size_categories=[size_category(stats.images.rows)] if stats.images else None,
        task_categories=sorted({t for m in stats.labels for t in MODALITIES[m].card_tasks}),
        configs=[
            {
                "config_name": f.config_name,
                **({"default": True} if f.folder == "images" else {}),
                "data_files": [{"split": "train", "path": f"{f.folder}/*.parquet"}],
            }
            for f in listed
        ],
    )
    infos = {
        f.config_name: DatasetInfo(
            features=Features.from_dict(f.files.features),
            splits=SplitDict(
                {"train": SplitInfo(name="train", num_bytes=f.files.num_bytes, num_examples=f.files.rows)}
            ),
            download_size=f.files.files_bytes,
            dataset_size=f.files.num_bytes,
        )
        for f in present
    }
    DatasetInfosDict(infos).to_dataset_card_data(data)
    return data


def size_category(rows: int) -> str:
    if rows < 1000:
        return SIZE_CATEGORIES[0]
    return SIZE_CATEGORIES[min(int(math.log10(rows)) - 2, len(SIZE_CATEGORIES) - 1)]


def _body(stats: DatasetStats, config: Config, figures: dict[str, Figure]) -> Iterator[str]:
    card = config.card
    yield f"# {card.pretty_name}\n"
    if card.description:
        yield f"{card.description}\n"
    if stats.images is None:
        yield (
            f"*A template: every number below is filled in by `make card CONFIG=<this config>` once the stages"
            f' have run; until then each says "{NOT_RUN}".*\n'
        )
    random_init = [m for m, s in stats.labels.items() if s is not None and s.random_init]
    if random_init:
        yield (
            f"> **Warning: {', '.join(random_init)} were labelled by random-init models** (tiny variants of the"
            " production architectures, built offline): those labels are noise, not real labels. Point"
            " `label.<name>.model` at real weights and rerun `make label`.\n"
        )
    yield (
        f"Made by four-m ({stats.package}): download with img2dataset, pseudo-labels, tokenizers, token"
        " shards and 4M training, one folder per stage, row-aligned and joined on `key`. Each folder is one"
        ' config of this dataset: `load_dataset("<this folder or repo>", "labels-depth", split="train")`.\n'
    )
    for section in (
        _stages,
        _curation,
        _failures,
        _labelers,
        _label_statistics,
        _tokenizers,
        _token_store,
        _previews,
        _runs,
    ):
        yield from section(stats, config, figures)
    yield from _files(stats)
    yield from _licensing(stats, card)


def _table(header: tuple[str, ...], rows: list[tuple]) -> Iterator[str]:
    yield "| " + " | ".join(header) + " |"
    yield "|" + "---|" * len(header)
    for row in rows:
        yield "| " + " | ".join(str(cell) for cell in row) + " |"
    yield ""


def _figure(figures: dict[str, Figure], key: str) -> Iterator[str]:
    if key in figures:
        yield f"![{figures[key].caption}]({figures[key].path})\n"


def _shard_state(files: FolderStats | None, shards: int) -> str:
    if files is None:
        return NOT_RUN
    if files.shards_done == shards == len(files.shards):
        return "done"
    return f"partial: {files.shards_done} of {shards} shards finished"


def _stages(stats: DatasetStats, config: Config, figures: dict[str, Figure]) -> Iterator[str]:
    yield "## Stages\n"
    shards = len(stats.images.shards) if stats.images else 0
    rows = []
    for f in _folders(stats):
        counts = (
            (f"{f.files.rows:,}", f"{f.files.rows_out:,}", f"{f.files.rows - f.files.rows_out:,}")
            if f.files
            else ("",) * 3
        )
        rows.append((f.stage, f"`{f.folder}/`", _shard_state(f.files, shards), *counts))
    yield from _table(("stage", "folder", "state", "rows", "with payload", "failed"), rows)
    yield (
        "Every folder holds one row per url-list row, in the same shards and order as `images/`; a failed row"
        " stays, with its reason in `error_message` (images) or `error` (labels, tokens).\n"
    )


def _curation(stats: DatasetStats, config: Config, figures: dict[str, Figure]) -> Iterator[str]:
    yield "## Curation\n"
    curation = stats.curation
    if curation is None:
        filters = ", ".join(f"`{n}`" for n in config.curate.filters) or "none configured"
        yield f"{NOT_RUN.capitalize()}: `make curate` (filters: {filters}; docs/curation.md).\n"
        return
    rows = [
        (
            f"`{name}`",
            tally["phase"],
            f"{tally['threshold']:g}",
            f"{tally['scored']:,}",
            f"{sum(tally['unscored'].values()):,}",
            f"{tally['removed']:,}",
        )
        for name, tally in curation["filters"].items()
        if name not in curation["waiting"]
    ]
    yield from _table(("filter", "phase", "threshold", "scored", "not scored (kept)", "removed"), rows)
    removed = curation["removed"]
    yield (
        f"{removed:,} of {curation['rows']:,} rows removed, {curation['removed_before_label']:,} of them before"
        " labelling (never labelled). Every decision is recorded per row and filter in `curation/decisions/`"
        " (score, threshold, kept, and the copy a duplicate duplicates); removed rows keep their place in every"
        " folder, counted below as `curated_<filter>`.\n"
    )
    if curation["waiting"]:
        yield f"Not yet run (waiting for their labels): {', '.join(curation['waiting'])}.\n"


def _failures(stats: DatasetStats, config: Config, figures: dict[str, Figure]) -> Iterator[str]:
    yield "## Failures by reason\n"
    present = [f for f in _folders(stats) if f.files is not None]
    rows = [(f.stage, reason, f"{n:,}") for f in present for reason, n in f.files.failures.items()]
    if not present:
        yield f"{NOT_RUN.capitalize()}.\n"
    elif rows:
        yield from _table(("stage", "reason", "rows"), rows)
        yield (
            "Download reasons classify img2dataset's messages (`core/failures.py`); labels fail with"
            " `no_image` (the download failed), `labeler_error` or `labeler_timeout` (the labeler hung on that"
            " image alone); tokens are `absent_upstream` where the image"
            " or label is missing; `curated_<filter>` rows were removed by curation.\n"
        )
    else:
        yield "No row failed.\n"


def _labelers(stats: DatasetStats, config: Config, figures: dict[str, Figure]) -> Iterator[str]:
    yield "## Labelers\n"
    rows = []
    for modality, labels in stats.labels.items():
        if labels is None:
            rows.append((modality, _not_run_labeler(config, modality), "", "", ""))
        else:
            failed = labels.files.rows - labels.files.rows_out
            rows.append(
                (modality, f"`{labels.model}`", f"`{labels.revision}`", f"{labels.files.rows_out:,}", f"{failed:,}")
            )
    yield from _table(("modality", "model", "revision", "labelled", "failed"), rows)


def _not_run_labeler(config: Config, modality: str) -> str:
    if modality not in config.label.labelers:
        return NOT_RUN
    settings = config.label.labeler(modality)
    if isinstance(settings, AlgorithmConfig):
        return f"{NOT_RUN} (configured: an algorithm, no weights)"
    return f"{NOT_RUN} (configured: `{settings.model or 'tiny random-init variant'}`)"


def _label_statistics(stats: DatasetStats, config: Config, figures: dict[str, Figure]) -> Iterator[str]:
    yield "## Label statistics\n"
    present = {m: s for m, s in stats.labels.items() if s is not None}
    if not present:
        yield f"{NOT_RUN.capitalize()}.\n"
        return
    yield f"Computed on the first {stats.stats_rows:,} labelled rows per modality at most (`card.stats_rows`).\n"
    for modality, labels in present.items():
        spec = MODALITIES[modality]
        if spec.kind in LABEL_SECTIONS:
            yield f"### {modality}\n"
            yield from LABEL_SECTIONS[spec.kind](spec, labels)
            yield from _figure(figures, plot_key(spec))


def _boxes_text(spec: ModalitySpec, labels: LabelerStats) -> Iterator[str]:
    d = labels.details
    threshold = labels.files.provenance.get("score_threshold", "?")
    if not d["boxes"]:
        yield f"No boxes at score >= {threshold} on the {labels.sampled_rows:,} sampled images.\n"
        return
    top = ", ".join(f"{name} {n:,}" for name, n in list(d["class_boxes"].items())[:5])
    yield (
        f"{d['boxes']:,} boxes (score >= {threshold}) on {d['images_with_boxes']:,} of {labels.sampled_rows:,}"
        f" images, {len(d['class_boxes'])} classes; most frequent: {top}.\n"
    )


def _class_map_text(spec: ModalitySpec, labels: LabelerStats) -> Iterator[str]:
    share = labels.details["class_pixel_share"]
    top = ", ".join(f"{name} {100 * v:.1f} %" for name, v in list(share.items())[:5])
    yield f"{len(share)} classes present on {labels.sampled_rows:,} images; largest pixel shares: {top}.\n"


def _continuous_map_text(spec: ModalitySpec, labels: LabelerStats) -> Iterator[str]:
    d = labels.details
    if not labels.sampled_rows:
        return
    low, high = d.get(f"{spec.column}_min"), d.get(f"{spec.column}_max")
    recorded = f": per-image ranges span [{low:.4g}, {high:.4g}]" if low is not None and high is not None else ""
    yield (
        f"Values over {labels.sampled_rows:,} images{recorded}; the maps store values in [0, 1] as 0..65535"
        " (see the histogram).\n"
    )


def _text_text(spec: ModalitySpec, labels: LabelerStats) -> Iterator[str]:
    names = {spec.column: f"Generated ({spec.name})", "alt_text": "Alt-texts"}
    for name, words in labels.details["words"].items():
        if words["texts"]:
            spread = f"{words['min']}-{words['max']}"
            yield f"- {names[name]}: {words['texts']:,}, {words['mean']} words on average ({spread})."
    yield ""


def _spread_text(spread: dict[str, float]) -> str:
    if not spread["rows"]:
        return "none sampled"
    return f"{spread['mean']:.4g} on average ({spread['min']:.4g}-{spread['max']:.4g}, {spread['rows']:,} rows)"


def _edge_map_text(spec: ModalitySpec, labels: LabelerStats) -> Iterator[str]:
    yield f"Edge pixels: {_spread_text(labels.details['edge_pixel_share'])} of each map.\n"


def _metadata_text(spec: ModalitySpec, labels: LabelerStats) -> Iterator[str]:
    rows = [(key, _spread_text(spread)) for key, spread in labels.details["keys"].items()]
    yield from _table(("key", "raw value"), rows)
    yield "Keys absent from every row had no source in this run (their labeler did not run).\n"


def _instances_text(spec: ModalitySpec, labels: LabelerStats) -> Iterator[str]:
    yield f"Instances per image: {_spread_text(labels.details['instances_per_image'])}.\n"


LABEL_SECTIONS = MappingProxyType(
    {
        "edge_map": _edge_map_text,
        "metadata": _metadata_text,
        "instances": _instances_text,
        "boxes": _boxes_text,
        "class_map": _class_map_text,
        "continuous_map": _continuous_map_text,
        "text": _text_text,
    }
)
"""Kind -> its statistics in words; its plot is ``plots.plot_key(spec)``."""


def _tokenizers(stats: DatasetStats, config: Config, figures: dict[str, Figure]) -> Iterator[str]:
    yield "## Tokenizers\n"
    rows = []
    for modality, trained in stats.tokenizers.items():
        if trained is None:
            rows.append((modality, NOT_RUN, "", "", "", ""))
            continue
        m = trained.metrics
        reconstruction = f"{m['reconstruction_metric']} {m['reconstruction']:.4g}" if "reconstruction" in m else ""
        usage = f"{m['codebook_usage']:.1%}" if "codebook_usage" in m else ""
        perplexity = f"{m['perplexity']:.1f}" if "perplexity" in m else ""
        vocabulary = f"{m['vocab_size']:,}" if "vocab_size" in m else ""
        rows.append((modality, f"{trained.samples:,}", reconstruction, usage, perplexity, vocabulary))
    yield from _table(("modality", "trained on", "reconstruction", "codebook usage", "perplexity", "vocabulary"), rows)
    yield (
        "Reconstruction is measured on the training samples after training (PSNR in dB for rgb, abs-rel for"
        " depth, angular error in degrees for normals, mIoU for semseg, cosine similarity for CLIP and DINOv2,"
        " edge F1 for edges). The sequence modalities share one WordPiece vocabulary (words plus special,"
        " sentinel, coordinate and class tokens).\n"
    )


def _token_store(stats: DatasetStats, config: Config, figures: dict[str, Figure]) -> Iterator[str]:
    yield "## Token store\n"
    rows = []
    for modality, tokens in stats.tokens.items():
        rows.append((modality, *_token_cells(tokens)) if tokens else (modality, NOT_RUN, "", "", "", "", "", ""))
    header = (
        "modality",
        "tokenizer",
        "vocabulary",
        "rows with tokens",
        "absent",
        "crops",
        "tokens per crop",
        "ids used",
    )
    yield from _table(header, rows)
    yield from _figure(figures, "codebook_usage")


def _token_cells(tokens: TokenStats) -> tuple[str, ...]:
    absent = tokens.files.rows - tokens.files.rows_out
    return (
        f"`{tokens.tokenizer}`",
        f"{tokens.vocab_size:,}",
        f"{tokens.files.rows_out:,}",
        f"{absent:,}",
        f"{tokens.crops_per_row:g}",
        f"{tokens.tokens_per_row:g}",
        f"{tokens.ids_used:.1%}",
    )


def _previews(stats: DatasetStats, config: Config, figures: dict[str, Figure]) -> Iterator[str]:
    shown = [key for key in figures if key.startswith("preview_")]
    if shown:
        yield "## Previews\n"
        for key in shown:
            yield from _figure(figures, key)


def _runs(stats: DatasetStats, config: Config, figures: dict[str, Figure]) -> Iterator[str]:
    yield "## Training runs\n"
    if not stats.runs:
        yield f"{NOT_RUN.capitalize()} (`make train` writes `runs/<run>/`).\n"
        return
    rows = []
    for run in stats.runs:
        size = f"{run.model['encoder_layers']}+{run.model['decoder_layers']} layers, dim {run.model['dim']}"
        losses = f"{run.loss_first:.3f} -> {run.loss_last:.3f}" if run.loss_first is not None else "none logged"
        rows.append((f"`runs/{run.name}/`", size, ", ".join(run.modalities), f"{run.last_step:,}", losses))
    yield from _table(("run", "model", "modalities", "last logged step", "loss"), rows)
    for run in stats.runs:
        yield from _figure(figures, f"loss_{run.name}")


def _files(stats: DatasetStats) -> Iterator[str]:
    yield "## Files\n"
    rows = [
        (
            f"`{f.config_name}`",
            f"`{f.folder}/*.parquet`",
            f"{f.files.rows:,}",
            _size(f.files.num_bytes),
            _size(f.files.files_bytes),
        )
        for f in _folders(stats)
        if f.files is not None
    ]
    if rows:
        yield from _table(("config", "data_files", "rows", "data (uncompressed)", "on disk"), rows)
    yield (
        f"`{FOLDER}/stats.json` holds every number of this card, per shard; each Parquet file also carries"
        " its provenance in `four_m.*` metadata (stage, model and revision or tokenizer, config hash, package).\n"
    )


def _size(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _licensing(stats: DatasetStats, card: CardConfig) -> Iterator[str]:
    yield "## Licensing\n"
    link = f": {card.license_link}" if card.license_link else ""
    yield f"Images and captions: `{card.license}` ({card.license_name or card.license}{link}).\n"
    models = {s.model for s in stats.labels.values() if s is not None and not s.random_init} | set(card.model_licenses)
    if models:
        yield "The labels inherit the terms of the weights that made them:\n"
        yield from _table(
            ("weights", "license"),
            [(f"`{m}`", card.model_licenses.get(m, "not stated: see the model's card")) for m in sorted(models)],
        )
    elif any(s is not None for s in stats.labels.values()):
        yield "The labels come from random-init models: no weights, no terms beyond the images'.\n"
