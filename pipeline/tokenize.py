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
from pathlib import PurePosixPath

import pyarrow as pa
import ray

from four_m import __version__
from four_m.core import storage
from four_m.core.config import Config, shaping_hash
from four_m.core.crops import smallest_side
from four_m.core.curation import decisions_file
from four_m.core.dataset_root import DatasetRoot, FileDigest, shard_name
from four_m.core.errors import UserError
from four_m.core.modalities import MODALITIES
from four_m.core.summary import ShardReport, StageSummary
from four_m.pipeline.executor import ray_session, worker_options
from four_m.pipeline.stage import Output, StageRun, downloaded_images, image_keys
from four_m.tokenize.base import Tokenizer
from four_m.tokenize.registry import load_tokenizer, tokenizer_id
from four_m.tokenize.shard import token_file, tokenize_shard

STAGE = "tokenize"
log = logging.getLogger(__name__)


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
        device = "cuda" if config.tokenize.num_gpus > 0 else "cpu"
        for tokenizer in self.tokenizers.values():
            tokenizer.run_on(device, config.tokenize.precision)
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
    images = downloaded_images(root, config.verify_checksums, TokenizeStageError)
    tokenizers = {m: _loaded(root, m) for m in modalities}  # fails early, naming what is missing
    ids = {m: tokenizer_id(root, m) for m in modalities}
    hashes = {m: tokens_hash(config, m, ids[m]) for m in modalities}
    run = StageRun(
        root,
        config,
        STAGE,
        outputs={m: Output(f"tokens/{m}", root.stage(f"{STAGE}/{m}"), hashes[m]) for m in modalities},
        inputs={m: {} for m in modalities},
        summary=TokenizeSummary(modalities={m: StageSummary(stage=f"{STAGE}/{m}") for m in modalities}),
    )
    run.check_not_stale(sorted(images), TokenizeStageError, "tokenizer or tokenize config")
    _log_crop_resolution(config)
    run.begin()
    pending: dict[int, list[str]] = {}
    for m in modalities:
        for shard, digest in sorted(images.items()):
            try:
                run.inputs[m][shard] = _inputs(root, m, shard, digest, config.verify_checksums)
            except _UnfinishedLabels as err:
                log.warning("tokenize/%s: shard %05d not tokenized: %s", m, shard, err)
                run.summary.shards_failed.setdefault(shard, str(err))
        todo = run.pending(m)
        run.summary.modalities[m].shards_skipped = len(run.inputs[m]) - len(todo)
        for shard in todo:
            pending.setdefault(shard, []).append(m)
    if pending:
        crops = json.dumps(asdict(config.tokenize.crops), sort_keys=True)
        provenance = {m: _provenance(m, tokenizers[m], ids[m], hashes[m], crops) for m in modalities}
        with ray_session(config.ray):
            _run(run, pending, provenance, progress)
    run.summary.seconds = time.perf_counter() - started
    for stage_summary in run.summary.modalities.values():
        stage_summary.seconds = run.summary.seconds
    run.write_summary(_summary_dict(run.summary))
    return run.summary


def _log_crop_resolution(config: Config) -> None:
    """Say when 4M's smallest crops are enlarged to the tokenizers' input (docs/crops.md)."""
    crops = config.tokenize.crops
    smallest = smallest_side(crops, config.label.size)
    if crops.n_crops > 1 and smallest < crops.size:
        log.info(
            "tokenize: the smallest crop keeps %d px of the %d px label view and is enlarged to %d px;"
            " a label.size of %d would keep them all at full resolution",
            smallest,
            config.label.size,
            crops.size,
            math.ceil(crops.size * config.label.size / max(smallest, 1)),
        )


def tokens_hash(config: Config, modality: str, tokenizer: str) -> str:
    """What shapes a modality's tokens: the tokenizer itself, for a text with an alt-text which text
    is read, and for a cropped modality (maps, boxes) the crops."""
    spec = MODALITIES[modality]
    source = config.tokenize.caption_source if spec.alt_text else None
    return shaping_hash(tokenizer, source, *([config.tokenize.crops] if spec.cropped else []))


def _run(
    run: StageRun[TokenizeSummary],
    pending: dict[int, list[str]],
    provenance: dict[str, dict[str, str]],
    progress: bool,
) -> None:
    """Tokenize the pending modalities of each shard on an actor pool; mark each file as it comes back."""
    config = run.config
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
            log.warning("tokenize: shard %05d failed, the others go on: %s", shard, row["error"])
            run.summary.shards_failed[shard] = row["error"]
            continue
        keys = image_keys(run.root, shard)
        for m, fields in json.loads(row["reports"]).items():
            report = ShardReport(**fields)
            file = token_file(run.root, m, shard)
            run.finish(m, shard, file, storage.read_table(file, columns=["key"])["key"], report.rows_in, keys)
            run.summary.modalities[m].add(report)


class _UnfinishedLabels(Exception):
    """A label shard is missing, unfinished, or older than its images/ shard: that shard fails."""


def _inputs(
    root: DatasetRoot, modality: str, shard: int, images: FileDigest, verify_checksums: bool
) -> tuple[FileDigest, ...]:
    """What one shard's tokens are made from: the images/ shard, plus the label shard for labelled
    modalities, which must itself have been made from exactly those images, plus curation's
    decisions where it has decided (a new decision retokenizes the shard, without labelling)."""
    folder = MODALITIES[modality].folder
    decisions = decisions_file(root, shard)
    curated = (root.digest(decisions),) if decisions.is_file() else ()
    if folder == "images":
        return (images, *curated)
    label_state = root.stage(f"label/{folder.removeprefix('labels/')}")
    file = root / f"{folder}/{shard_name(shard)}.parquet"
    marker = label_state.read_marker(shard)
    if marker is None:
        raise _UnfinishedLabels(f"{file} is not finished: run the label stage first")
    if marker.inputs[:1] != (images,) or not all(_current(root, shard, d) for d in marker.inputs[1:]):
        raise _UnfinishedLabels(
            f"{file} was not made from the current images/{shard_name(shard)}.parquet (a retried download,"
            " or labels older than input tracking, or from labels relabelled since): run the label stage first"
        )
    return (images, label_state.verified(shard, file, verify_checksums), *curated)


def _current(root: DatasetRoot, shard: int, read: FileDigest) -> bool:
    """Whether a label file that a derived label was made from (``labels/<source>/...``) is still
    the one its labeler's marker records."""
    source = PurePosixPath(read.path).parent.name
    return root.stage(f"label/{source}").recorded(shard, root / read.path) == read


def _loaded(root: DatasetRoot, modality: str) -> Tokenizer:
    try:
        return load_tokenizer(root, modality)
    except FileNotFoundError as err:
        raise TokenizeStageError(str(err)) from None


def _provenance(
    modality: str, tokenizer: Tokenizer, tokenizer_name: str, config_hash: str, crops: str
) -> dict[str, str]:
    """Everything a reader (the trainer) checks before trusting the ids: vocabulary and length, and
    for a cropped modality the crop settings (``tokenize.crops``, which every cropped modality of a
    run must share)."""
    return {
        **({"crops": crops} if MODALITIES[modality].cropped else {}),
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
