"""What a training run leaves under ``runs/<name>/`` for readers other than the trainer.

``make train`` writes the files named here; ``make card`` reads them, and must do so without
importing torch or Lightning, so the reading lives here and not beside the trainer. The lock that
every writer of a run holds is named here too: train, finetune and import-4m are in three modules.
"""

from __future__ import annotations

import csv
from pathlib import Path

DESCRIPTION = "model.json"
"""The run's model size and modalities with their vocabularies, written when training ends."""
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
