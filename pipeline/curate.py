"""The curate stage: score every downloaded row with the configured filters, find duplicates across
all shards, and record a decision per row and filter (``core.curation``), on Ray.

Three steps, each a set of Ray tasks (``map_shards``), each resumable or cheap to redo:

1. **score** (per shard and phase, marked done like any stage): the ``image`` filters read the
   downloaded bytes before anything is labelled; the ``label`` filters read the columns they
   declare from the label files once those are finished. Values go to
   ``curation/scores/<phase>/<shard>.parquet``: a score, or a duplicate search's signature, per
   row and filter, with the reason where a row could not be scored. Thresholds are not part of a
   score's config hash: a new threshold never scores again.
2. **search** (per duplicate filter): a shuffle through storage. A task per shard buckets its
   signatures (hash bands, k-means clusters) into ``partitions`` files; a task per partition
   compares the rows sharing a bucket and writes the pairs within the threshold. The driver reads
   only the pairs (duplicates, never every row), joins them into groups and keeps, of each group,
   the image with the most original pixels, then the smallest key: the same copy on every rerun.
3. **decide** (per shard): thresholds applied to the stored scores and the groups' verdicts written
   as ``curation/decisions/<shard>.parquet``, rewritten whole each run (seconds), so a changed
   threshold re-decides without downloading, labelling or scoring again.

What the driver holds: shard numbers, per-shard counts, the k-means fit sample (bounded by
``fit_sample``) and the duplicate pairs. See docs/curation.md.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from four_m.core import storage
from four_m.core.config import Config, shaping_hash
from four_m.core.curation import (
    DECISION_SCHEMA,
    FILTERS,
    IMAGE,
    LABEL,
    PAIRS,
    PHASES,
    SCORES,
    STAGE,
    FilterSpec,
    decide_threshold,
    decisions_file,
    score_settings,
)
from four_m.core.dataset_root import DatasetRoot, FileDigest, atomic_path, clear_temporaries, shard_name
from four_m.core.errors import UserError
from four_m.core.failures import ERROR
from four_m.pipeline.executor import map_shards, ray_session
from four_m.pipeline.shard_writer import shard_file
from four_m.pipeline.stage import Output, StageRun, downloaded_images, images_file, write_summary

log = logging.getLogger(__name__)
ROW_GROUP_ROWS = 1024
BLOCK = 1024
"""Rows of a bucket compared at once: a bucket of n rows costs n^2 distances in blocks of BLOCK^2."""
SIZE_COLUMNS = ("original_width", "original_height")
PAIR_COLUMNS = ("distance", "area_a", "area_b", "shard_a", "shard_b")


class CurateStageError(UserError):
    """The curate stage cannot start (no filters, nothing downloaded, stale scores)."""


@dataclass
class FilterTally:
    """One filter's counts in a run."""

    scored: int = 0
    unscored: Counter = field(default_factory=Counter)
    """Rows it could not score, by reason (kept: a filter that cannot judge a row does not remove it)."""
    removed: int = 0
    """Rows it removes (a row removed by several filters counts under each)."""
    pairs: int | None = None
    """A duplicate search's pairs within its threshold."""
    random_init: bool = False
    phase: str = ""
    threshold: float = 0.0


@dataclass
class CurateSummary:
    rows: int = 0
    kept: int = 0
    removed_by: Counter = field(default_factory=Counter)
    """Removed rows by the first filter (in ``curate.filters`` order) that removed them."""
    removed_before_label: int = 0
    filters: dict[str, FilterTally] = field(default_factory=dict)
    waiting: list[str] = field(default_factory=list)
    """Label filters not run: the labels they read are not finished yet."""
    score_seconds: dict[str, float] = field(default_factory=dict)
    scored_rows: dict[str, int] = field(default_factory=dict)
    shards_failed: dict[str, dict[int, str]] = field(default_factory=dict)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        lines = []
        for name, tally in self.filters.items():
            if name in self.waiting:
                continue
            unscored = ", ".join(f"{r}: {n}" for r, n in sorted(tally.unscored.items()))
            pairs = f", pairs {tally.pairs}" if tally.pairs is not None else ""
            warning = "  [RANDOM-INIT WEIGHTS: scores mean nothing]" if tally.random_init else ""
            lines.append(
                f"curate/{name}: scored {tally.scored}, not scored {sum(tally.unscored.values())}"
                f"{f' ({unscored})' if unscored else ''}, removed {tally.removed}{pairs}{warning}"
            )
        for name in self.waiting:
            lines.append(f"curate/{name}: waiting for its labels (run make label, then make curate again)")
        for step, failed in self.shards_failed.items():
            first = min(failed)
            lines.append(f"curate {step}: {len(failed)} tasks failed (first {first}: {failed[first]})")
        removed = ", ".join(f"{n}: {self.removed_by[n]}" for n in self.filters if self.removed_by[n])
        speed = ", ".join(
            f"{phase} filters {self.scored_rows[phase] / max(s, 1e-9):.1f} images/s"
            for phase, s in self.score_seconds.items()
        )
        lines.append(
            f"curate: rows {self.rows}, kept {self.kept}, removed {self.rows - self.kept}"
            f"{f' ({removed})' if removed else ''}; {self.removed_before_label} removed before labelling"
            f"{f'; scoring {speed}' if speed else ''}; {self.seconds:.1f} s"
        )
        return lines

    def as_dict(self) -> dict:
        return {
            "rows": self.rows,
            "kept": self.kept,
            "removed": self.rows - self.kept,
            "removed_by": {n: self.removed_by[n] for n in self.filters if self.removed_by[n]},
            "removed_before_label": self.removed_before_label,
            "filters": {n: {**dataclasses.asdict(t), "unscored": dict(t.unscored)} for n, t in self.filters.items()},
            "waiting": self.waiting,
            "score_seconds": {k: round(v, 3) for k, v in self.score_seconds.items()},
            "scored_rows": self.scored_rows,
            "shards_failed": {k: {str(s): e for s, e in v.items()} for k, v in self.shards_failed.items()},
            "seconds": round(self.seconds, 3),
        }


def run_curate(config: Config, progress: bool = True) -> CurateSummary:
    """Score, search and decide with ``curate.filters`` over every finished download shard."""
    names = config.curate.filters
    if not names:
        raise CurateStageError("curate.filters is empty: name the filters to run (docs/curation.md)")
    root = DatasetRoot(config.root)
    started = time.perf_counter()
    summary = CurateSummary(
        filters={n: FilterTally(phase=FILTERS[n].phase, threshold=config.curate.filter(n).threshold) for n in names}
    )
    with root.lock(STAGE):
        images = downloaded_images(root, config.verify_checksums, CurateStageError)
        specs = [FILTERS[n] for n in names]
        label_inputs = _label_inputs(root, config, specs, images)
        phases = [p for p in PHASES if any(s.phase == p for s in specs) and (p == IMAGE or label_inputs)]
        summary.waiting = [s.name for s in specs if s.phase == LABEL and not label_inputs]
        with ray_session(config.ray):
            for phase in phases:
                _score(root, config, [s for s in specs if s.phase == phase], images, label_inputs, summary, progress)
            decided = [s for s in specs if s.phase in phases]
            for spec in decided:
                if spec.kind == "duplicate":
                    _search(root, config, spec, images, summary, progress)
            _decide(root, config, decided, images, summary, progress)
    summary.seconds = time.perf_counter() - started
    write_summary(root, STAGE, summary.as_dict())
    return summary


def _label_inputs(
    root: DatasetRoot, config: Config, specs: list[FilterSpec], images: dict[int, FileDigest]
) -> dict[int, dict[str, FileDigest]]:
    """Per shard, the finished label files the label filters read, by modality; empty while any is
    missing (the label filters wait for the whole label stage, so every shard is decided alike)."""
    reads = sorted({m for s in specs if s.phase == LABEL for m in s.reads})
    found: dict[int, dict[str, FileDigest]] = {}
    for shard in images:
        files = {}
        for modality in reads:
            file = root / f"labels/{modality}/{shard_name(shard)}.parquet"
            if root.stage(f"label/{modality}").recorded(shard, file) is None:
                return {}
            files[modality] = root.stage(f"label/{modality}").verified(shard, file, config.verify_checksums)
        found[shard] = files
    return found if reads else {}


# --- step 1: scores ---------------------------------------------------------------------------


def _scores_folder(phase: str) -> str:
    return f"{SCORES}/{phase}"


def _scores_file(root: DatasetRoot, phase: str, shard: int) -> storage.RootPath:
    return root / f"{_scores_folder(phase)}/{shard_name(shard)}.parquet"


def _score_hash(config: Config, specs: list[FilterSpec]) -> str:
    """What shapes a phase's scores: its filters and their scoring settings (not thresholds, not a
    search's buckets, not batch sizes)."""
    return shaping_hash(*[(s.name, score_settings(config.curate.filter(s.name))) for s in specs])


def _score(
    root: DatasetRoot,
    config: Config,
    specs: list[FilterSpec],
    images: dict[int, FileDigest],
    label_inputs: dict[int, dict[str, FileDigest]],
    summary: CurateSummary,
    progress: bool,
) -> None:
    phase = specs[0].phase
    digests = {s: (d, *(label_inputs[s].values() if phase == LABEL else ())) for s, d in images.items()}
    output = Output(_scores_folder(phase), root.stage(f"{STAGE}/{phase}"), _score_hash(config, specs))
    run = StageRun(root, config, STAGE, {phase: output}, {phase: digests}, summary)
    run.check_not_stale(sorted(images), CurateStageError, f"set of {phase} filters or filter settings")
    run.begin()
    pending = run.pending(phase)
    started = time.perf_counter()
    task = partial(_score_shard, str(root.path), config, tuple(s.name for s in specs), str(_models_dir(root)))
    reports, failed = map_shards(
        pending, task, num_cpus=config.curate.num_cpus, desc=f"curate {phase}", progress=progress
    )
    if failed:
        summary.shards_failed[f"{phase} scores"] = failed
    for shard, report in reports.items():
        file = _scores_file(root, phase, shard)
        run.finish(
            phase, shard, file, storage.read_table(file, columns=["key"])["key"], report["rows"], _keys(root, shard)
        )
    if pending:
        summary.score_seconds[phase] = time.perf_counter() - started
        summary.scored_rows[phase] = sum(r["rows"] for r in reports.values())
    for report in reports.values():
        for name in report["random_init"]:
            summary.filters[name].random_init = True


def _keys(root: DatasetRoot, shard: int) -> pa.ChunkedArray:
    return storage.read_table(images_file(root, shard), columns=["key"])["key"]


def _models_dir(root: DatasetRoot) -> Path:
    return storage.scratch(root / "_models/curate")


def scorer(spec: FilterSpec, config: Config, models_dir: str):
    """The filter's scorer, imported where it runs (a worker), never in the driver."""
    module, name = spec.implementation.split(":")
    return getattr(importlib.import_module(module), name)(spec, config.curate.filter(spec.name), Path(models_dir))


def _score_shard(root_path: str, config: Config, names: tuple[str, ...], models_dir: str, shard: int) -> dict:
    """Score one shard with one phase's filters; write its scores file; return its counts."""
    root = DatasetRoot(root_path)
    specs = [FILTERS[n] for n in names]
    scorers = [scorer(s, config, models_dir) for s in specs]
    phase = specs[0].phase
    file = storage.parquet_file(images_file(root, shard))
    sizes = [c for c in SIZE_COLUMNS if c in file.schema_arrow.names]
    columns = ["key", "jpg", "status", "caption", *sizes]
    labels = {
        m: storage.read_table(root / f"labels/{m}/{shard_name(shard)}.parquet", columns=["key", *cols, ERROR])
        for m, cols in _label_columns(specs).items()
    }
    fields = [pa.field("key", pa.string()), pa.field("area", pa.int64())]
    for spec, scoring in zip(specs, scorers, strict=True):
        fields += [pa.field(spec.name, scoring.value_type), pa.field(f"{spec.name}.{ERROR}", pa.string())]
    schema = pa.schema(fields, metadata={"four_m.stage": STAGE, "four_m.phase": phase})
    batch_rows = min(config.curate.filter(n).batch_size for n in names)
    first = 0
    with shard_file(_scores_file(root, phase, shard), schema, ROW_GROUP_ROWS) as writer:
        for part in file.iter_batches(batch_size=batch_rows, columns=columns):
            table = pa.Table.from_batches([part])
            rows = _rows(table, sizes, {m: t.slice(first, table.num_rows) for m, t in labels.items()})
            first += table.num_rows
            out: dict[str, Any] = {
                "key": rows.keys,
                "area": [w * h if (w, h) != (0, 0) else None for w, h in _wh(rows)],
            }
            for spec, scoring in zip(specs, scorers, strict=True):
                out[spec.name], out[f"{spec.name}.{ERROR}"] = _scored(scoring, rows)
            writer.write(pa.table(out, schema=schema))
        written = writer.rows
    return {"rows": written, "random_init": [s.name for s, sc in zip(specs, scorers, strict=True) if sc.random_init]}


def _wh(rows) -> list[tuple[int, int]]:
    return [size or (0, 0) for size in rows.sizes]


def _label_columns(specs: list[FilterSpec]) -> dict[str, list[str]]:
    columns: dict[str, list[str]] = defaultdict(list)
    for spec in specs:
        for modality in spec.reads:
            columns[modality] += [c for c in spec.columns if c not in columns[modality]]
    return dict(columns)


def _rows(table: pa.Table, sizes: list[str], labels: dict[str, pa.Table]):
    from four_m.filters.base import Rows

    keys = table["key"].to_pylist()
    for name, rows in labels.items():
        if rows["key"].to_pylist() != keys:
            raise RuntimeError(f"labels/{name}: keys are not those of images/ (row order broken)")
    ok = [s == "success" for s in table["status"].to_pylist()]
    images = [data if good else None for data, good in zip(table["jpg"].to_pylist(), ok, strict=True)]
    if sizes:
        pairs = zip(table[sizes[0]].to_pylist(), table[sizes[1]].to_pylist(), strict=True)
        recorded = [(w, h) if w and h and good else None for (w, h), good in zip(pairs, ok, strict=True)]
    else:
        recorded = [None] * len(keys)
    return Rows(keys=keys, images=images, sizes=recorded, captions=table["caption"].to_pylist(), labels=labels)


def _scored(scoring, rows) -> tuple[list, list[str | None]]:
    """Values and errors of one filter over a batch: a batch that raises is retried row by row, and
    a row that alone raises keeps its error (it is counted, and kept)."""
    errors = [scoring.missing(rows, i) for i in range(len(rows))]
    try:
        values = scoring.values(rows)
    except Exception as err:  # noqa: BLE001 - the row that fails is found below
        log.warning("curate/%s: a batch of %d rows failed, scoring row by row: %s", scoring.spec.name, len(rows), err)
        values = []
        for index in range(len(rows)):
            try:
                (value,) = scoring.values(rows.subset(index))
            except Exception as row_err:  # noqa: BLE001 - counted with the row
                value, errors[index] = None, f"{type(row_err).__name__}: {row_err}"
            values.append(value)
    values = [None if error else value for value, error in zip(values, errors, strict=True)]
    errors = [error or (None if value is not None else "no value") for value, error in zip(values, errors, strict=True)]
    return values, errors


# --- step 2: duplicate search ----------------------------------------------------------------


def _search(
    root: DatasetRoot,
    config: Config,
    spec: FilterSpec,
    images: dict[int, FileDigest],
    summary: CurateSummary,
    progress: bool,
) -> None:
    """Search one filter's duplicates; write, per shard, the rows it removes and the copy each keeps."""
    folder = root / f"{PAIRS}/{spec.name}"
    storage.remove_tree(folder)  # redone whole each run: only stored signatures are read
    shards = sorted(images)
    scoring = scorer(spec, config, str(_models_dir(root)))
    scoring.fit(_fit_sample(root, spec, shards, config))
    partitions = config.curate.partitions
    bucket = partial(_bucket_shard, str(root.path), config, spec.name, scoring.state(), partitions)
    buckets, failed = map_shards(
        shards, bucket, num_cpus=config.curate.num_cpus, desc=f"curate {spec.name} buckets", progress=progress
    )
    dtypes = {d for d in buckets.values() if d}
    compare = partial(_compare_partition, str(root.path), config, spec.name, next(iter(dtypes), "float32"))
    pairs, failed_pairs = map_shards(
        [p for p in range(partitions) if dtypes],
        compare,
        num_cpus=config.curate.num_cpus,
        desc=f"curate {spec.name} pairs",
        progress=progress,
    )
    if failed or failed_pairs:
        summary.shards_failed[f"{spec.name} search"] = {
            **failed,
            **{f"partition {p}": e for p, e in failed_pairs.items()},
        }
    storage.remove_tree(folder / "_shuffle")
    edges = [storage.read_table(folder / f"{p:05d}.parquet") for p in sorted(pairs)]
    table = pa.concat_tables(edges) if edges else None
    summary.filters[spec.name].pairs = table.num_rows if table is not None else 0
    verdicts = _groups(table) if table is not None and table.num_rows else {}
    for shard, removed in verdicts.items():
        out = {
            "key": list(removed),
            "duplicate_of": [k for k, _ in removed.values()],
            "distance": [d for _, d in removed.values()],
        }
        _write(pa.table(out), _verdicts_file(root, spec.name, shard))


def _write(table: pa.Table, final: storage.RootPath) -> None:
    """Write a file of the search whole or not at all (temp, then rename)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(final) as temp:
        storage.write_table(table, temp)


def _verdicts_file(root: DatasetRoot, name: str, shard: int) -> storage.RootPath:
    """A duplicate search's removed rows of one shard (key, duplicate_of, distance): what its
    decision task reads, so no task is sent another shard's verdicts."""
    return root / f"{PAIRS}/{name}/verdicts/{shard_name(shard)}.parquet"


def _fit_sample(root: DatasetRoot, spec: FilterSpec, shards: list[int], config: Config) -> np.ndarray:
    """At most ``fit_sample`` stored signatures, spread evenly over the shards, for a search that
    fits something (k-means); an empty array for one that does not."""
    wanted = getattr(config.curate.filter(spec.name), "fit_sample", 0)
    if not wanted:
        return np.zeros((0,))
    scoring = scorer(spec, config, str(_models_dir(root)))
    per_shard = math.ceil(wanted / len(shards))
    parts = []
    for shard in shards:
        column = storage.read_table(_scores_file(root, spec.phase, shard), columns=[spec.name])[spec.name]
        column = column.filter(pc.is_valid(column))
        step = max(1, len(column) // per_shard)
        if len(column):
            parts.append(scoring.as_array(column.take(pa.array(range(0, len(column), step), pa.int64())[:per_shard])))
    if not parts:
        return np.zeros((0,))
    return np.concatenate(parts)[:wanted]


def _bucket_shard(root_path: str, config: Config, name: str, state: Any, partitions: int, shard: int) -> str | None:
    """Bucket one shard's signatures: a file per shuffle partition of (band, bucket, key, area,
    signature bytes). Returns the signatures' numpy dtype (None: nothing to bucket)."""
    root, spec = DatasetRoot(root_path), FILTERS[name]
    scoring = scorer(spec, config, "")
    scoring.load_state(state)
    table = storage.read_table(_scores_file(root, spec.phase, shard), columns=["key", "area", name])
    table = table.filter(pc.is_valid(table[name]))
    if not table.num_rows:
        return None
    signatures = scoring.as_array(table[name])
    buckets = scoring.buckets(signatures)  # (rows, bands)
    raw = signatures.reshape(len(signatures), -1)
    blobs = pa.array([row.tobytes() for row in raw], pa.binary())
    for band in range(buckets.shape[1]):
        ids = buckets[:, band]
        owner = (ids * 1_000_003 + band) % partitions
        for partition in np.unique(owner):
            chosen = np.flatnonzero(owner == partition)
            out = pa.table(
                {
                    "band": pa.array(np.full(len(chosen), band, np.int16)),
                    "bucket": pa.array(ids[chosen]),
                    "key": table["key"].take(chosen),
                    "shard": pa.array(np.full(len(chosen), shard, np.int32)),
                    "area": table["area"].take(chosen),
                    "signature": blobs.take(chosen),
                }
            )
            _write(out, root / f"{PAIRS}/{name}/_shuffle/{int(partition):05d}/{shard_name(shard)}-{band}.parquet")
    return str(raw.dtype)


def _compare_partition(root_path: str, config: Config, name: str, dtype: str, partition: int) -> int:
    """Compare the rows of each bucket of one partition; write the pairs within the threshold
    (each pair once, however many bands it shares). Returns their number."""
    root, spec = DatasetRoot(root_path), FILTERS[name]
    scoring = scorer(spec, config, "")
    threshold = config.curate.filter(name).threshold
    folder = root / f"{PAIRS}/{name}/_shuffle/{partition:05d}"
    files = sorted(folder.glob("*.parquet")) if folder.exists() else []
    found: dict[tuple[str, str], tuple[float, int, int, int, int]] = {}
    if files:
        table = pa.concat_tables([storage.read_table(f) for f in files])
        table = table.sort_by([("band", "ascending"), ("bucket", "ascending"), ("key", "ascending")])
        keys, areas, shards = table["key"].to_pylist(), table["area"].to_pylist(), table["shard"].to_pylist()
        vectors = np.frombuffer(b"".join(table["signature"].to_pylist()), np.dtype(dtype)).reshape(table.num_rows, -1)
        vectors = vectors[:, 0] if vectors.shape[1] == 1 else vectors
        group = np.stack([table["band"].to_numpy(), table["bucket"].to_numpy()], axis=1)
        starts = np.flatnonzero(np.r_[True, (group[1:] != group[:-1]).any(axis=1)])
        for start, stop in zip(starts, np.r_[starts[1:], len(keys)], strict=True):
            for left, right, distance in _close_pairs(scoring, vectors, start, stop, threshold):
                pair = (keys[left], keys[right])
                found.setdefault(pair, (distance, areas[left] or 0, areas[right] or 0, shards[left], shards[right]))
    values = list(zip(*found.values(), strict=True)) or [()] * 5
    out = pa.table(
        {
            "a": pa.array([a for a, _ in found], pa.string()),
            "b": pa.array([b for _, b in found], pa.string()),
            **{
                name: pa.array(column, kind)
                for name, column, kind in zip(
                    PAIR_COLUMNS, values, (pa.float64(), pa.int64(), pa.int64(), pa.int32(), pa.int32()), strict=True
                )
            },
        }
    )
    _write(out, root / f"{PAIRS}/{name}/{partition:05d}.parquet")
    return len(found)


def _close_pairs(scoring, vectors: np.ndarray, start: int, stop: int, threshold: float):
    """Pairs (i < j) of rows start..stop within ``threshold``, compared in blocks of BLOCK rows."""
    for i0 in range(start, stop, BLOCK):
        for j0 in range(i0, stop, BLOCK):
            i = np.arange(i0, min(i0 + BLOCK, stop))
            j = np.arange(j0, min(j0 + BLOCK, stop))
            left, right = np.meshgrid(i, j, indexing="ij")
            upper = left < right
            left, right = left[upper], right[upper]
            if not len(left):
                continue
            distances = scoring.distances(vectors[left], vectors[right])
            close = distances <= threshold
            yield from zip(left[close].tolist(), right[close].tolist(), distances[close].tolist(), strict=True)


def _groups(pairs: pa.Table) -> dict[int, dict[str, tuple[str, float]]]:
    """Join pairs into groups (union-find); of each, keep the most pixels, then the smallest key.
    Per shard, per removed key: (the key kept, the smallest distance among its pairs)."""
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    area: dict[str, int] = {}
    shard: dict[str, int] = {}
    nearest: dict[str, float] = {}
    for a, b, d, area_a, area_b, shard_a, shard_b in zip(
        *(pairs[c].to_pylist() for c in ("a", "b", *PAIR_COLUMNS)), strict=True
    ):
        area[a], area[b], shard[a], shard[b] = area_a, area_b, shard_a, shard_b
        nearest[a], nearest[b] = min(nearest.get(a, d), d), min(nearest.get(b, d), d)
        parent[find(a)] = find(b)
    members: dict[str, list[str]] = defaultdict(list)
    for key in area:
        members[find(key)].append(key)
    removed: dict[int, dict[str, tuple[str, float]]] = defaultdict(dict)
    for group in members.values():
        kept = min(group, key=lambda k: (-area[k], k))
        for key in group:
            if key != kept:
                removed[shard[key]][key] = (kept, nearest[key])
    return dict(removed)


# --- step 3: decisions ------------------------------------------------------------------------


def _decide(
    root: DatasetRoot,
    config: Config,
    specs: list[FilterSpec],
    images: dict[int, FileDigest],
    summary: CurateSummary,
    progress: bool,
) -> None:
    """Write every shard's decisions; count what was removed, by the first filter that removed it."""
    clear_temporaries(root / "curation/decisions")
    task = partial(_decide_shard, str(root.path), config, tuple(s.name for s in specs))
    reports, failed = map_shards(
        sorted(images), task, num_cpus=config.curate.num_cpus, desc="curate decide", progress=progress
    )
    if failed:
        summary.shards_failed["decisions"] = failed
    state, made_with = root.stage(f"{STAGE}/decisions"), shaping_hash(config.curate)
    for shard, report in sorted(reports.items()):
        # Rewritten each run, marked like any stage's file: what tokenize records it made tokens
        # from, and what make verify checks.
        state.mark_done(shard, report["rows"], [decisions_file(root, shard)], made_with, (images[shard],))
    for report in reports.values():
        summary.rows += report["rows"]
        summary.kept += report["kept"]
        summary.removed_by.update(report["removed_by"])
        summary.removed_before_label += report["removed_before_label"]
        for name, counts in report["filters"].items():
            tally = summary.filters[name]
            tally.scored += counts["scored"]
            tally.removed += counts["removed"]
            tally.unscored.update(counts["unscored"])


def _decide_shard(root_path: str, config: Config, names: tuple[str, ...], shard: int) -> dict:
    """Apply the thresholds to one shard's stored scores and its duplicate verdicts; write its decisions."""
    root = DatasetRoot(root_path)
    specs = [FILTERS[n] for n in names]
    scores = {
        phase: storage.read_table(_scores_file(root, phase, shard))
        for phase in {s.phase for s in specs}
        if _scores_file(root, phase, shard).is_file()
    }
    keys = _keys(root, shard).to_pylist()
    removed_by: dict[str, str] = {}
    counts = {n: {"scored": 0, "removed": 0, "unscored": Counter()} for n in names}
    columns: dict[str, list] = {f.name: [] for f in DECISION_SCHEMA}
    for spec in specs:
        table = scores.get(spec.phase)
        if table is None:
            continue
        threshold = config.curate.filter(spec.name).threshold
        values, errors = table[spec.name].to_pylist(), table[f"{spec.name}.{ERROR}"].to_pylist()
        verdicts = _verdicts(root, spec, shard)
        for key, value, error in zip(keys, values, errors, strict=True):
            duplicate_of, score = None, None
            if error:
                kept = None
                counts[spec.name]["unscored"][_reason(error)] += 1
            elif spec.kind == "duplicate":
                duplicate_of, score = verdicts.get(key, (None, None))
                kept = duplicate_of is None
            else:
                score = float(value)
                kept = decide_threshold(spec, score, threshold)
            if error is None:
                counts[spec.name]["scored"] += 1
            if kept is False:
                counts[spec.name]["removed"] += 1
                removed_by.setdefault(key, spec.name)
            for column, item in zip(
                DECISION_SCHEMA.names,
                (key, spec.phase, spec.name, score, threshold, kept, duplicate_of, error),
                strict=True,
            ):
                columns[column].append(item)
    with shard_file(decisions_file(root, shard), DECISION_SCHEMA, ROW_GROUP_ROWS) as writer:
        writer.write(pa.table(columns, schema=DECISION_SCHEMA))
    return {
        "rows": len(keys),
        "kept": len(keys) - len(removed_by),
        "removed_by": Counter(removed_by.values()),
        "removed_before_label": sum(FILTERS[f].phase == IMAGE for f in removed_by.values()),
        "filters": counts,
    }


def _verdicts(root: DatasetRoot, spec: FilterSpec, shard: int) -> dict[str, tuple[str, float]]:
    if spec.kind != "duplicate" or not _verdicts_file(root, spec.name, shard).is_file():
        return {}
    table = storage.read_table(_verdicts_file(root, spec.name, shard))
    columns = (table[c].to_pylist() for c in ("key", "duplicate_of", "distance"))
    return {key: (kept, distance) for key, kept, distance in zip(*columns, strict=True)}


def _reason(error: str) -> str:
    """A short reason for an unscored row: its error's text before any detail."""
    return error.split(":", 1)[0].split(" (", 1)[0]
