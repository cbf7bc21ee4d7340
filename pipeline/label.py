"""The label stage: ``images/`` shards -> ``labels/<modality>/`` shards, on Ray Data.

One Ray Data execution covers every shard a level of labelers owes (or ``label.shards_per_run``),
so actors start and load their models once: a task per shard decodes each image once and cuts its
views (``core.views``, packed into batches by ``pipeline.views``), then one
actor pool per labeler (batch size, concurrency, CPU and GPU share from config) adds that labeler's
columns. Each pool's actors write what they labelled where they run, as parts of each of their
labelers' shard files (``pipeline.shard_parts``), and the last pool hands the driver only (shard,
rows). Order is not preserved, so no pool waits for the slowest block; once a shard's rows are all
written, one remote task merges its parts into the shard files in ``images/`` row order, and the
driver checks their keys and writes their markers. The labelers are imported, built and asked for
their files' schema and provenance in the actors only: the driver plans from names and configs and
never imports a network library (torch, transformers, ultralytics), and never holds a label byte.
Markers are per labeler and shard (``_state/label/<modality>/``) and record the digest of the
``images/`` shard they were made from: a rerun, or ``--only depth,det``, redoes exactly what is
missing or was made from images that changed since (a retried download), and never touches the
other folders.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import ray

from four_m import __version__
from four_m.core import storage
from four_m.core.config import Config, shaping_hash
from four_m.core.dataset_root import DatasetRoot, FileDigest, shard_name
from four_m.core.errors import UserError
from four_m.core.failures import ERROR, label_failure_reason, labeler_timeout
from four_m.core.modalities import MODALITIES
from four_m.core.provenance import RANDOM_INIT
from four_m.labelers.base import DerivedLabeler, LabelBatch, Labeler
from four_m.labelers.registry import LABELERS
from four_m.pipeline.executor import ray_session, worker_options
from four_m.pipeline.shard_parts import ROW, merge_shard, remove_parts, write_part
from four_m.pipeline.stage import Output, StageRun, downloaded_images, image_keys, images_file, write_summary
from four_m.pipeline.time_limit import TimeLimitExceeded, within
from four_m.pipeline.views import VIEW_ERROR, add_views, pixels_of

STAGE = "label"
log = logging.getLogger(__name__)
ROW_GROUP_ROWS = 256
ORIGINAL_SIZE = ("original_width", "original_height")
TASK_CPUS = 0.25
"""CPUs of a read or decode task: small, so tasks still fit beside the labelers' actor pools."""
Merging = dict[int, tuple[list[str], ray.ObjectRef]]
"""Shard -> the labelers whose files one task is merging, and that task."""


class LabelStageError(UserError):
    """The label stage cannot start (nothing downloaded, stale shards, an unknown labeler)."""


def column(labeler: str, name: str) -> str:
    """Labelers' columns travel side by side through the pipeline, prefixed by modality."""
    return f"{labeler}.{name}"


@dataclass(frozen=True)
class ShardTarget:
    """Where one labeler's shards go in this run: small and picklable, for the writing actors."""

    folder: str
    """Relative to the root: ``labels/<name>``."""
    config_hash: str
    """The shaping hash of its config, which its files' metadata records."""
    shards: frozenset[int]
    """The shards this labeler writes in this run (the others are done or not in the chunk)."""


def _shard_of(path: str) -> int:
    return int(Path(path).name.split(".")[0])


class LabelerActor:
    """One actor of a pool: loads its labelers' weights once, then labels batch after batch, and
    writes what it labelled as parts of each labeler's shard files (``pipeline.shard_parts``).

    Usually one labeler per pool; ``label.actor_groups`` puts several in one actor where a
    machine is too small for a process per labeler (each process imports torch and friends).
    Labeler classes are imported here, in the actor, never on the driver: a file's schema and
    provenance come from the labeler that writes it. A pool hands the next one the batch without
    its own labels; the last pool returns only ``(shard, rows)``, all the driver needs to know.
    """

    def __init__(
        self,
        names: list[str],
        config: Config,
        models_dir: str,
        targets: dict[str, ShardTarget],
        derived_from_random_init: frozenset[str],
        last: bool,
    ):
        import torch  # the networks run here: the driver never imports them

        # As many threads as CPUs Ray reserved for this actor.
        torch.set_num_threads(max(1, math.ceil(config.label.pool_settings(names).num_cpus)))
        self.root = storage.location(config.root)
        self.labelers: list[tuple[Labeler, pa.Schema]] = []
        self.targets: dict[str, tuple[ShardTarget, pa.Schema]] = {}
        """Per labeler: where its parts go and its file schema (payload, provenance)."""
        for name in names:
            labeler = LABELERS[name](config.label.labeler(name), config.label.size, Path(models_dir) / name, self.root)
            if isinstance(labeler, DerivedLabeler):
                labeler.derived_from_random_init = name in derived_from_random_init
            labeler.setup()
            self.labelers.append((labeler, labeler.schema()))
            self.targets[name] = (targets[name], _file_schema(labeler, config, targets[name].config_hash))
        self.last = last

    def __call__(self, batch: pa.Table) -> pa.Table:
        for labeler, schema in self.labelers:
            batch = _apply(labeler, schema, batch)
        # Only the written columns are split by shard: filtering the pixel views too would copy them.
        own = [c for c in batch.column_names if any(c.startswith(column(n, "")) for n in self.targets)]
        written = batch.select(["key", "caption", "path", ROW, *own])
        shards, rows = [], []
        for path in sorted(set(written["path"].to_pylist())):
            part = written.filter(pc.equal(written["path"], path))
            shard = _shard_of(path)
            for name, (target, schema) in self.targets.items():
                if shard in target.shards:
                    table = _modality_table(part, name, schema).append_column(ROW, part[ROW])
                    write_part(self.root, target.folder, shard, table)
            shards.append(shard)
            rows.append(part.num_rows)
        if self.last:
            return pa.table({"shard": pa.array(shards, pa.int64()), "rows": pa.array(rows, pa.int64())})
        # Its labels are written: the next pool needs only the views and the url-list columns.
        return batch.drop_columns(own)


def _apply(labeler: Labeler, schema: pa.Schema, batch: pa.Table) -> pa.Table:
    """Append one labeler's payload and error columns to a pipeline batch."""
    errors = batch[VIEW_ERROR].to_pylist()
    rows = [i for i, error in enumerate(errors) if error is None]
    payloads: list[dict | None] = [None] * batch.num_rows
    if rows:
        inputs = _label_batch(batch, rows, labeler)
        for row, payload, error in _label_isolated(labeler, inputs, rows, labeler.cfg.timeout_s):
            payloads[row] = payload
            errors[row] = error
    table = pa.Table.from_pylist([p or {} for p in payloads], schema=schema)
    for field_ in schema:
        batch = batch.append_column(column(labeler.name, field_.name), table[field_.name])
    return batch.append_column(column(labeler.name, ERROR), pa.array(errors, pa.string()))


def _label_batch(batch: pa.Table, rows: list[int], labeler: Labeler) -> LabelBatch:
    """The labeler's view of the pipeline batch's ``rows``: pixels at its input size, the url-list
    fields, and the labels it reads (a failed one is None)."""

    def picked(name: str) -> list:
        values = batch[name].to_pylist()
        return [values[row] for row in rows]

    labels = {}
    for source in MODALITIES[labeler.name].label_inputs:
        prefix, failures = f"{source}.", column(source, ERROR)
        if failures not in batch.column_names:
            continue  # never made for this shard: the labeler leaves out what it would give
        names = [n[len(prefix) :] for n in batch.column_names if n.startswith(prefix) and n != failures]
        values = {n: picked(column(source, n)) for n in names}
        failed = picked(failures)
        labels[source] = [None if failed[i] else {n: values[n][i] for n in names} for i in range(len(rows))]
    recorded = all(c in batch.column_names for c in ORIGINAL_SIZE)
    sizes = zip(*(picked(c) for c in ORIGINAL_SIZE), strict=True) if recorded else [(None, None)] * len(rows)
    return LabelBatch(
        pixels=pixels_of(batch, labeler.cfg.input_size)[rows],
        keys=picked("key"),
        alt_texts=picked("caption"),
        original_sizes=[(w, h) if w and h else None for w, h in sizes],
        labels=labels,
    )


def _label_isolated(
    labeler: Labeler, batch: LabelBatch, rows: list[int], limit: float
) -> list[tuple[int, dict | None, str | None]]:
    """Label the batch; if that fails or takes longer than ``limit`` seconds, row by row, so one bad
    image costs only its own row: a row that alone fails is a ``labeler_error``, one that alone takes
    longer than ``limit`` a ``labeler_timeout`` (:mod:`four_m.pipeline.time_limit` says what
    happens to the hung call).

    The fallback and each failing row are logged with their keys (the summary only counts them),
    so the image that broke a labeler can be found.
    """
    keys = batch.keys
    try:
        return [(row, payload, None) for row, payload in zip(rows, within(limit, labeler.labelled, batch), strict=True)]
    except TimeLimitExceeded:
        log.warning(
            "label/%s: a batch of %d rows (keys %s..%s) took longer than %g s, retrying row by row",
            labeler.name,
            len(rows),
            keys[0],
            keys[-1],
            limit,
        )
    except Exception as err:  # noqa: BLE001 - the culprit is isolated below
        log.warning(
            "label/%s: a batch of %d rows (keys %s..%s) failed, retrying row by row: %s: %s",
            labeler.name,
            len(rows),
            keys[0],
            keys[-1],
            type(err).__name__,
            err,
        )
    results = []
    for index, (row, key) in enumerate(zip(rows, keys, strict=True)):
        try:
            (payload,) = within(limit, labeler.labelled, batch.rows(index, index + 1))
            results.append((row, payload, None))
        except TimeLimitExceeded:
            log.warning("label/%s: row %s took longer than %g s alone: quarantined", labeler.name, key, limit)
            results.append((row, None, labeler_timeout(labeler.name, limit)))
        except Exception as err:  # noqa: BLE001 - counted and stored with the row
            log.warning("label/%s: row %s failed: %s: %s", labeler.name, key, type(err).__name__, err)
            results.append((row, None, f"{labeler.name} failed: {type(err).__name__}: {err}"))
    return results


@dataclass
class LabelSummary:
    """Per labeler: rows, labelled rows, failures by reason, shards done/skipped; and what the
    driver carried: the bytes it received from the workers and its CPU time."""

    seconds: float = 0.0
    driver_bytes: int = 0
    driver_cpu_seconds: float = 0.0
    rows: Counter = field(default_factory=Counter)
    labelled: Counter = field(default_factory=Counter)
    failures: dict[str, Counter] = field(default_factory=dict)
    shards_done: Counter = field(default_factory=Counter)
    shards_skipped: Counter = field(default_factory=Counter)
    random_init: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        lines = []
        for name in sorted(set(self.shards_done) | set(self.shards_skipped)):
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.failures.get(name, {}).items()))
            warning = "  [RANDOM-INIT WEIGHTS: not real labels]" if name in self.random_init else ""
            lines.append(
                f"label/{name}: rows {self.rows[name]}, labelled {self.labelled[name]},"
                f" failed {self.rows[name] - self.labelled[name]}{f' ({reasons})' if reasons else ''};"
                f" shards done {self.shards_done[name]}, skipped {self.shards_skipped[name]}{warning}"
            )
        driver = f"driver: {self.driver_bytes:,} bytes received, {self.driver_cpu_seconds:.1f} s CPU"
        lines.append(f"label: {self.seconds:.1f} s ({driver})")
        return lines


def run_label(config: Config, only: tuple[str, ...] = (), progress: bool = True) -> LabelSummary:
    """Label every finished download shard with the configured (or ``only`` the named) labelers."""
    root = DatasetRoot(config.root)
    names = only or config.label.labelers
    unknown = sorted(set(names) - set(LABELERS))
    if unknown:
        raise LabelStageError(f"unknown labelers {unknown}; known: {', '.join(LABELERS)}")
    with root.lock(STAGE):
        return _label_root(root, config, names, progress)


def label_levels(names: tuple[str, ...]) -> list[list[str]]:
    """``names`` in the order their label inputs impose: each level reads only labels of earlier
    levels (or of labelers not in this run). A cycle among the declarations is refused."""
    levels: dict[str, int] = {}

    def level(name: str, path: tuple[str, ...]) -> int:
        if name in path:
            raise LabelStageError(f"labelers read each other's labels in a cycle: {' -> '.join((*path, name))}")
        if name not in levels:
            inputs = [d for d in MODALITIES[name].label_inputs if d in names]
            levels[name] = 1 + max((level(d, (*path, name)) for d in inputs), default=-1)
        return levels[name]

    for name in names:
        level(name, ())
    return [[n for n in names if levels[n] == depth] for depth in range(max(levels.values(), default=-1) + 1)]


def _label_root(root: DatasetRoot, config: Config, names: tuple[str, ...], progress: bool) -> LabelSummary:
    started, cpu_started = time.perf_counter(), time.process_time()
    images = downloaded_images(root, config.verify_checksums, LabelStageError)
    summary = LabelSummary(random_init=[n for n in names if config.label.labeler(n).random_init])
    ray.data.DataContext.get_current().enable_progress_bars = progress
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its INFO lines drown the summary
    with ExitStack() as stack:
        ray_started: list[bool] = []

        def start_ray() -> None:
            """Ray starts once, when the first level has shards to label: a rerun over a finished root
            stays fast, and a level made pending by its inputs alone still gets the configured cluster."""
            if not ray_started:
                stack.enter_context(ray_session(config.ray))
                ray_started.append(True)

        for level in label_levels(names):
            _label_level(root, config, level, images, summary, start_ray)
    # The config flags every network without weights; an algorithm declared with a plain
    # LabelerConfig (a plugin's) is flagged too, until its files say its labels are real.
    summary.random_init = [n for n in summary.random_init if _written_by_random_init(root, n, images) is not False]
    summary.seconds = time.perf_counter() - started
    summary.driver_cpu_seconds = time.process_time() - cpu_started
    write_summary(root, STAGE, _summary_dict(summary))
    return summary


def _label_level(
    root: DatasetRoot,
    config: Config,
    names: list[str],
    images: dict[int, FileDigest],
    summary: LabelSummary,
    start_ray: Callable[[], None],
) -> None:
    """Label the shards one level of labelers still owes, once the labels they read are final.

    Only names, folders and configs here: the labelers themselves are built in the actors."""
    hashes = {n: shaping_hash(config.label.size, config.label.labeler(n)) for n in names}
    inputs = {n: _shard_inputs(root, config, n, images) for n in names}
    run = StageRun(
        root,
        config,
        STAGE,
        outputs={n: Output(f"labels/{n}", root.stage(f"{STAGE}/{n}"), hashes[n]) for n in names},
        inputs={n: {s: digests for s, (digests, _) in inputs[n].items()} for n in names},
        summary=summary,
    )
    run.check_not_stale(sorted(images), LabelStageError, "label config")
    run.begin()
    pending = {n: run.pending(n) for n in names}
    for n in names:
        summary.shards_skipped[n] = len(images) - len(pending[n])
    todo = sorted({s for p in pending.values() for s in p})
    if not todo:
        return
    start_ray()
    derived_from_random_init = frozenset(n for n in names if _reads_random_init(root, n, images))
    summary.random_init += sorted(derived_from_random_init)
    # Sets made once: rebuilt per chunk, they cost O(shards) a chunk, O(shards^2 / shards_per_run) a run.
    owed = {n: set(pending[n]) for n in names}
    per_run = config.label.shards_per_run or len(todo)
    for start in range(0, len(todo), per_run):
        chunk = todo[start : start + per_run]
        work = {n: owed[n].intersection(chunk) for n in names}
        active = [n for n in names if work[n]]
        reads = {s: {d: f for n in active for d, f in inputs[n][s][1].items()} for s in chunk}
        _run_chunk(run, chunk, active, work, reads, derived_from_random_init)


def _shard_inputs(
    root: DatasetRoot, config: Config, name: str, images: dict[int, FileDigest]
) -> dict[int, tuple[tuple[FileDigest, ...], dict[str, str]]]:
    """Per shard: the digests labeler ``name``'s shard is made from (its image file, then each label
    file it reads) and those label files by modality. A required label missing stops the run."""
    spec = MODALITIES[name]
    found: dict[int, tuple[tuple[FileDigest, ...], dict[str, str]]] = {}
    for shard, image_digest in images.items():
        digests, files = [image_digest], {}
        for source in spec.label_inputs:
            stage, file = root.stage(f"{STAGE}/{source}"), root / f"labels/{source}/{shard_name(shard)}.parquet"
            if stage.recorded(shard, file) is None:
                if source in spec.requires:
                    raise LabelStageError(
                        f"labeler {name} reads {source}'s labels, but shard {shard} has none:"
                        f" add {source} to label.labelers (it runs first)"
                    )
                continue
            digests.append(stage.verified(shard, file, config.verify_checksums))
            files[source] = str(file)
        found[shard] = (tuple(digests), files)
    return found


def _reads_random_init(root: DatasetRoot, name: str, images: dict[int, FileDigest]) -> bool:
    """Whether a label that labeler ``name`` cannot do without was made by random weights: what it
    derives from noise is noise, and says so like its source."""
    return any(_written_by_random_init(root, source, images) for source in MODALITIES[name].requires)


def _written_by_random_init(root: DatasetRoot, name: str, images: dict[int, FileDigest]) -> bool | None:
    """What the provenance of ``name``'s first label file says (None where none is written): the
    labeler's own word, which the driver, holding configs and not labeler classes, cannot know."""
    files = (root / f"labels/{name}/{shard_name(s)}.parquet" for s in images)
    present = next((f for f in files if f.is_file()), None)
    if present is None:
        return None
    return storage.read_schema(present).metadata.get(b"four_m.model") == RANDOM_INIT.encode()


def models_dir(root: DatasetRoot) -> Path:
    """Where tiny random-init labelers are built: ``_models/`` of a local root, else local scratch
    (model loaders read local folders; the variants are seeded, so every node builds the same)."""
    return storage.scratch(root / "_models")


def _run_chunk(
    run: StageRun[LabelSummary],
    chunk: list[int],
    names: list[str],
    work: dict[str, set[int]],
    reads: dict[int, dict[str, str]],
    derived_from_random_init: frozenset[str],
) -> None:
    """Label one chunk of shards in one Ray Data execution; ``work`` = shards to write per labeler,
    ``reads`` = per shard, the label files (by modality) its labelers read beside the images."""
    root, config = run.root, run.config
    files = [str(images_file(root, s)) for s in chunk]
    expected = ShardRows(files, chunk)
    pools = config.label.pools(names)
    _check_resources(config, pools)
    targets = {n: ShardTarget(run.outputs[n].folder, run.outputs[n].config_hash, frozenset(work[n])) for n in names}
    sizes = tuple(sorted({config.label.labeler(n).input_size for n in names}))
    block_rows = min(config.label.pool_settings(p).batch_size for p in pools)
    ray.data.DataContext.get_current().execution_options.preserve_order = False
    seen: Counter = Counter()
    merging: Merging = {}
    merge = ray.remote(merge_shard).options(num_cpus=TASK_CPUS, **worker_options())
    with block_bytes(block_rows * sum(3 * size * size for size in sizes)):
        # The shards are read by our own small generator task rather than read_parquet, whose file
        # listing takes a whole CPU that six actor pools on two cores would never leave free.
        dataset = ray.data.from_items(
            [{"path": f, "reads": json.dumps(reads[s])} for f, s in zip(files, chunk, strict=True)],
            override_num_blocks=len(files),
        ).map_batches(
            read_views,
            fn_kwargs={"sizes": sizes, "block_rows": block_rows},
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=TASK_CPUS,
            **worker_options(),
        )
        for index, group in enumerate(pools):
            pool = config.label.pool_settings(group)
            dataset = dataset.map_batches(
                LabelerActor,
                # Tiny random-init variants are built where they run: on each node's disk for a remote root.
                fn_constructor_kwargs={
                    "names": group,
                    "config": config,
                    "models_dir": str(models_dir(root)),
                    "targets": {n: targets[n] for n in group},
                    "derived_from_random_init": derived_from_random_init,
                    "last": index == len(pools) - 1,
                },
                batch_format="pyarrow",
                batch_size=pool.batch_size,
                compute=ray.data.ActorPoolStrategy(size=pool.concurrency),
                num_cpus=pool.num_cpus,
                num_gpus=pool.num_gpus or None,
                **worker_options(),
            )
        for written in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            run.summary.driver_bytes += written.nbytes
            for shard, rows in zip(written["shard"].to_pylist(), written["rows"].to_pylist(), strict=True):
                seen[shard] += rows
                if seen[shard] == expected.of(shard):
                    merged = [n for n, t in targets.items() if shard in t.shards]
                    folders = [targets[n].folder for n in merged]
                    merging[shard] = (merged, merge.remote(root.path, folders, shard, seen[shard], ROW_GROUP_ROWS))
            _finish_merged(run, merging, wait=False)
    _finish_merged(run, merging, wait=True)
    for target in targets.values():
        remove_parts(root.path, target.folder)


class ShardRows:
    """Each shard's row count, read from its file's footer when its first rows come back: read all
    before the run, a run over CC12M's 1,200 shards on an object store would wait for every footer
    before labelling its first image."""

    def __init__(self, files: list[str], shards: list[int]):
        self._files = dict(zip(shards, files, strict=True))
        self._rows: dict[int, int] = {}

    def of(self, shard: int) -> int:
        if shard not in self._rows:
            self._rows[shard] = storage.parquet_file(storage.location(self._files[shard])).metadata.num_rows
        return self._rows[shard]


def _finish_merged(run: StageRun[LabelSummary], merging: Merging, wait: bool) -> None:
    """Mark done the shards whose merges have ended (all of them with ``wait``); a failed merge raises."""
    for shard, (names, ref) in list(merging.items()):
        ready, _ = ray.wait([ref], timeout=None if wait else 0)
        if ready:
            ray.get(ref)
            del merging[shard]
            _finish_shard(run, shard, names)


def _check_resources(config: Config, pools: list[list[str]]) -> None:
    """Fail now, not hang later: actor pools that hold every CPU starve the read tasks (ray #44687), and
    an actor larger than every node is never placed (an autoscaler's future nodes are not counted)."""
    settings = [config.label.pool_settings(pool) for pool in pools]
    cpus = sum(s.num_cpus * s.concurrency for s in settings) + 2 * TASK_CPUS
    gpus = sum(s.num_gpus * s.concurrency for s in settings)
    have = ray.cluster_resources()
    if cpus > have.get("CPU", 0) or gpus > have.get("GPU", 0):
        raise LabelStageError(
            f"the labeler pools {pools} need {cpus:g} CPUs and {gpus:g} GPUs (with read and decode tasks) but the"
            f" Ray cluster has {have.get('CPU', 0):g} and {have.get('GPU', 0):g}: lower label.<name>.num_cpus,"
            " num_gpus or concurrency, or group labelers into one pool with label.actor_groups"
        )
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    for pool, need in zip(pools, settings, strict=True):
        if not any(n.get("CPU", 0) >= need.num_cpus and n.get("GPU", 0) >= need.num_gpus for n in nodes):
            raise LabelStageError(
                f"an actor of the labeler pool {pool} needs {need.num_cpus:g} CPUs and {need.num_gpus:g} GPUs on one"
                " node, but no node of the Ray cluster has that much: lower label.<name>.num_cpus or num_gpus, or"
                " split the pool (label.actor_groups)"
            )


@contextmanager
def block_bytes(limit: int) -> Iterator[None]:
    """Ray Data blocks of at most ``limit`` bytes (one actor batch of pixel views) while a chunk is
    labelled. With its default, 128 MiB, a read task's tables were merged into one block, which one
    actor of a pool then labelled alone while the others idled. The context is the process's (a
    dataset takes it when made), so the next stage gets its own setting back."""
    context = ray.data.DataContext.get_current()
    before = context.target_max_block_size
    context.target_max_block_size = limit
    try:
        yield
    finally:
        context.target_max_block_size = before


def read_views(batch: pa.Table, sizes: tuple[int, ...], block_rows: int) -> Iterator[pa.Table]:
    """One images/ shard (see :func:`read_images`) in tables of ``block_rows`` rows with the pixel
    views of ``sizes`` cut from their decoded photos (:func:`four_m.pipeline.views.add_views`).

    Read and decode are one task per shard: as two operators, Ray Data fused them and bundled the
    decode's batch of 32 *shards* into one task, so one task read and decoded a whole chunk."""
    for table in read_images(batch, block_rows):
        yield add_views(table, sizes)


def read_images(batch: pa.Table, block_rows: int) -> Iterator[pa.Table]:
    """Stream one images/ shard (a one-row batch naming it and the label files its labelers read)
    in tables of ``block_rows`` rows, each row tagged with its path and its index in the shard
    (:data:`ROW`), which the shard's parts are merged by, and carrying the read labels' columns
    (``<modality>.<column>``)."""
    (path,) = batch["path"].to_pylist()
    (reads,) = batch["reads"].to_pylist()
    labels = {source: storage.read_table(storage.location(file)) for source, file in json.loads(reads).items()}
    file = storage.parquet_file(storage.location(path))
    # The photo's size before resizing, where the writer recorded it (img2dataset does).
    sizes = [c for c in ORIGINAL_SIZE if c in file.schema_arrow.names]
    columns = ["key", "jpg", "status", "error_message", "caption", *sizes]
    first = 0
    for part in file.iter_batches(batch_size=block_rows, columns=columns):
        table = pa.Table.from_batches([part]).append_column("path", pa.array([path] * part.num_rows))
        for source, stored in labels.items():
            rows = stored.slice(first, part.num_rows)
            if not rows["key"].equals(table["key"]):
                raise RuntimeError(f"labels/{source} of {path}: keys are not those of images/ (row order broken)")
            for name in rows.column_names[1:]:
                table = table.append_column(column(source, name), rows[name])
        yield table.append_column(ROW, pa.array(range(first, first + part.num_rows), pa.int64()))
        first += part.num_rows


def _modality_table(part: pa.Table, name: str, schema: pa.Schema) -> pa.Table:
    """One labeler's file columns from the pipeline's: key, its payload, alt_text, its error; with
    the file's schema and metadata, which the merged shard file takes from its parts."""
    shared = {"key": "key", "alt_text": "caption"}
    return pa.table({f.name: part[shared.get(f.name, column(name, f.name))] for f in schema}, schema=schema)


def _file_schema(labeler: Labeler, config: Config, config_hash: str) -> pa.Schema:
    fields = [pa.field("key", pa.string())]
    fields += list(labeler.schema())
    if labeler.keeps_alt_text:
        fields.append(pa.field("alt_text", pa.string()))
    fields.append(pa.field(ERROR, pa.string()))
    provenance = {
        "stage": STAGE,
        "package": f"four-m {__version__}",
        "config_hash": config_hash,
        "label_view": f"centre square of the shorter side, {config.label.size} px",
        **labeler.provenance(),
    }
    return pa.schema(fields, metadata={f"four_m.{k}": v for k, v in provenance.items()})


def _finish_shard(run: StageRun[LabelSummary], shard: int, names: list[str]) -> None:
    """Check the keys of the shard's merged files (of labelers ``names``) against ``images/``, count
    their rows and failures, and mark each done (reading only the key and error columns)."""
    keys = image_keys(run.root, shard)
    summary = run.summary
    for name in names:
        final = run.root / f"{run.outputs[name].folder}/{shard_name(shard)}.parquet"
        written = storage.read_table(final, columns=["key", ERROR])
        run.finish(name, shard, final, written["key"], written.num_rows, keys)
        errors = [e for e in written[ERROR].to_pylist() if e is not None]
        summary.rows[name] += written.num_rows
        summary.labelled[name] += written.num_rows - len(errors)
        summary.failures.setdefault(name, Counter()).update(label_failure_reason(e) for e in errors)
        summary.shards_done[name] += 1


def _summary_dict(summary: LabelSummary) -> dict:
    return {
        "seconds": round(summary.seconds, 3),
        "driver_bytes": summary.driver_bytes,
        "driver_cpu_seconds": round(summary.driver_cpu_seconds, 3),
        "random_init": summary.random_init,
        "labelers": {
            name: {
                "rows": summary.rows[name],
                "labelled": summary.labelled[name],
                "failures": dict(summary.failures.get(name, {})),
                "shards_done": summary.shards_done[name],
                "shards_skipped": summary.shards_skipped[name],
            }
            for name in sorted(set(summary.shards_done) | set(summary.shards_skipped))
        },
    }
