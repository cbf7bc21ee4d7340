"""The facts a dataset card states, read from what the stages wrote under one dataset root.

Rows and failures come from every shard's own Parquet file (the stages' ``status``/``error``
columns, classified with the reason functions of ``core.failures``), completion from the ``_state/``
markers, each labeler's model and revision from its files' provenance metadata, tokenizer metrics
from ``tokenizers/<modality>/trained.json``. The stages' ``summary.json`` files are not read: each
describes only the last run of its stage, and a rerun that skipped every shard reports zeros.

Label statistics and token-id usage decode payloads, so they read at most ``card.stats_rows``
rows per modality (the first shards first); counts and failures always cover every shard.
A stage that has not run is ``None`` here and "not run yet" on the card.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from four_m import __version__
from four_m.core import storage
from four_m.core.coco import NO_CLASS
from four_m.core.config import Config
from four_m.core.dataset_root import DatasetRoot
from four_m.core.errors import UserError
from four_m.core.failures import (
    ABSENT,
    ERROR,
    SUCCESS,
    curated_reason,
    failure_reason,
    is_curated,
    label_failure_reason,
)
from four_m.core.label_codec import decode_png
from four_m.core.modalities import MODALITIES, ModalitySpec
from four_m.core.provenance import RANDOM_INIT
from four_m.core.runs import DESCRIPTION, LOGS, read_losses

VALUE_BINS = 20
LONG_METADATA = 200
"""Metadata values longer than this (class-name lists) are data, not provenance: left out."""


class CardError(UserError):
    """A root the card cannot describe: missing, or nothing downloaded into it yet."""


@dataclass(frozen=True)
class ShardRows:
    shard: int
    rows: int
    rows_out: int
    """Rows with a payload (an image, a label, tokens)."""
    failures: dict[str, int]
    """Rows without one, by reason: rows == rows_out + sum(failures)."""
    done: bool
    """Its completion marker is there: a shard without one is being written or was interrupted."""


@dataclass(frozen=True)
class FolderStats:
    """One folder of shards (``images/``, ``labels/<m>/``, ``tokens/<m>/``), as the Hub sees it."""

    folder: str
    rows: int
    rows_out: int
    failures: dict[str, int]
    shards: tuple[ShardRows, ...]
    num_bytes: int
    """Uncompressed size of the data, as Parquet counts it (the Hub's ``num_bytes``)."""
    files_bytes: int
    """On disk (the Hub's ``download_size``)."""
    features: dict[str, Any]
    """The first shard's schema as Hugging Face ``Features.to_dict()``."""
    provenance: dict[str, str]
    """The first shard's ``four_m.*`` metadata, prefix dropped (stage, model, tokenizer, ...)."""

    @property
    def shards_done(self) -> int:
        return sum(s.done for s in self.shards)


@dataclass(frozen=True)
class LabelerStats:
    modality: str
    files: FolderStats
    model: str
    revision: str
    sampled_rows: int
    """Labelled rows that ``details`` were computed on."""
    details: dict[str, Any]
    """Per modality: box classes (det), class pixel shares (semseg), value range and histogram
    (depth), words per caption (caption); empty for the others."""

    @property
    def random_init(self) -> bool:
        return self.model == RANDOM_INIT


@dataclass(frozen=True)
class TokenizerStats:
    modality: str
    samples: int
    metrics: dict[str, Any]
    """As trained.json records them: reconstruction, codebook usage and perplexity (VQ); vocabulary (text)."""
    config_hash: str


@dataclass(frozen=True)
class TokenStats:
    modality: str
    files: FolderStats
    tokenizer: str
    vocab_size: int
    sampled_rows: int
    tokens_per_row: float
    """Mean over the sampled rows that have tokens, per crop (the grid for maps, end token included
    for sequences)."""
    ids_used: float
    """Share of the vocabulary that occurs in the sampled rows: codebook usage on the stored data."""
    crops_per_row: float = 1.0
    """Crops stored per row with tokens (maps and boxes: ``tokenize.crops.n_crops``; others 1)."""


@dataclass(frozen=True)
class RunStats:
    name: str
    model: dict[str, Any]
    modalities: tuple[str, ...]
    last_step: int
    """The last step with a logged loss."""
    loss_first: float | None
    loss_last: float | None


@dataclass(frozen=True)
class DatasetStats:
    package: str
    stats_rows: int
    images: FolderStats | None
    labels: dict[str, LabelerStats | None]
    tokenizers: dict[str, TokenizerStats | None]
    tokens: dict[str, TokenStats | None]
    runs: tuple[RunStats, ...]
    previews: tuple[str, ...]
    """Preview grids under the root (``preview/*.png``), relative paths."""
    curation: dict[str, Any] | None = None
    """The curate stage's last summary (``_state/curate/summary.json``); None where it has not run."""

    def as_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def planned_stats(config: Config) -> DatasetStats:
    """Stats of a root where nothing has run yet: every configured stage ``None`` (the CC12M template)."""
    return DatasetStats(
        package=f"four-m {__version__}",
        stats_rows=config.card.stats_rows,
        images=None,
        labels=dict.fromkeys(config.label.labelers),
        tokenizers=dict.fromkeys(config.tokenize.modalities),
        tokens=dict.fromkeys(config.tokenize.modalities),
        runs=(),
        previews=(),
    )


def collect_stats(root: DatasetRoot, config: Config) -> DatasetStats:
    """Everything the card states about ``root``; stages that have not run are ``None``."""
    if not root.path.is_dir():
        raise CardError(f"{root.path}: no such dataset root")
    if not _shard_files(root / "images"):
        raise CardError(f"{root.path}: no images/ shards: run the download stage first, then make card")
    cap = config.card.stats_rows
    labels = _names(config.label.labelers, root / "labels")
    modalities = _names(config.tokenize.modalities, root / "tokens", root / "tokenizers")
    return DatasetStats(
        package=f"four-m {__version__}",
        stats_rows=cap,
        images=_folder(root, "images", "download", _download_failures),
        labels={m: _labeler(root, m, cap) for m in labels},
        tokenizers={m: _tokenizer(root / f"tokenizers/{m}") for m in modalities},
        tokens={m: _tokens(root, m, cap) for m in modalities},
        runs=tuple(_run(folder) for folder in _finished_runs(root / "runs")),
        previews=tuple(str(p.relative_to(root.path)) for p in sorted((root / "preview").glob("*.png"))),
        curation=_curation(root),
    )


def _curation(root: DatasetRoot) -> dict[str, Any] | None:
    summary = root / "_state/curate/summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else None


def _names(configured: Iterable[str], *folders: Path) -> list[str]:
    """The configured modalities, then any other found on disk (data in the root is described too).

    Hidden and ``_`` folders are a stage's temporaries (``.rgb.1a2b3c4d.tmp``, ``_tmp/``), not modalities.
    """
    found = sorted(
        p.name
        for folder in folders
        if folder.is_dir()
        for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith((".", "_"))
    )
    return list(dict.fromkeys([*configured, *found]))


def _shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("[0-9]*.parquet")) if folder.is_dir() else []


def _folder(root: DatasetRoot, folder: str, stage: str, failures_of: Callable[[Path], Counter]) -> FolderStats | None:
    files = _shard_files(root / folder)
    if not files:
        return None
    state = root.stage(stage)
    shards, num_bytes = [], 0
    for path in files:
        metadata = storage.parquet_file(path).metadata
        num_bytes += sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
        failures = dict(sorted(failures_of(path).items()))
        shard = int(path.stem)
        rows = metadata.num_rows
        done = state.is_done(shard, verify_checksums=False)
        shards.append(ShardRows(shard, rows, rows - sum(failures.values()), failures, done))
    schema = storage.read_schema(files[0])
    total: Counter = Counter()
    for shard in shards:
        total.update(shard.failures)
    return FolderStats(
        folder=folder,
        rows=sum(s.rows for s in shards),
        rows_out=sum(s.rows_out for s in shards),
        failures=dict(sorted(total.items())),
        shards=tuple(shards),
        num_bytes=num_bytes,
        files_bytes=sum(p.stat().st_size for p in files),
        features=_features(schema),
        provenance=_provenance(schema),
    )


def _features(schema: pa.Schema) -> dict[str, Any]:
    from datasets import Features  # imported here: it takes seconds, and only cards need it

    return Features.from_arrow_schema(schema).to_dict()


def _provenance(schema: pa.Schema) -> dict[str, str]:
    prefix = b"four_m."
    items = (schema.metadata or {}).items()
    return {k[len(prefix) :].decode(): v.decode() for k, v in items if k.startswith(prefix) and len(v) <= LONG_METADATA}


def _download_failures(path: Path) -> Counter:
    table = storage.read_table(path, columns=["status", "error_message"])
    rows = zip(table["status"].to_pylist(), table["error_message"].to_pylist(), strict=True)
    return Counter(failure_reason(message) for status, message in rows if status != SUCCESS)


def _label_failures(path: Path) -> Counter:
    errors = storage.read_table(path, columns=[ERROR])[ERROR].to_pylist()
    return Counter(label_failure_reason(e) for e in errors if e)


def _token_failures(path: Path) -> Counter:
    """Tokens fail because the row's image or label failed upstream, or curation removed the row."""
    errors = storage.read_table(path, columns=[ERROR])[ERROR].to_pylist()
    return Counter(curated_reason(e) if is_curated(e) else ABSENT for e in errors if e)


def _sample(folder: Path, columns: list[str], cap: int, present: str) -> pa.Table:
    """Up to ``cap`` rows whose ``present`` column is not null, from the first shards on."""
    parts, rows = [], 0
    for path in _shard_files(folder):
        table = storage.read_table(path, columns=columns)
        table = table.filter(pc.is_valid(table[present]))
        parts.append(table)
        rows += table.num_rows
        if rows >= cap:
            break
    return pa.concat_tables(parts).slice(0, cap)


def _labeler(root: DatasetRoot, modality: str, cap: int) -> LabelerStats | None:
    files = _folder(root, f"labels/{modality}", f"label/{modality}", _label_failures)
    if files is None:
        return None
    spec = MODALITIES[modality]
    details = LABEL_DETAILS.get(spec.kind)
    sample = None
    if details:
        stored = storage.read_schema(_shard_files(root / spec.folder)[0]).names
        columns = [c for c in details.columns(spec) if c in stored]
        sample = _sample(root / spec.folder, columns, cap, spec.column)
    return LabelerStats(
        modality=modality,
        files=files,
        model=files.provenance.get("model") or files.provenance.get("method", "unknown"),
        revision=files.provenance.get("revision") or ("-" if "method" in files.provenance else "unknown"),
        sampled_rows=sample.num_rows if sample is not None else 0,
        details=details.compute(spec, sample, _classes(root, modality)) if details else {},
    )


def _classes(root: DatasetRoot, modality: str) -> list[str]:
    """Class names a label file records (semseg), else none."""
    names = storage.read_schema(_shard_files(root / f"labels/{modality}")[0]).metadata.get(b"four_m.classes")
    return json.loads(names) if names else []


@dataclass(frozen=True)
class _Details:
    columns: Callable[[ModalitySpec], list[str]]
    """Read from each file (those the files have); the first is the payload whose rows are sampled."""
    compute: Callable[[ModalitySpec, pa.Table, list[str]], dict[str, Any]]


def _boxes(spec: ModalitySpec, table: pa.Table, classes: list[str]) -> dict[str, Any]:
    rows = table[spec.column].to_pylist()
    boxes = [box for row in rows for box in row]
    counts = Counter(box["class"] for box in boxes)
    return {
        "boxes": len(boxes),
        "images_with_boxes": sum(bool(row) for row in rows),
        "class_boxes": dict(counts.most_common()),
    }


def _class_map(spec: ModalitySpec, table: pa.Table, classes: list[str]) -> dict[str, Any]:
    pixels = np.zeros(256, np.int64)
    for payload in table[spec.column].to_pylist():
        pixels += np.bincount(decode_png(payload).ravel(), minlength=256)
    total = max(int(pixels.sum()), 1)
    names = dict(enumerate(classes)) | {NO_CLASS: "(no class)"}
    order = np.argsort(-pixels, kind="stable")
    return {
        "class_pixel_share": {names.get(int(i), f"id {i}"): round(pixels[i] / total, 6) for i in order if pixels[i]}
    }


def _continuous_map(spec: ModalitySpec, table: pa.Table, classes: list[str]) -> dict[str, Any]:
    """A histogram of the stored 16-bit values, and the raw range where the labeler records one
    (``<column>_min``/``_max``: depth's per-image range before normalising)."""
    counts = np.zeros(VALUE_BINS, np.int64)
    for payload in table[spec.column].to_pylist():
        counts += np.histogram(decode_png(payload), bins=VALUE_BINS, range=(0, 65535))[0]
    ranges = {}
    for bound, reduce in (("min", pc.min), ("max", pc.max)):
        name = f"{spec.column}_{bound}"
        if name in table.column_names:
            ranges[name] = float(reduce(table[name]).as_py()) if table.num_rows else None
    return {**ranges, "normalised_histogram": counts.tolist(), "bins": VALUE_BINS}


def _text(spec: ModalitySpec, table: pa.Table, classes: list[str]) -> dict[str, Any]:
    return {"words": {name: _lengths(table[name].to_pylist()) for name in _text_columns(spec)}}


def _text_columns(spec: ModalitySpec) -> list[str]:
    return [spec.column, *(["alt_text"] if spec.alt_text else [])]


def _lengths(texts: list[str | None]) -> dict[str, Any]:
    words = [len(t.split()) for t in texts if t]
    histogram = dict(sorted(Counter(words).items()))
    return {
        "texts": len(words),
        "mean": round(float(np.mean(words)), 2) if words else None,
        "min": min(words, default=None),
        "max": max(words, default=None),
        "histogram": {str(k): v for k, v in histogram.items()},
    }


def _edge_map(spec: ModalitySpec, table: pa.Table, classes: list[str]) -> dict[str, Any]:
    shares = [float((decode_png(p) > 127).mean()) for p in table[spec.column].to_pylist()]
    return {"edge_pixel_share": _spread(shares)}


def _metadata(spec: ModalitySpec, table: pa.Table, classes: list[str]) -> dict[str, Any]:
    """Per key: in how many sampled rows it is present, and its spread there."""
    rows = table[spec.column].to_pylist()
    keys = list(rows[0]) if rows else []
    return {"keys": {k: _spread([r[k] for r in rows if r[k] is not None]) for k in keys}}


def _instances(spec: ModalitySpec, table: pa.Table, classes: list[str]) -> dict[str, Any]:
    rows = table[spec.column].to_pylist()
    return {"instances_per_image": _spread([float(len(r or [])) for r in rows])}


def _spread(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"rows": 0}
    return {
        "rows": len(values),
        "mean": round(float(np.mean(values)), 4),
        "min": round(float(np.min(values)), 4),
        "max": round(float(np.max(values)), 4),
    }


LABEL_DETAILS: Mapping[str, _Details] = MappingProxyType(
    {
        "boxes": _Details(lambda s: [s.column, ERROR], _boxes),
        "class_map": _Details(lambda s: [s.column, ERROR], _class_map),
        "continuous_map": _Details(lambda s: [s.column, f"{s.column}_min", f"{s.column}_max", ERROR], _continuous_map),
        "text": _Details(lambda s: [*_text_columns(s), ERROR], _text),
        "edge_map": _Details(lambda s: [s.column, ERROR], _edge_map),
        "metadata": _Details(lambda s: [s.column, ERROR], _metadata),
        "instances": _Details(lambda s: [s.column, ERROR], _instances),
    }
)
"""Kinds with statistics of their own; the others (direction and feature maps, palettes) get counts and
failures only."""


def _tokenizer(folder: Path) -> TokenizerStats | None:
    try:
        trained = json.loads((folder / "trained.json").read_text())
    except FileNotFoundError:
        return None
    return TokenizerStats(folder.name, trained["samples"], trained["metrics"], trained["config_hash"])


def _tokens(root: DatasetRoot, modality: str, cap: int) -> TokenStats | None:
    files = _folder(root, f"tokens/{modality}", f"tokenize/{modality}", _token_failures)
    if files is None:
        return None
    tokens = _sample(root / f"tokens/{modality}", ["tokens"], cap, "tokens")["tokens"]
    vocab_size = int(files.provenance["vocab_size"])
    cropped = not pa.types.is_integer(tokens.type.value_type)  # one id list per crop (rows are all present)
    views = pc.list_flatten(tokens) if cropped else tokens
    ids = pc.list_flatten(views).to_numpy(zero_copy_only=False)
    return TokenStats(
        modality=modality,
        files=files,
        tokenizer=files.provenance.get("tokenizer", "unknown"),
        vocab_size=vocab_size,
        sampled_rows=len(tokens),
        tokens_per_row=round(len(ids) / len(views), 2) if len(views) else 0.0,
        ids_used=round(len(np.unique(ids)) / vocab_size, 4),
        crops_per_row=round(len(views) / len(tokens), 2) if cropped and len(tokens) else 1.0,
    )


def _finished_runs(runs: Path) -> list[Path]:
    """The run folders with a ``model.json``; not a folder an import is writing or replacing
    (``.<run>.importing-<id>``, ``.<run>.replaced``: ``train/import_run.py``)."""
    return [f for f in sorted(runs.glob("*/")) if not f.name.startswith(".") and (f / DESCRIPTION).is_file()]


def _run(folder: Path) -> RunStats:
    described = json.loads((folder / DESCRIPTION).read_text())
    losses = read_losses(folder / LOGS)
    return RunStats(
        name=folder.name,
        model=described["model"],
        modalities=tuple(m["name"] for m in described["modalities"]),
        last_step=losses[-1][0] if losses else 0,
        loss_first=losses[0][1] if losses else None,
        loss_last=losses[-1][1] if losses else None,
    )
