"""The label stage: ``images/`` shards -> ``labels/<modality>/`` shards, on Ray actors.

One actor pool per labeler, or per group of ``label.actor_groups`` (batch size, concurrency, CPU
and GPU share from config), starts once per level of labelers and loads its models once. A task is
one shard: the actor reads it, decodes each image once, cuts one view per input size, labels it
batch by batch and streams each of its labelers' rows into that labeler's shard file, renamed into
place when done (``pipeline.label_actor``). The driver keeps every actor two shards deep (the next
one is queued when one ends), and on each shard's return checks its files' keys against
``images/`` and writes their markers. Nothing crosses the object store but shard numbers and row
counts: no view, no label byte, and no Ray Data executor, read task or merge task competes with the
models for the CPU (``bench/label.py`` measured what those cost).

The labelers are imported, built and asked for their files' schema and provenance in the actors
only: the driver plans from names and configs and never imports a network library (torch,
transformers, ultralytics). Markers are per labeler and shard (``_state/label/<modality>/``) and
record the digest of the ``images/`` shard they were made from: a rerun, or ``--only depth,det``,
redoes exactly what is missing or was made from images that changed since (a retried download),
and never touches the other folders. A shard whose task fails (after an actor that died is
restarted and the shard retried) is reported with its reason and left unmarked; the others go on.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import ray
from tqdm import tqdm

from four_m.core import storage
from four_m.core.config import Config, shaping_hash
from four_m.core.curation import DECISIONS, owes_rows
from four_m.core.dataset_root import DatasetRoot, FileDigest, shard_name
from four_m.core.errors import UserError
from four_m.core.failures import ERROR, label_failure_reason
from four_m.core.modalities import MODALITIES
from four_m.core.provenance import RANDOM_INIT
from four_m.labelers.registry import LABELERS
from four_m.pipeline.executor import error_line, ray_session, worker_options
from four_m.pipeline.label_actor import LabelerActor, Piece, ShardTarget
from four_m.pipeline.stage import Output, StageRun, downloaded_images, image_keys, images_file, write_summary

STAGE = "label"
log = logging.getLogger(__name__)
IN_FLIGHT = 2
"""Shards queued per actor: when one ends the next is already there, so no actor waits on the driver."""
ACTOR_RESTARTS = 2
"""An actor that dies (out of memory, a crash in native code) is restarted and its shard retried this often."""
RESULT_BYTES = 8
"""What a task returns to the driver: its shard's row count, one int64."""


class LabelStageError(UserError):
    """The label stage cannot start (nothing downloaded, stale shards, an unknown labeler)."""


def column(labeler: str, name: str) -> str:
    """Labelers' columns travel side by side through the pipeline, prefixed by modality."""
    return f"{labeler}.{name}"


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
    shards_failed: dict[str, dict[int, str]] = field(default_factory=dict)
    """Per labeler: each shard whose task failed, with the error in one line (left unmarked)."""
    random_init: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        lines = []
        for name in sorted(set(self.shards_done) | set(self.shards_skipped) | set(self.shards_failed)):
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.failures.get(name, {}).items()))
            warning = "  [RANDOM-INIT WEIGHTS: not real labels]" if name in self.random_init else ""
            lines.append(
                f"label/{name}: rows {self.rows[name]}, labelled {self.labelled[name]},"
                f" failed {self.rows[name] - self.labelled[name]}{f' ({reasons})' if reasons else ''};"
                f" shards done {self.shards_done[name]}, skipped {self.shards_skipped[name]}"
                f"{_failed_shards(self.shards_failed.get(name, {}))}{warning}"
            )
        driver = f"driver: {self.driver_bytes:,} bytes received, {self.driver_cpu_seconds:.1f} s CPU"
        lines.append(f"label: {self.seconds:.1f} s ({driver})")
        return lines


def _failed_shards(failed: dict[int, str]) -> str:
    """``, failed N (shard S: reason)``: the count and the first failure, whose line says what broke."""
    if not failed:
        return ""
    first = min(failed)
    return f", failed {len(failed)} (shard {shard_name(first)}: {failed[first]})"


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
    with ExitStack() as stack:
        ray_started: list[bool] = []

        def start_ray() -> None:
            """Ray starts once, when the first level has shards to label: a rerun over a finished root
            stays fast, and a level made pending by its inputs alone still gets the configured cluster."""
            if not ray_started:
                stack.enter_context(ray_session(config.ray))
                ray_started.append(True)

        for level in label_levels(names):
            _label_level(root, config, level, images, summary, start_ray, progress)
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
    progress: bool,
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
    pending = {n: _with_owed(root, n, run.pending(n), images) for n in names}
    for n in names:
        summary.shards_skipped[n] = len(images) - len(pending[n])
    todo = sorted({s for p in pending.values() for s in p})
    if not todo:
        return
    start_ray()
    derived_from_random_init = frozenset(n for n in names if _reads_random_init(root, n, images))
    summary.random_init += sorted(derived_from_random_init)
    work = {n: set(pending[n]) for n in names}
    reads = {s: {d: f for n in names if s in work[n] for d, f in inputs[n][s][1].items()} for s in todo}
    _label_shards(run, todo, work, reads, derived_from_random_init, progress)


def _with_owed(root: DatasetRoot, name: str, pending: list[int], images: dict[int, FileDigest]) -> list[int]:
    """``pending`` plus the finished shards of labeler ``name`` that skipped rows curation now keeps
    (a loosened filter): only where curation has decided anything, one small column per shard."""
    if not (root / DECISIONS).exists():
        return pending
    done = [s for s in images if s not in set(pending)]
    owed = [s for s in done if owes_rows(root, root / f"labels/{name}/{shard_name(s)}.parquet", s)]
    return sorted([*pending, *owed])


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


@dataclass
class Pool:
    """One labeler pool's actors and what it still has to hand them: whole shards in shard order,
    or, where it has more actors than shards, pieces of them (merged by the actor of the last)."""

    names: list[str]
    actors: list
    queue: deque[tuple[int, Piece | None]] = field(default_factory=deque)
    pieces: dict[int, list[Piece]] = field(default_factory=dict)
    """Per shard labelled in pieces: all of them, in row order."""
    unfinished: Counter = field(default_factory=Counter)
    """Per shard labelled in pieces: how many have not come back yet."""
    failed: set[int] = field(default_factory=set)
    """Shards whose task failed: reported once, their other pieces dropped."""
    dead: set[int] = field(default_factory=set)
    """Indices of actors that died past their restarts: never sent another task."""

    def plan(self, shards: list[int], rows_of: Callable[[int], int], batch_size: int) -> None:
        """Queue ``shards``: whole, or in pieces of whole batches where actors would otherwise idle."""
        split = math.ceil(len(self.actors) / len(shards)) if 0 < len(shards) < len(self.actors) else 1
        for shard in shards:
            rows = rows_of(shard) if split > 1 else 0
            size = batch_size * math.ceil(rows / split / batch_size) if rows else 0
            if size and size < rows:
                self.pieces[shard] = [Piece(start, min(start + size, rows)) for start in range(0, rows, size)]
                self.unfinished[shard] = len(self.pieces[shard])
                self.queue.extend((shard, piece) for piece in self.pieces[shard])
            else:
                self.queue.append((shard, None))


Task = tuple[Pool, int, int, bool]
"""A task in flight: its pool, the actor's index, the shard, and whether it is the shard's last
call (a whole shard or a merge) rather than one piece of it."""


def _label_shards(
    run: StageRun[LabelSummary],
    todo: list[int],
    work: dict[str, set[int]],
    reads: dict[int, dict[str, str]],
    derived_from_random_init: frozenset[str],
    progress: bool,
) -> None:
    """Label the ``todo`` shards with one level's pools; ``work``: the shards each labeler writes,
    ``reads``: per shard, the label files (by modality) its labelers read beside the images.

    Each actor holds up to :data:`IN_FLIGHT` tasks; the driver holds, per shard, its number in a
    queue: O(shards), never O(rows)."""
    root, config = run.root, run.config
    names = [n for n in work if work[n]]
    groups = config.label.pools(names)
    _check_resources(config, groups)
    targets = {n: ShardTarget(run.outputs[n].folder, run.outputs[n].config_hash, frozenset(work[n])) for n in names}
    pools = [Pool(group, _start_actors(group, config, root, targets, derived_from_random_init)) for group in groups]
    for pool in pools:
        shards = [s for s in todo if any(s in work[n] for n in pool.names)]
        pool.plan(shards, partial(_shard_rows, root), config.label.pool_settings(pool.names).batch_size)
    total = sum(len({s for s, _ in pool.queue}) for pool in pools)
    running: dict[ray.ObjectRef, Task] = {}

    def submit(pool: Pool, actor: int) -> None:
        while pool.queue and pool.queue[0][0] in pool.failed:
            pool.queue.popleft()
        if pool.queue and actor not in pool.dead:
            shard, piece = pool.queue.popleft()
            ref = pool.actors[actor].label_rows.remote(shard, str(images_file(root, shard)), reads[shard], piece)
            running[ref] = (pool, actor, shard, piece is None)

    for pool in pools:
        for _ in range(IN_FLIGHT):
            for actor in range(len(pool.actors)):
                submit(pool, actor)
    with tqdm(total=total, desc=STAGE, unit="shard", disable=not progress) as bar:
        while running:
            (ready,), _ = ray.wait(list(running), num_returns=1)
            pool, actor, shard, last = running.pop(ready)
            owing = [n for n in pool.names if shard in work[n]]
            try:
                ray.get(ready)
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as err:
                if isinstance(err, ray.exceptions.RayActorError):
                    pool.dead.add(actor)
                if shard not in pool.failed:  # its first failure: its other pieces are dropped
                    pool.failed.add(shard)
                    pool.unfinished.pop(shard, None)
                    _shard_failed(run.summary, owing, shard, error_line(err))
                    bar.update(1)
            else:
                run.summary.driver_bytes += RESULT_BYTES
                if last:
                    _finish_shard(run, shard, owing)
                    bar.update(1)
                elif shard in pool.unfinished:
                    pool.unfinished[shard] -= 1
                    if not pool.unfinished[shard]:  # every piece is written: this actor merges them
                        del pool.unfinished[shard]
                        running[pool.actors[actor].merge.remote(shard, pool.pieces[shard])] = (pool, actor, shard, True)
            submit(pool, actor)
            if len(pool.dead) == len(pool.actors) and not any(t[0] is pool for t in running.values()):
                _fail_queue(run.summary, pool, work, bar)
    for pool in pools:
        for actor in pool.actors:
            ray.kill(actor)  # its models' memory, now, not when the handle is collected


def _shard_rows(root: DatasetRoot, shard: int) -> int:
    """An images/ shard's rows, from its footer: read only for a shard that may be split."""
    return storage.parquet_file(images_file(root, shard)).metadata.num_rows


def _start_actors(
    group: list[str],
    config: Config,
    root: DatasetRoot,
    targets: dict[str, ShardTarget],
    derived_from_random_init: frozenset[str],
) -> list:
    """The pool's actors, started (their models load while the first shards are queued)."""
    settings = config.label.pool_settings(group)
    actor = ray.remote(LabelerActor).options(
        num_cpus=settings.num_cpus,
        num_gpus=settings.num_gpus or None,
        max_restarts=ACTOR_RESTARTS,
        max_task_retries=ACTOR_RESTARTS,
        **worker_options(),
    )
    # Tiny random-init variants are built where they run: on each node's disk for a remote root.
    return [
        actor.remote(group, config, str(models_dir(root)), {n: targets[n] for n in group}, derived_from_random_init)
        for _ in range(settings.concurrency)
    ]


def _shard_failed(summary: LabelSummary, names: list[str], shard: int, reason: str) -> None:
    log.warning("label/%s: shard %s failed, the others go on: %s", ",".join(names), shard_name(shard), reason)
    for name in names:
        summary.shards_failed.setdefault(name, {})[shard] = reason


def _fail_queue(summary: LabelSummary, pool: Pool, work: dict[str, set[int]], bar: tqdm) -> None:
    """Every actor of ``pool`` is dead: what it still owes is reported failed, not waited for."""
    for shard in dict.fromkeys(s for s, _ in pool.queue if s not in pool.failed):
        owing = [n for n in pool.names if shard in work[n]]
        _shard_failed(summary, owing, shard, f"every actor of the pool {pool.names} died")
        bar.update(1)
    pool.queue.clear()


def _check_resources(config: Config, pools: list[list[str]]) -> None:
    """Fail now, not hang later: actors beyond the cluster's CPUs or GPUs wait forever, and an actor
    larger than every node is never placed (an autoscaler's future nodes are not counted)."""
    settings = [config.label.pool_settings(pool) for pool in pools]
    cpus = sum(s.num_cpus * s.concurrency for s in settings)
    gpus = sum(s.num_gpus * s.concurrency for s in settings)
    have = ray.cluster_resources()
    if cpus > have.get("CPU", 0) or gpus > have.get("GPU", 0):
        raise LabelStageError(
            f"the labeler pools {pools} need {cpus:g} CPUs and {gpus:g} GPUs but the"
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
                "shards_failed": {shard_name(s): why for s, why in sorted(summary.shards_failed.get(name, {}).items())},
            }
            for name in sorted(set(summary.shards_done) | set(summary.shards_skipped) | set(summary.shards_failed))
        },
    }
