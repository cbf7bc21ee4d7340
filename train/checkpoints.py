"""Checkpoints that a kill can never leave half-written, and runs on a remote dataset root.

Lightning's own save stages a checkpoint in the system temp folder and then moves it into place.
When the dataset root is on another filesystem than ``/tmp`` (a shared mount on a cluster), that
move is a copy: a run killed mid-copy left a truncated ``last.ckpt`` that every later resume failed
to load, and a full checkpoint behind in ``/tmp``. Here the file is written beside its final name
and renamed, as every other file of the dataset root is.

Lightning's ``ModelCheckpoint`` saves its folder and file names as absolute paths in every
checkpoint, so the same run in another root (or a local mirror on another machine) wrote other
bytes and, resumed elsewhere, forgot its last checkpoint; ``PortableModelCheckpoint`` saves them
relative to its folder.

On a remote root (an object store), Lightning, its CSV and TensorBoard loggers write a local copy
of the run folder (``RunMirror``), which is uploaded after every checkpoint and at the end; a run
resumed on any machine starts from the uploaded folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from four_m.core import storage
from four_m.core.dataset_root import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose ``save_checkpoint`` writes a temporary file and renames it, then
    calls ``after_save`` (a run mirror's upload)."""

    def __init__(self, after_save: Callable[[], None] = lambda: None):
        super().__init__()
        self.after_save = after_save

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        # A file object, not the path: torch names the archive's inner folder after the file it is
        # given, and the temporary name is random (two runs wrote different bytes); "archive" here.
        with atomic_path(Path(path)) as temp, temp.open("wb") as out:
            torch.save(checkpoint, out)
        self.after_save()


class PortableModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose saved state names its files relative to its folder (``dirpath: .``)."""

    PATHS = ("best_model_path", "kth_best_model_path", "last_model_path")

    @property
    def state_key(self) -> str:
        """``ModelCheckpoint``'s key, so a run checkpointed before this class existed resumes its state."""
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for key in self.PATHS:
            state[key] = self._relative(state[key])
        state["best_k_models"] = {self._relative(k): v for k, v in state["best_k_models"].items()}
        return {**state, "dirpath": "."}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath") == ".":  # saved by this class: names under this folder, wherever it is now
            state_dict = {
                **state_dict,
                **{key: self._absolute(state_dict[key]) for key in self.PATHS},
                "best_k_models": {self._absolute(k): v for k, v in state_dict["best_k_models"].items()},
                "dirpath": self.dirpath,
            }
        super().load_state_dict(state_dict)

    def _relative(self, path: str) -> str:
        inside = self.dirpath and path and Path(path).is_relative_to(self.dirpath)
        return Path(path).relative_to(self.dirpath).as_posix() if inside else path

    def _absolute(self, path: str) -> str:
        return str(Path(self.dirpath) / path) if path and not Path(path).is_absolute() else path


class RunMirror:
    """A run folder of the dataset root and the local folder that training writes.

    For a local root both are the same folder and nothing is copied. For a remote one, ``pull``
    fetches the run as it was left (to resume it) and ``push`` uploads every file that changed since
    the last push, checkpoints last, and removes remotely what training removed locally (Lightning
    deletes superseded step checkpoints).
    """

    def __init__(self, run_dir: storage.RootPath):
        self.remote = run_dir
        self.local = storage.scratch(run_dir)
        self._sent: dict[str, tuple[int, int]] = {}

    @property
    def mirrored(self) -> bool:
        return storage.is_remote(self.remote)

    @property
    def node_leader(self) -> bool:
        """Local rank 0 (Lightning sets ``LOCAL_RANK`` in the ranks it launches): the one process of
        a machine that fetches and removes the shared local mirror. It pulls before the other ranks
        start, which Lightning launches inside ``fit``."""
        return int(os.environ.get("LOCAL_RANK", "0")) == 0

    def pull(self) -> None:
        if not (self.mirrored and self.node_leader):
            return
        storage.remove_tree(self.local)
        self.local.mkdir(parents=True)
        if self.remote.is_dir():
            storage.download_folder(self.remote, self.local)
        self._sent = self._state()

    def push(self) -> None:
        if not self.mirrored:
            return
        now = self._state()
        changed = sorted((n for n in now if self._sent.get(n) != now[n]), key=lambda n: n.startswith("checkpoints/"))
        for name in changed:
            target = self.remote / name
            target.fs.put_file(str(self.local / name), target.path)  # one PUT: whole or absent
        for name in set(self._sent) - set(now):
            (self.remote / name).unlink(missing_ok=True)
        self._sent = now

    def release(self) -> None:
        """Remove the local mirror of a finished run: the bucket holds it, and a resume pulls it again."""
        if self.mirrored and self.node_leader:
            storage.remove_tree(self.local)

    def _state(self) -> dict[str, tuple[int, int]]:
        state = {}
        for path in self.local.rglob("*"):
            if path.is_file() and not path.name.endswith(".tmp"):
                info = path.stat()
                state[path.relative_to(self.local).as_posix()] = (info.st_size, info.st_mtime_ns)
        return state
