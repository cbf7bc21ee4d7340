"""Train one tokenizer on a run's own data (``make tokenizers``): the pure part, no Ray here.

Captions and boxes share one WordPiece vocabulary (4M's design), so they are trained together as
the ``text`` group: the vocabulary is learned from the alt-texts and generated captions, then
saved for ``caption`` and, wrapped as a coded-sequence tokenizer, for ``det``, ``color_palette``
and ``metadata``. Every map modality gets its own VQ tokenizer, unless it shares another's
(``tokenize.<map>.share``: 4M-21 tokenizes SAM edges with the Canny edge tokenizer), which is then
copied into its folder once trained. Each tokenizer folder is written under a temporary name, completed
with ``trained.json`` (config hash, samples, metrics) and renamed into place: a folder that
exists is finished, and a killed run leaves only a temporary folder, cleared on the next start.
Then its marker records every file's size and sha256 (``TrainedFiles``), for ``make verify``.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from four_m import __version__
from four_m.core import storage
from four_m.core.config import Config, TokenizeConfig, shaping_hash
from four_m.core.crops import draw_crops
from four_m.core.dataset_root import DatasetRoot, FileDigest, shard_name
from four_m.core.modalities import MODALITIES, map_modalities, of_kind, sequence_modalities
from four_m.tokenize.maps import ADAPTERS
from four_m.tokenize.ml4m_tokenizer import ML4MTokenizer
from four_m.tokenize.registry import TRAINED, sequence_tokenizer, tokenizer_dir, tokenizer_state
from four_m.tokenize.sources import crop_adapter, cropper, read_rows, source_file
from four_m.tokenize.text import TextTokenizer
from four_m.tokenize.vq_training import train_vq

TEXT = "text"
"""The group of the modalities that share the WordPiece vocabulary: every sequence modality."""


def groups_of(tokenize: TokenizeConfig) -> list[str]:
    """Training units for ``tokenize.modalities``: ``text`` (if any sequence is asked for), then
    each map with a tokenizer of its own (one that shares another's is a member of that one's)."""
    modalities = tokenize.modalities
    text = [TEXT] if set(modalities) & set(sequence_modalities()) else []
    return text + [m for m in map_modalities() if m in modalities and tokenize.owner(m) == m]


def members(group: str, tokenize: TokenizeConfig) -> tuple[str, ...]:
    """Who gets the group's tokenizer: every sequence for ``text``; a map and the maps sharing it."""
    if group == TEXT:
        return sequence_modalities()
    sharing = [m for m in tokenize.modalities if m != group and tokenize.owner(m) == group]
    return (group, *sharing)


def fit_hash(config: Config, group: str) -> str:
    """What shapes a trained tokenizer (of a group: a sharing map's is its owner's); a change makes
    the finished one stale."""
    if group == TEXT:
        return shaping_hash(config.tokenize.text, config.tokenize.train_samples)
    return shaping_hash(
        config.tokenize.vq(group), config.label.size, config.tokenize.train_samples, config.tokenize.crops
    )


def trained_hash(root: DatasetRoot, modality: str) -> str | None:
    """The config hash a finished tokenizer was trained with, None if there is none."""
    try:
        return json.loads((tokenizer_dir(root, modality) / TRAINED).read_text())["config_hash"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


def fit_group(root: DatasetRoot, group: str, config: Config, shards: list[int]) -> dict[str, dict]:
    """Train the group's tokenizer(s) on the first ``train_samples`` usable rows; returns metrics."""
    started = time.perf_counter()
    if group == TEXT:
        results = _fit_text(root, config, shards)
    else:
        values = list(_values(root, group, config, shards))
        if not values:
            raise ValueError(f"{group}: no usable rows in the first shards to train a tokenizer on")
        # A label file's metadata gives the adapter's settings (semseg classes, clip width).
        params = ADAPTERS[group].params_of(storage.read_schema(source_file(root, group, shards[0])))
        with _finished_folder(root, group) as folder:
            vq = config.tokenize.vq(group)
            if vq.source:  # ml-4m's released tokenizer instead of a trained one
                imported = ML4MTokenizer.from_source(group, vq.source, crop_adapter(group, config, params))
                imported.save(folder)
                metrics = {"imported_from": vq.source}
            else:
                size = values[0].shape[-1]  # tokenize.crops.size, or a feature map's grid
                accelerator = "gpu" if config.tokenize.num_gpus > 0 else "cpu"
                metrics = train_vq(group, values, vq, size, folder, params, accelerator, config.tokenize.precision)
            _write_trained(folder, group, fit_hash(config, group), len(values), metrics)
            for sharing in members(group, config.tokenize)[1:]:
                with _finished_folder(root, sharing) as copy:
                    shutil.copytree(folder, copy, dirs_exist_ok=True)
                    _write_trained(copy, sharing, fit_hash(config, group), len(values), {**metrics, "shared": group})
        results = {m: {"samples": len(values), **metrics} for m in members(group, config.tokenize)}
    for result in results.values():
        result["seconds"] = round(time.perf_counter() - started, 1)
    return results


def _fit_text(root: DatasetRoot, config: Config, shards: list[int]) -> dict[str, dict]:
    cfg = config.tokenize.text
    texts = [] if cfg.file else list(_text_corpus(root, shards, config.tokenize.train_samples))
    text = TextTokenizer.from_config(cfg, texts)
    metrics = {"samples": len(texts), "vocab_size": text.vocab_size}
    for modality in members(TEXT, config.tokenize):
        with _finished_folder(root, modality) as folder:
            sequence_tokenizer(MODALITIES[modality].kind, text).save(folder)
            _write_trained(folder, modality, fit_hash(config, TEXT), len(texts), metrics)
    return {m: dict(metrics) for m in members(TEXT, config.tokenize)}


def _text_corpus(root: DatasetRoot, shards: list[int], limit: int) -> Iterator[str]:
    """The vocabulary's corpus: per text modality, its alt-texts and generated texts of the first
    ``limit`` rows."""
    for spec in (MODALITIES[m] for m in of_kind("text")):
        columns = (["alt_text"] if spec.alt_text else []) + [spec.column]
        rows = 0
        for shard in shards:
            table = storage.read_table(root / f"{spec.folder}/{shard_name(shard)}.parquet", columns=columns)
            for texts in zip(*(table[c].to_pylist() for c in columns), strict=True):
                yield from (t for t in texts if isinstance(t, str) and t.strip())
                rows += 1
                if rows >= limit:
                    break
            if rows >= limit:
                break


def _values(root: DatasetRoot, modality: str, config: Config, shards: list[int]) -> Iterator:
    """Values of the first shards' present rows, every crop of each (``tokenize.crops``: the
    tokenizer learns the views it will encode), up to ``train_samples``; absent rows are skipped."""
    count = 0
    for shard in shards:
        rows = read_rows(root, modality, shard, config)
        cut = cropper(root, modality, shard, config)
        for key, value in zip(rows.keys, rows.values, strict=True):
            if value is None:
                continue
            for crop in draw_crops(key, config.tokenize.crops):
                yield cut(value, crop)
                count += 1
                if count >= config.tokenize.train_samples:
                    return


class _finished_folder:
    """A temporary local folder beside ``tokenizers/<modality>`` (or in local scratch, for a remote
    root), put in place if the block succeeds: renamed, or uploaded with ``trained.json`` last."""

    def __init__(self, root: DatasetRoot, modality: str):
        self.root, self.modality = root, modality
        self.final = tokenizer_dir(root, modality)
        self.temp = storage.scratch(self.final.parent) / f".{modality}.{uuid.uuid4().hex[:8]}.tmp"

    def __enter__(self) -> Path:
        self.temp.mkdir(parents=True)
        return self.temp

    def __exit__(self, kind, *exc) -> None:
        if kind is None:  # what it replaces is only ever an unfinished or stale one
            trained = TrainedFiles.read(self.root, self.modality, self.temp)  # hashed here, not read back
            storage.publish_folder(self.temp, self.final, last=TRAINED)
            trained.mark(self.root)
        shutil.rmtree(self.temp, ignore_errors=True)


@dataclass(frozen=True)
class TrainedFiles:
    """A finished tokenizer folder's files as its marker records them (``tokenizer_state``)."""

    modality: str
    files: tuple[FileDigest, ...]
    samples: int
    config_hash: str

    @classmethod
    def read(cls, root: DatasetRoot, modality: str, folder: storage.RootPath | None = None) -> TrainedFiles:
        """Hashed from ``folder``, the local folder about to be published, or else from its place."""
        final = tokenizer_dir(root, modality)
        folder = final if folder is None else folder
        names = sorted(storage.list_files(folder))
        files = tuple(FileDigest.of(folder / name, root.relative(final / name)) for name in names)
        trained = json.loads((folder / TRAINED).read_text())
        return cls(modality, files, trained["samples"], trained["config_hash"])

    def mark(self, root: DatasetRoot) -> None:
        """Write the marker; call once the folder is in place."""
        tokenizer_state(root, self.modality).record(0, self.samples, self.files, self.config_hash)


def _write_trained(folder: Path, modality: str, config_hash: str, samples: int, metrics: dict) -> None:
    record = {
        "modality": modality,
        "config_hash": config_hash,
        "samples": samples,
        "package": f"four-m {__version__}",
        "metrics": metrics,
    }
    (folder / TRAINED).write_text(json.dumps(record, indent=1))
