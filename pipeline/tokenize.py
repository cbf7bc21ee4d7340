"""The tokenize stage on Ray Data: ``images/`` + ``labels/`` -> ``tokens/<modality>/``, per shard.

Shards flow through an actor pool (``map_batches``, one shard per call) whose actors load every
trained tokenizer once and run ``tokenize.shard.tokenize_shard``; files are written atomically by
the actors, and the driver checks each file's keys against ``images/`` before it writes the
shard's marker (``_state/tokenize/<modality>/<shard>.done.json``). A marker records the digests
of the ``images/`` and ``labels/`` shards the tokens were made from. A rerun skips what is marked
and redoes what was made from inputs that changed since (a retried download, then its relabelled
shard), per shard and modality; a shard that fails is reported and the others go on.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import ray

from four_m import __version__
from four_m.core import storage
from four_m.core.config import Config, shaping_hash
from four_m.core.dataset_root import DatasetRoot, FileDigest, clear_temporaries, shard_name, write_text_atomic
from four_m.core.errors import UserError
from four_m.core.modalities import MODALITIES
from four_m.core.summary import ShardReport, StageSummary
from four_m.pipeline.executor import ray_session, worker_options
from four_m.tokenize.base import Tokenizer
from four_m.tokenize.registry import load_tokenizer, tokenizer_id
from four_m.tokenize.shard import token_file, tokenize_shard

STAGE = "tokenize"


class TokenizeStageError(UserError):
    """The stage cannot start: nothing labelled, a tokenizer missing, tokens made by another one."""


@dataclass
class TokenizeSummary:
    """One ``StageSummary`` per modality, and the shards that failed (any modality)."""

    modalities: dict[str, StageSummary] = field(default_factory=dict)
    shards_failed: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        lines = [s.line() for s in self.modalities.values()]
        lines += [f"  shard {s:05d} failed: {e}" for s, e in sorted(self.shards_failed.items())]
        return lines + [f"tokenize: {self.seconds:.1f} s"]


class TokenizeActor:
    """Holds every requested tokenizer (loaded once) and tokenizes one shard per call."""

    def __init__(self, config: Config, modalities: list[str], provenance: dict[str, dict[str, str]]):
        import torch

        torch.set_num_threads(max(1, math.ceil(config.tokenize.num_cpus)))
        self.root = DatasetRoot(config.root)
        self.config = config
        self.tokenizers = {m: load_tokenizer(self.root, m) for m in modalities}
        self.provenance = provenance

    def __call__(self, batch: pa.Table) -> pa.Table:
        shard = batch["shard"][0].as_py()
        wanted = json.loads(batch["modalities"][0].as_py())
        try:
            tokenizers = {m: self.tokenizers[m] for m in wanted}
            reports = tokenize_shard(self.root, shard, tokenizers, self.config, self.provenance)
            result = {"reports": json.dumps({m: asdict(r) for m, r in reports.items()}), "error": None}
        except Exception as err:  # noqa: BLE001 - reported for this shard; the others go on
            result = {"reports": None, "error": f"{type(err).__name__}: {err}"}
        return pa.table({"shard": [shard], **{k: [v] for k, v in result.items()}})


def run_tokenize(config: Config, progress: bool = True) -> TokenizeSummary:
    """Tokenize every labelled shard for the configured modalities; resumable per shard and modality."""
    root = DatasetRoot(config.root)
    with root.lock(STAGE):
        return _tokenize_root(root, config, progress)


def _tokenize_root(root: DatasetRoot, config: Config, progress: bool) -> TokenizeSummary:
    started = time.perf_counter()
    modalities = list(config.tokenize.modalities)
    images = _downloaded_shards(root, config.verify_checksums)
    shards = sorted(images)
    tokenizers = {m: _loaded(root, m) for m in modalities}  # fails early, naming what is missing
    ids = {m: tokenizer_id(root, m) for m in modalities}
    hashes = {m: tokens_hash(config, m, ids[m]) for m in modalities}
    states = {m: root.stage(f"{STAGE}/{m}") for m in modalities}
    for m in modalities:
        if states[m].stale_shards(shards, hashes[m]):
            raise TokenizeStageError(
                f"finished tokens/{m} shards were made with another tokenizer or config;"
                f" delete tokens/{m}/ and _state/{STAGE}/{m}/ (or use a new root)"
            )
    summary = TokenizeSummary(modalities={m: StageSummary(stage=f"{STAGE}/{m}") for m in modalities})
    pending: dict[int, list[str]] = {}
    inputs: dict[tuple[int, str], tuple[FileDigest, ...]] = {}
    for m in modalities:
        for folder in (root / f"tokens/{m}", states[m].folder):
            clear_temporaries(folder)
        states[m].write_run_config(config.to_yaml())
        for shard in shards:
            try:
                inputs[shard, m] = _inputs(root, m, shard, images[shard], config.verify_checksums)
            except _UnfinishedLabels as err:
                summary.shards_failed.setdefault(shard, str(err))
                continue
            if states[m].is_done(shard, config.verify_checksums, inputs[shard, m]):
                summary.modalities[m].shards_skipped += 1
            else:
                pending.setdefault(shard, []).append(m)
    if pending:
        provenance = {m: _provenance(m, tokenizers[m], ids[m], hashes[m]) for m in modalities}
        with ray_session(config.ray):
            _run(root, config, pending, provenance, states, hashes, inputs, summary, progress)
    summary.seconds = time.perf_counter() - started
    for stage_summary in summary.modalities.values():
        stage_summary.seconds = summary.seconds
    write_text_atomic(root / f"_state/{STAGE}/summary.json", json.dumps(_summary_dict(summary), indent=1))
    return summary


def tokens_hash(config: Config, modality: str, tokenizer: str) -> str:
    """What shapes a modality's tokens: the tokenizer itself, and for captions which text is read."""
    source = config.tokenize.caption_source if modality == "caption" else None
    return shaping_hash(tokenizer, source)


def _run(root, config: Config, pending, provenance, states, hashes, inputs, summary: TokenizeSummary, progress) -> None:
    ray.data.DataContext.get_current().enable_progress_bars = progress
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    items = [{"shard": s, "modalities": json.dumps(ms)} for s, ms in sorted(pending.items())]
    modalities = sorted({m for ms in pending.values() for m in ms})
    results = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        TokenizeActor,
        fn_constructor_kwargs={"config": config, "modalities": modalities, "provenance": provenance},
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.tokenize.concurrency),
        num_cpus=config.tokenize.num_cpus,
        num_gpus=config.tokenize.num_gpus or None,
        **worker_options(),
    )
    for row in results.iter_rows():
        shard = row["shard"]
        if row["error"] is not None:
            summary.shards_failed[shard] = row["error"]
            continue
        for m, fields in json.loads(row["reports"]).items():
            report = ShardReport(**fields)
            _finish(root, shard, m, report, states[m], hashes[m], inputs[shard, m], summary.modalities[m])


def _finish(
    root: DatasetRoot, shard: int, modality: str, report: ShardReport, state, config_hash, inputs, summary
) -> None:
    """Check the written file against ``images/`` (same keys, same order), then mark it done."""
    file = token_file(root, modality, shard)
    keys = storage.read_table(file, columns=["key"])["key"]
    image_keys = storage.read_table(root / f"images/{shard_name(shard)}.parquet", columns=["key"])["key"]
    if not keys.equals(image_keys):
        file.unlink()
        raise RuntimeError(f"{file}: keys are not those of images/ (row order broken)")
    summary.add(report)
    state.mark_done(shard, report.rows_in, [file], config_hash, inputs)


def _downloaded_shards(root: DatasetRoot, verify_checksums: bool) -> dict[int, FileDigest]:
    """Finished download shards, each with the digest of its images/ file, checked against it."""
    download = root.stage("download")
    shards = sorted(int(p.name.split(".")[0]) for p in download.folder.glob("*.done.json"))
    images = {s: download.verified(s, root / f"images/{shard_name(s)}.parquet", verify_checksums) for s in shards}
    if not images:
        raise TokenizeStageError(f"no finished download shards under {root.path}: run download and label first")
    return images


class _UnfinishedLabels(Exception):
    """A label shard is missing, unfinished, or older than its images/ shard: that shard fails."""


def _inputs(
    root: DatasetRoot, modality: str, shard: int, images: FileDigest, verify_checksums: bool
) -> tuple[FileDigest, ...]:
    """What one shard's tokens are made from: the images/ shard, plus the label shard for labelled
    modalities, which must itself have been made from exactly those images."""
    folder = MODALITIES[modality].folder
    if folder == "images":
        return (images,)
    label_state = root.stage(f"label/{folder.removeprefix('labels/')}")
    file = root / f"{folder}/{shard_name(shard)}.parquet"
    marker = label_state.read_marker(shard)
    if marker is None:
        raise _UnfinishedLabels(f"{file} is not finished: run the label stage first")
    if marker.inputs != (images,):
        raise _UnfinishedLabels(
            f"{file} was not made from the current images/{shard_name(shard)}.parquet (a retried download,"
            " or labels older than input tracking): run the label stage first"
        )
    return (images, label_state.verified(shard, file, verify_checksums))


def _loaded(root: DatasetRoot, modality: str) -> Tokenizer:
    try:
        return load_tokenizer(root, modality)
    except FileNotFoundError as err:
        raise TokenizeStageError(str(err)) from None


def _provenance(modality: str, tokenizer: Tokenizer, tokenizer_name: str, config_hash: str) -> dict[str, str]:
    """Everything a reader (the trainer) checks before trusting the ids: vocabulary and length."""
    return {
        "stage": STAGE,
        "package": f"four-m {__version__}",
        "modality": modality,
        "tokenizer": tokenizer_name,
        "config_hash": config_hash,
        "vocab_size": str(tokenizer.vocab_size),
        "max_tokens": str(tokenizer.max_tokens),
        "fixed_length": str(tokenizer.fixed_length).lower(),
    }


def _summary_dict(summary: TokenizeSummary) -> dict:
    return {
        "seconds": round(summary.seconds, 3),
        "modalities": {m: s.as_dict() for m, s in summary.modalities.items()},
        "shards_failed": {str(k): v for k, v in summary.shards_failed.items()},
    }
