"""The thin Ray executor: hand pending shards to Ray tasks, mark them done, report progress.

Stages give it a picklable per-shard callable; it never knows what a shard contains. The same
code runs on this machine (Ray started locally) and on a cluster (``ray.address``, or the
``RAY_ADDRESS`` of a ``ray job submit`` job): Ray places the tasks, we never run a pool of our own.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import TypeVar

import ray
from tqdm import tqdm

from four_m.core.config import RayConfig
from four_m.core.dataset_root import FileDigest
from four_m.core.offline import QUIET_NETWORK_ENV
from four_m.core.storage import storage_env
from four_m.core.summary import ShardReport, StageSummary
from four_m.core.weights import hub_env
from four_m.pipeline.stage import Output, StageRun

log = logging.getLogger(__name__)

ShardTask = Callable[[int], tuple[ShardReport, list[Path]]]
"""Makes one shard: returns its report and the output files, already in their final place."""
Result = TypeVar("Result")
Key = TypeVar("Key", bound=Hashable)


LOCAL_RAY_ENV = {"RAY_worker_niceness": "0", "REPORTER_UPDATE_INTERVAL_MS": "60000", "MALLOC_ARENA_MAX": "1"}
"""Set (unless set already) before a Ray is started here. Ray runs its workers at nice 15, so that
a head node's own processes stay responsive; on a machine shared with other jobs that starves them
(a label stage of 20 s took 371 s beside three busy loops at nice 0), so they run at the driver's
priority. Its node agent gathers every process's metrics for the dashboard every 5 s, which a Ray
started without a dashboard never shows; on two cores that took 4 % of one (1.4 CPU s in a 32 s
label run), beside the labelling actors. One malloc arena per worker process: a label actor runs its
models in a thread of its own (``pipeline.time_limit``), and in a thread's own arena glibc maps
and unmaps every block over 64 MiB (SAM's masks of a batch) whatever ``pipeline.allocator`` sets;
that cost the models a tenth of their speed. Glibc reads this only when a process starts, so a
cluster's workers need it in their environment (docs/cluster.md)."""
_LOCAL_WORKER_ENV: dict[str, str] | None = None
"""The environment that the workers of a Ray started here by :func:`ray_session` inherit (its
driver's, at the start); None while no such Ray runs."""


def worker_options() -> dict:
    """Ray options that give a task or actor this driver's filesystem settings (``FSSPEC_*``,
    ``AWS_*``...) and hub settings (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``): workers on
    other nodes, or started before they were set, do not inherit them, and a remote dataset root is
    unreadable without the first, the weights ``make models`` fetched unfound without the second.

    Nothing where the workers of a Ray started here inherit them already: a task with a runtime
    environment cannot use Ray's prestarted workers and waits for one started for it (0.6 s more
    for each task or actor that starts a worker, measured on two cores)."""
    env = {**storage_env(), **hub_env()}
    inherited = _LOCAL_WORKER_ENV
    if inherited is not None and all(inherited.get(name) == value for name, value in env.items()):
        return {}
    return {"runtime_env": {"env_vars": env}} if env else {}


def cluster_address(cfg: RayConfig) -> str | None:
    """The cluster to join: ``ray.address``, else ``RAY_ADDRESS`` (which ``ray job submit`` sets in a
    job's driver); None means start Ray on this machine."""
    return cfg.address or os.environ.get("RAY_ADDRESS") or None


@contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """Join the configured cluster, or start Ray here; leave an already running session alone."""
    if ray.is_initialized():
        yield
        return
    global _LOCAL_WORKER_ENV
    address = cluster_address(cfg)
    local = address is None
    if local:
        for name, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(name, value)
    inherited = dict(os.environ)
    with loopback_only() if local else nullcontext():
        ray.init(
            # "local", not None: None would join whatever cluster `ray start` last left on this machine,
            # and a joined cluster refuses the local sizing below.
            address="local" if local else address,
            num_cpus=cfg.num_cpus if local else None,
            object_store_memory=cfg.object_store_mb * 2**20 if local and cfg.object_store_mb else None,
            include_dashboard=False,
            dashboard_host="127.0.0.1",
            # A Ray started here hands its workers this process's environment, which has these
            # already (``four_m`` sets them on import); a joined cluster's nodes need them given.
            runtime_env=None if local else {"env_vars": dict(QUIET_NETWORK_ENV)},
            log_to_driver=True,
            logging_level="warning",
        )
    _LOCAL_WORKER_ENV = inherited if local else None
    try:
        yield
    finally:
        _LOCAL_WORKER_ENV = None
        ray.shutdown()


@contextmanager
def loopback_only() -> Iterator[None]:
    """Make a Ray started here listen on 127.0.0.1 only (GCS, raylet, object manager, workers, agents).

    Ray binds its servers to the node's address, which it resolves to the machine's routable
    address, even when given 127.0.0.1 (``resolve_ip_for_localhost``), unless its single-machine
    mode is on (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the default on macOS and Windows). That
    switch is read from ``ray_constants`` when the node starts, so it is set there, for the start only.
    """
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def _make_shard(task: ShardTask, shard: int, output: Output, inputs: dict[int, tuple[FileDigest, ...]]) -> ShardReport:
    report, files = task(shard)
    output.mark_done(shard, report.rows_in, files, inputs[shard])
    return report


def run_shards(run: StageRun[StageSummary], task: ShardTask, *, num_cpus: float, progress: bool = True) -> None:
    """Run ``task`` on every pending shard of the run's one output, each marked done by the task that
    made it; the run's summary counts them, and a failing shard is reported there, never fatal."""
    started = time.perf_counter()
    ((name, output),) = run.outputs.items()
    pending = run.pending(name)
    summary = run.summary
    summary.shards_skipped = len(run.inputs[name]) - len(pending)
    make = partial(_make_shard, task, output=output, inputs=run.inputs[name])
    reports, summary.shards_failed = map_shards(pending, make, num_cpus=num_cpus, desc=run.stage, progress=progress)
    for shard in sorted(reports):
        summary.add(reports[shard])
    summary.seconds = time.perf_counter() - started


def _call(task: Callable[[Key], Result], key: Key) -> Result:
    return task(key)


def map_shards(
    keys: list[Key],
    task: Callable[[Key], Result],
    *,
    num_cpus: float,
    num_gpus: float = 0,
    desc: str,
    progress: bool = True,
) -> tuple[dict[Key, Result], dict[Key, str]]:
    """Run the picklable ``task`` on each key (a shard, or any other unit of work such as a tokenizer
    group) as a Ray task: its results by key, in the order they finished, and for each key whose task
    raised, the error in one line (reported, never fatal to the other keys)."""
    remote = ray.remote(_call).options(num_cpus=num_cpus, num_gpus=num_gpus or None, **worker_options())
    running = {remote.remote(task, key): key for key in keys}
    results: dict[Key, Result] = {}
    failed: dict[Key, str] = {}
    with tqdm(total=len(keys), desc=desc, unit="shard", disable=not progress) as bar:
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            key = running.pop(ready[0])
            try:
                results[key] = ray.get(ready[0])
            except ray.exceptions.RayTaskError as err:
                failed[key] = error_line(err)
                name = f"shard {key:05d}" if isinstance(key, int) else key
                log.warning("%s: %s failed, the others go on: %s", desc, name, failed[key])
            bar.update(1)
    return results, failed


def error_line(err: ray.exceptions.RayError) -> str:
    """The task's own exception in one line, not Ray's traceback wall (a dead actor's: Ray's first line)."""
    cause = getattr(err, "cause", None) or err
    lines = str(cause).strip().splitlines() or [""]
    return f"{type(cause).__name__}: {lines[0]}"
