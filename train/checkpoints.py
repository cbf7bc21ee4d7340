"""Checkpoints that a kill can never leave half-written.

Lightning's own save stages a checkpoint in the system temp folder and then moves it into place.
When the dataset root is on another filesystem than ``/tmp`` (a shared mount on a cluster), that
move is a copy: a run killed mid-copy left a truncated ``last.ckpt`` that every later resume failed
to load, and a full checkpoint behind in ``/tmp``. Here the file is written beside its final name
and renamed, as every other file of the dataset root is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from four_m.core.dataset_root import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose ``save_checkpoint`` writes a temporary file and renames it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        with atomic_path(Path(path)) as temp:
            torch.save(checkpoint, temp)
