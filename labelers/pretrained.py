"""The base of every labeler that is a pretrained network: its weights, their loading, the device.

Numerics: on a GPU, ``label`` runs under autocast (``precision: auto``: bf16 where the GPU has it,
else fp16; ``32`` turns it off; ``bf16``/``fp16`` force it, on a CPU too), the model is put in
``channels_last`` memory format (``channels_last``: convolutions run faster in it, other layers do not
care) and, with ``compile: true``, wrapped by ``torch.compile``. On a CPU, ``auto`` changes nothing.

Weights: ``model`` is a hub id pinned to a commit (``revision``) or a local directory, loaded with
the library's own ``from_pretrained`` (``det``: see its module). ``make models`` fetches a hub id at
its commit and records every file's sha256 in the root (``core/weights.py``); the label files'
provenance names the model, the revision and, once recorded, that digest. With ``model: null`` the
labeler builds its tiny variant (the same architecture, a small config, random weights) into its
``workdir`` first and then loads it through that same path, so offline runs exercise the production
code. Such labels say "random-init" in their provenance and in the stage summary.
"""

from __future__ import annotations

import os
import shutil
import uuid
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from four_m.core import storage
from four_m.core.config import LabelerConfig
from four_m.core.errors import UserError
from four_m.core.precision import autocast_dtype
from four_m.core.provenance import RANDOM_INIT
from four_m.core.storage import RootPath
from four_m.core.weights import WeightsManifest, hash_weights, is_hub_id, read_manifest, write_manifest
from four_m.labelers.base import LabelBatch, Labeler


class MissingWeightsError(UserError):
    """A labeler's weights cannot be loaded; the message names the model and how to get it."""


@dataclass(frozen=True)
class CostPart:
    """One part of a labeler's work on one image, as the dry run measures it, and how production's
    differs from it: the dry run's cost table counts ``run``'s FLOPs ``flops_times`` over and its
    peak memory ``memory_times`` over (1 and 1: production does exactly this)."""

    what: str
    run: Callable[[], object]
    flops_times: float = 1.0
    """How many such runs production makes per image."""
    memory_times: float = 1.0
    """How much larger production's one pass of it is (memory grows with it linearly)."""


class PretrainedLabeler(Labeler):
    """A labeler whose labels come from a network's weights.

    Subclasses implement ``build_tiny``, ``build_production`` and ``load`` besides the protocol's
    ``schema`` and ``label``.
    """

    tiny_marker: ClassVar[str] = "done"
    """The file that says the tiny folder is complete. A labeler whose tiny format changes names a
    new one, so that folders built in the old format are rebuilt rather than loaded."""

    def __init__(self, cfg: LabelerConfig, view_size: int, workdir: Path | None = None, root: RootPath | None = None):
        super().__init__(cfg, view_size, workdir, root)
        self.device = torch.device("cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu")

    @property
    def source(self) -> str:
        """Where the weights come from: the configured id/path, or the tiny variant's folder."""
        if self.cfg.model is not None:
            return self.cfg.model
        if self.workdir is None:
            raise ValueError(f"{self.name}: no model configured and no folder for the tiny variant")
        return str(self.random_folder)

    @property
    def random_folder(self) -> Path:
        """Where the random-init model is built: the workdir for the tiny variant, beside it (named
        ``<workdir>-production``) for the full-size one, so the two never share a folder."""
        if self.cfg.random_size == "tiny":
            return self.workdir
        return self.workdir.with_name(f"{self.workdir.name}-production")

    @property
    def random_init(self) -> bool:
        return self.cfg.random_init

    def provenance(self) -> dict[str, str]:
        return {
            "modality": self.name,
            "model": RANDOM_INIT if self.random_init else self.cfg.model,
            "revision": RANDOM_INIT if self.random_init else self.revision,
            **self.recorded_weights(),
            "input_size": str(self.cfg.input_size),
            **({"random_size": "production (dry run: random weights)"} if self.dry_run else {}),
        }

    @property
    def revision(self) -> str:
        """The commit of a hub model (the config requires one), or ``local`` for a folder or file."""
        return self.cfg.revision if is_hub_id(self.cfg.model) else "local"

    def recorded_weights(self) -> dict[str, str]:
        """``weights_sha256`` from the root's manifest of these weights (model and revision both
        match), when ``make models`` wrote one; nothing otherwise: the labels then name the model
        and revision only."""
        if self.random_init or self.root is None:
            return {}
        manifest = read_manifest(self.root, self.name)
        if manifest is None or not manifest.matches(self.cfg.model, self.cfg.revision):
            return {}
        return {"weights_sha256": manifest.weights_sha256}

    @property
    def dry_run(self) -> bool:
        """A full-size random-init model: production shapes and costs, meaningless labels."""
        return self.random_init and self.cfg.random_size == "production"

    def prepare(self) -> None:
        """Build the tiny variant's folder if it is needed and missing: by the first actor of each
        node that loads it (``setup``). Built under a temporary name and renamed, so actors of one
        node that race here never load a half-written folder."""
        if not self.random_init:
            return
        tiny = self.random_folder
        if (tiny / self.tiny_marker).exists():
            return
        building = tiny.with_name(f".{tiny.name}.{uuid.uuid4().hex[:8]}.tmp")
        building.mkdir(parents=True)
        torch.manual_seed(0)
        (self.build_production if self.dry_run else self.build_tiny)(building)
        (building / self.tiny_marker).touch()
        try:
            os.replace(building, tiny)
        except OSError:
            if (tiny / self.tiny_marker).exists():  # another worker's build won: the same seeded model
                shutil.rmtree(building, ignore_errors=True)
            else:  # a killed build, or an older tiny format, left a folder without the marker
                shutil.rmtree(tiny)
                os.replace(building, tiny)

    def setup(self) -> None:
        """Load the weights once per worker, through the production path, then lay them out for the GPU."""
        self.prepare()
        try:
            self.load(self.source, self.cfg.revision)
        except (OSError, ValueError) as err:
            raise MissingWeightsError(
                f"{self.name}: cannot load weights {self.source!r} ({type(err).__name__}: {str(err)[:300]}). "
                f"Run `make models` where the hub is reachable, or set label.{self.name}.model to a local "
                "directory, or to null for the tiny random-init variant."
            ) from None
        if self.device.type == "cuda" and self.cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.cfg.compile:
            self.model = torch.compile(self.model)

    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype ``precision`` selects on this labeler's device; None: full fp32."""
        return autocast_dtype(self.cfg.precision, self.device.type)

    def labelled(self, batch: LabelBatch) -> list[dict[str, Any]]:
        dtype = self.autocast_dtype()
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            return self.label_batch(batch)

    def cost_parts(self, batch: LabelBatch, production: LabelerConfig) -> list[CostPart]:
        """Labelling ``batch`` (one image), split where the configured work differs from
        ``production``'s (``LabelerConfig.at_dry_run_scale``); by default it does not: all of it, once."""
        return [CostPart("", lambda: self.labelled(batch))]

    def fetch(self) -> Path:
        """Where the configured weights are, fetched first if they are a hub id: its commit's
        snapshot folder in the hub's cache, holding exactly that commit's files."""
        if not is_hub_id(self.cfg.model):
            return Path(self.cfg.model)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(self.cfg.model, revision=self.cfg.revision))

    def record_weights(self) -> WeightsManifest:
        """``make models``: fetch the configured weights, hash every file and write the manifest
        into the root (``core/weights.py``); returns it."""
        if self.random_init or self.root is None:
            raise ValueError(f"{self.name}: only configured weights are recorded, into a dataset root")
        location = self.fetch()
        if not location.exists():
            raise FileNotFoundError(f"no weights at {location}")
        revision = self.cfg.revision if is_hub_id(self.cfg.model) else None
        manifest = hash_weights(self.name, self.cfg.model, revision, location)
        write_manifest(self.root, manifest)
        return manifest

    def writable_area_of(self, path: Path) -> Path | None:
        """The area others can write that ``path`` lies in, if any: the scratch space, or the dataset
        root when it is local. Weights that run code when loaded are never read from there."""
        areas = [storage.scratch_base()]
        if self.root is not None and not storage.is_remote(self.root):
            areas.append(Path(self.root))
        return next((area for area in areas if _inside(path, area)), None)

    @abstractmethod
    def build_tiny(self, directory: Path) -> None:
        """Save a small random-init model of the production architecture into ``directory``."""

    @abstractmethod
    def build_production(self, directory: Path) -> None:
        """Save the production model's architecture, full size, with random weights into ``directory``:
        the configuration of the checkpoint ``configs/cc12m.yaml`` names, written here offline."""

    @abstractmethod
    def load(self, source: str, revision: str | None) -> None:
        """Load weights from a hub id or local directory (the production path)."""


def _inside(path: Path, area: Path) -> bool:
    """``path`` lies in ``area``, as written or once links are followed (a link in or out counts)."""
    paths = (Path(os.path.abspath(path)), path.resolve())
    areas = (Path(os.path.abspath(area)), area.resolve())
    return any(p.is_relative_to(a) for p in paths for a in areas)
