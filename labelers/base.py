"""The protocol every pseudo-labeler implements, whatever makes its labels.

A labeler turns a batch of RGB pixels into one payload per image. It never decodes a JPEG: the
label stage decodes each image once, takes its canonical view (the centred square of the shorter
side, see ``core.views``) and resizes that once per distinct ``input_size``. Labels are
therefore defined on that square view, and boxes are normalised to it.

A labeler is either a pretrained network (``labelers.pretrained``: weights to load, a tiny
random-init variant offline) or an algorithm (``AlgorithmicLabeler``: an edge detector, a colour
palette; nothing to load, and its labels are real). This module imports numpy and pyarrow only,
not torch, so that an algorithmic labeler and the modality registry stay light.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from four_m.core.config import LabelerConfig
from four_m.core.storage import RootPath


class Labeler(ABC):
    """One modality's pseudo-labeler.

    Subclasses set ``name`` (the modality key) and implement ``schema``, ``label`` and
    ``provenance``. Maps are returned at ``view_size`` (the label view's side), whatever the
    labeler's input size. The stage constructs every labeler the same way, calls ``prepare`` once
    on the driver, ``setup`` once per worker, then ``label`` batch after batch.
    """

    name: ClassVar[str]
    keeps_alt_text: ClassVar[bool] = False
    """The stage stores the url list's alt-text beside this modality's payload (captions)."""

    def __init__(self, cfg: LabelerConfig, view_size: int, workdir: Path | None = None, root: RootPath | None = None):
        self.cfg = cfg
        self.view_size = view_size
        self.workdir = workdir
        """A local folder of this labeler's own, where it may build what it needs once (a network's
        tiny variant); None where nothing may be built."""
        self.root = root
        """The dataset root being labelled, if any: anyone who can write it could plant files, so
        nothing that runs code when loaded is ever read from it."""

    @property
    def random_init(self) -> bool:
        """The labels come from random weights, not a real model: the stage summary and every file say so."""
        return False

    def prepare(self) -> None:  # noqa: B027 - an optional hook: an algorithm builds nothing
        """Build, once and before any worker, what ``setup`` will load; nothing by default."""

    def setup(self) -> None:  # noqa: B027 - an optional hook: an algorithm may need nothing loaded
        """Load what labelling needs, once per worker; nothing by default."""

    @abstractmethod
    def schema(self) -> pa.Schema:
        """The payload columns (besides ``key`` and ``error``), all nullable.

        Callable after ``prepare()`` without ``setup()`` (a network may read its config).
        """

    @abstractmethod
    def label(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        """(B, S, S, 3) uint8 RGB at ``cfg.input_size`` -> one payload dict per image."""

    def labelled(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        """What the stage calls: ``label`` in the labeler's numeric setting (a network's autocast),
        entered here, in the calling thread, because autocast is per thread."""
        return self.label(pixels)

    @abstractmethod
    def provenance(self) -> dict[str, str]:
        """Written into every output file's metadata; like ``schema()``, callable after ``prepare()``.

        Says how the labels were made: the model and revision, or the algorithm.
        """


class AlgorithmicLabeler(Labeler):
    """A labeler that is an algorithm: nothing to build or load, and its labels are real ones."""

    version: ClassVar[str]
    """The algorithm's version (or its library's): a changed algorithm names a new one."""

    def provenance(self) -> dict[str, str]:
        return {
            "modality": self.name,
            "method": f"algorithmic ({self.name} {self.version})",
            "input_size": str(self.cfg.input_size),
        }
