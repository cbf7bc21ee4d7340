"""What a training run leaves under ``runs/<name>/`` for readers other than the trainer.

``make train`` writes the files named here; ``make card`` reads them, and must do so without
importing torch or Lightning, so the reading lives here and not beside the trainer. The lock that
every writer of a run holds is named here too (train, finetune and import-4m are in three modules),
and the run's marker (``mark_run``) that each of them writes once its model is in place.
"""

from __future__ import annotations

import csv
from pathlib import Path

from four_m.core.dataset_root import DatasetRoot, FileDigest, ShardMarker, StageState
from four_m.core.storage import RootPath

DESCRIPTION = "model.json"
"""The run's model size and modalities with their vocabularies, written when training ends."""
WEIGHTS = "model.safetensors"
"""The run's final weights, written when training ends, just before ``DESCRIPTION``."""
MARKED = (WEIGHTS, DESCRIPTION)
"""What a run's marker records: the model its readers load (sample, eval, probe, finetune). Not its
checkpoints, logs and plots: rewritten on every resume, and a checkpoint is several times the model."""
LOGS = "logs"
"""Lightning's CSV logs: ``logs/version_<n>/metrics.csv``, one version per launch of the run."""


def run_lock(run: str) -> str:
    """The stage lock (``core/stage_lock.py``) that every writer of ``runs/<run>/`` holds for its
    whole write: ``make train``, ``make finetune`` and ``make import-4m``, one at a time per run."""
    return f"train/{run}"


def read_losses(logs: Path) -> list[tuple[int, float]]:
    """(step, train loss) rows of Lightning's CSV logs, one version per launch of a resumed run."""
    rows = []
    for metrics in sorted(logs.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        with metrics.open() as handle:
            rows += [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(handle) if r.get("train/loss")]
    return sorted(dict(rows).items())


def run_state(root: DatasetRoot, run: str) -> StageState:
    """``_state/train/<run>/``: one marker, shard 0 (a run is one unit), for ``make verify``."""
    return root.stage(f"train/{run}")


def mark_run(root: DatasetRoot, run: str, folder: RootPath, config_hash: str) -> ShardMarker:
    """Record ``runs/<run>/``'s model (``MARKED``) once it is in place, hashed from ``folder``: the
    run folder, or the local mirror it was uploaded from (a remote root is not read back)."""
    return run_state(root, run).record(0, 0, run_digests(root, run, folder), config_hash)


def run_digests(root: DatasetRoot, run: str, folder: RootPath) -> tuple[FileDigest, ...]:
    """The digests of ``runs/<run>/``'s model files, hashed from ``folder`` (where they are written
    before they are moved into place): to record once they are there."""
    final = root / f"runs/{run}"
    return tuple(FileDigest.of(folder / name, root.relative(final / name)) for name in MARKED)
