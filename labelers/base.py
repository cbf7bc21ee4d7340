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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from four_m.core.config import LabelerConfig
from four_m.core.modalities import MODALITIES
from four_m.core.provenance import RANDOM_INIT
from four_m.core.storage import RootPath


@dataclass(frozen=True)
class LabelBatch:
    """What the stage hands a labeler for one batch of images, row for row.

    Most labelers read only ``pixels``; one that derives its labels from the image's url-list row or
    from other labelers' labels (its modality's ``requires`` / ``uses``) reads the rest.
    """

    pixels: np.ndarray
    """(B, S, S, 3) uint8 RGB label views at ``cfg.input_size``."""
    keys: list[str] = field(default_factory=list)
    alt_texts: list[str | None] = field(default_factory=list)
    """The url list's caption of each row."""
    original_sizes: list[tuple[int, int] | None] = field(default_factory=list)
    """(width, height) of each photo as downloaded, before any resizing (img2dataset's record)."""
    labels: Mapping[str, list[dict[str, Any] | None]] = field(default_factory=dict)
    """Per modality the labeler reads: each row's stored columns (payload, ``alt_text``), or None
    where that label failed or was never made."""

    def __len__(self) -> int:
        return len(self.pixels)

    def rows(self, start: int, stop: int) -> LabelBatch:
        """Rows ``start:stop``, for retrying a failed batch row by row."""

        def cut(values: list) -> list:
            return values[start:stop]

        return LabelBatch(
            self.pixels[start:stop],
            cut(self.keys),
            cut(self.alt_texts),
            cut(self.original_sizes),
            {name: cut(rows) for name, rows in self.labels.items()},
        )


class Labeler(ABC):
    """One modality's pseudo-labeler.

    Subclasses set ``name`` (the modality key) and implement ``schema``, ``label`` and
    ``provenance``. Maps are returned at ``view_size`` (the label view's side), whatever the
    labeler's input size. The stage constructs every labeler the same way, in the actors only (its
    driver never imports a labeler), calls ``setup`` once per actor, then ``label`` batch after batch.
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
        """Build what ``setup`` will load, if it is missing; nothing by default. Called by ``setup``
        where it needs it, so actors that race here must be safe (build aside, then rename)."""

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

    def label_batch(self, batch: LabelBatch) -> list[dict[str, Any]]:
        """One payload dict per row of ``batch``; a labeler that reads more than pixels overrides this."""
        return self.label(batch.pixels)

    def labelled(self, batch: LabelBatch) -> list[dict[str, Any]]:
        """What the stage calls: ``label_batch`` in the labeler's numeric setting (a network's
        autocast), entered here, in the calling thread, because autocast is per thread."""
        return self.label_batch(batch)

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


class DerivedLabeler(AlgorithmicLabeler):
    """An algorithm over other labels (and the url-list row): its modality declares what it reads
    (``requires`` / ``uses``), and the stage runs those labelers first and hands their labels over
    in :class:`LabelBatch`. Its labels are as real as the labels it reads: the stage flags them
    random-init where a required input was."""

    derived_from_random_init: bool = False
    """Set by the stage when a label it requires was made by random weights (then so are these)."""

    @property
    def random_init(self) -> bool:
        return self.derived_from_random_init

    @abstractmethod
    def label_batch(self, batch: LabelBatch) -> list[dict[str, Any]]: ...

    def provenance(self) -> dict[str, str]:
        spec = MODALITIES[self.name]
        found = {**super().provenance(), "label_inputs": ",".join(spec.label_inputs)}
        if self.derived_from_random_init:
            found |= {"model": RANDOM_INIT, "revision": RANDOM_INIT}
        return found

    def label(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        raise TypeError(f"{self.name} labels from other labels: call label_batch with a LabelBatch")
