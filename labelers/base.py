"""The one interface every pseudo-labeler implements, and what they share.

A labeler turns a batch of RGB pixels into one payload per image. It never decodes a JPEG: the
label stage decodes each image once, takes its canonical view (the centred square of the shorter
side, see ``labelers.view``) and resizes that once per distinct ``input_size``. Labels are
therefore defined on that square view, and boxes are normalised to it.

Weights: ``model`` is a hub id or a local directory, loaded with the library's own
``from_pretrained`` (``det``: see its module). With ``model: null`` the labeler builds its tiny
variant (the same architecture, a small config, random weights) into a folder first and then
loads it through that same path, so offline runs exercise the production code. Such labels say
"random-init" in their provenance and in the stage summary.
"""

from __future__ import annotations

import os
import shutil
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch

from four_m.core.config import LabelerConfig
from four_m.core.errors import UserError
from four_m.core.storage import RootPath

RANDOM_INIT = "random-init"


class MissingWeightsError(UserError):
    """A labeler's weights cannot be loaded; the message names the model and how to get it."""


class Labeler(ABC):
    """One modality's pseudo-labeler.

    Subclasses set ``name`` (the modality key) and implement ``schema``, ``build_tiny``, ``load``
    and ``label``. Maps are returned at ``view_size`` (the label view's side), whatever the
    model's input size.
    """

    name: ClassVar[str]
    keeps_alt_text: ClassVar[bool] = False
    """The stage stores the url list's alt-text beside this modality's payload (captions)."""
    tiny_marker: ClassVar[str] = "done"
    """The file that says the tiny folder is complete. A labeler whose tiny format changes names a
    new one, so that folders built in the old format are rebuilt rather than loaded."""

    def __init__(self, cfg: LabelerConfig, view_size: int, tiny_dir: Path | None = None, root: RootPath | None = None):
        self.cfg = cfg
        self.view_size = view_size
        self.tiny_dir = tiny_dir
        self.root = root
        """The dataset root being labelled, if any: anyone who can write it could plant files, so
        weights that run code when loaded are never read from it."""
        self.device = torch.device("cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu")

    @property
    def source(self) -> str:
        """Where the weights come from: the configured id/path, or the tiny variant's folder."""
        if self.cfg.model is not None:
            return self.cfg.model
        if self.tiny_dir is None:
            raise ValueError(f"{self.name}: no model configured and no folder for the tiny variant")
        return str(self.tiny_dir)

    @property
    def random_init(self) -> bool:
        return self.cfg.model is None

    def provenance(self) -> dict[str, str]:
        """Written into every output file's metadata; like ``schema()``, callable after ``prepare()``."""
        return {
            "modality": self.name,
            "model": RANDOM_INIT if self.random_init else self.cfg.model,
            "revision": RANDOM_INIT if self.random_init else (self.cfg.revision or "default"),
            "input_size": str(self.cfg.input_size),
        }

    def prepare(self) -> None:
        """Build the tiny variant's folder if it is needed and missing: before any worker, and again
        by the workers of a node that lacks it. Built under a temporary name and renamed, so actors
        of one node that race here never load a half-written folder."""
        if not self.random_init or (self.tiny_dir / self.tiny_marker).exists():
            return
        building = self.tiny_dir.with_name(f".{self.tiny_dir.name}.{uuid.uuid4().hex[:8]}.tmp")
        building.mkdir(parents=True)
        torch.manual_seed(0)
        self.build_tiny(building)
        (building / self.tiny_marker).touch()
        try:
            os.replace(building, self.tiny_dir)
        except OSError:
            if (self.tiny_dir / self.tiny_marker).exists():  # another worker's build won: the same seeded model
                shutil.rmtree(building, ignore_errors=True)
            else:  # a killed build, or an older tiny format, left a folder without the marker
                shutil.rmtree(self.tiny_dir)
                os.replace(building, self.tiny_dir)

    def setup(self) -> None:
        """Load the weights once per worker, through the production path."""
        self.prepare()
        try:
            self.load(self.source, self.cfg.revision)
        except (OSError, ValueError) as err:
            raise MissingWeightsError(
                f"{self.name}: cannot load weights {self.source!r} ({type(err).__name__}: {str(err)[:300]}). "
                f"Run `make models` where the hub is reachable, or set label.{self.name}.model to a local "
                "directory, or to null for the tiny random-init variant."
            ) from None

    def fetch(self) -> str:
        """Download the configured hub weights into the local cache (``make models``); returns where."""
        from huggingface_hub import snapshot_download

        return snapshot_download(self.cfg.model, revision=self.cfg.revision)

    @abstractmethod
    def schema(self) -> pa.Schema:
        """The payload columns (besides ``key`` and ``error``), all nullable.

        Callable after ``prepare()`` without loading weights (it may read the model's config).
        """

    @abstractmethod
    def build_tiny(self, directory: Path) -> None:
        """Save a small random-init model of the production architecture into ``directory``."""

    @abstractmethod
    def load(self, source: str, revision: str | None) -> None:
        """Load weights from a hub id or local directory (the production path)."""

    @abstractmethod
    def label(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        """(B, S, S, 3) uint8 RGB at ``cfg.input_size`` -> one payload dict per image."""


def normalised(pixels: np.ndarray, mean: list[float], std: list[float], device: torch.device) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float, scaled to [0, 1] and standardised per channel."""
    tensor = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (tensor - mean_t) / std_t
