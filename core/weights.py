"""Pinned labeler weights: which hub models need a commit, and the manifest ``make models`` writes.

A hub id alone names whatever its ``main`` branch holds the day it is fetched, so two runs of one
config could label with different weights. A commit hash (40 hex digits) names the same bytes
forever: every hub model in a config must name one (``label.<modality>.revision``), checked when
the config loads. A local folder or file needs none: its bytes are what they are.

``make models`` records what it fetched in ``<root>/models/<modality>.json``, the weights manifest
(``docs/dataset-root.md``): the model, the revision, and every file's relative path, size and
sha256, plus ``weights_sha256``, one digest over them all, which the label files' provenance
repeats. The digest is the sha256 of the lines ``<sha256>  <path>\\n`` in path order: the output
of ``sha256sum`` run over the files from inside the folder, sorted, with no ``./`` prefix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from four_m.core.dataset_root import FileDigest, sha256_file, write_text_atomic
from four_m.core.errors import UserError
from four_m.core.storage import RootPath

COMMIT = re.compile(r"[0-9a-f]{40}")
"""A full git commit hash: the only revision that cannot move (a branch or tag can)."""
HUB_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")
"""Where the hub's cache is and whether to reach the hub: workers must see what the driver was
given, or a worker on another node looks for the weights ``make models`` fetched somewhere else."""
MANIFESTS = "models"
"""``<root>/models/``: one weights manifest per labeler with configured weights."""
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CorruptWeightsError(UserError):
    """A cached weights file whose bytes are not those the hub named it by."""


def is_hub_id(model: str) -> bool:
    """``model`` names a hub repository rather than a local folder or file.

    Local is what is written as a path (absolute, ``./``, ``../``, ``~``) or exists here; anything
    else goes to the hub, as ``from_pretrained`` decides, so it is what must be pinned.
    """
    return not (model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists())


def pin_problem(model: str | None, revision: str | None) -> str | None:
    """Why ``model`` at ``revision`` is not pinned (one line), or None when it is or needs no pin."""
    if model is None or not is_hub_id(model) or (revision is not None and COMMIT.fullmatch(revision)):
        return None
    given = "none given" if revision is None else f"{revision!r} is not one"
    return (
        f"{model} is a hub id, so it needs the full 40-hex commit hash of the weights to use ({given}; "
        "a branch or tag moves); a local folder needs none: write it as a path (/..., ./...)"
    )


def hub_env() -> dict[str, str]:
    """The hub settings this process was given (``HUB_ENV``), for workers that do not inherit them."""
    return {name: os.environ[name] for name in HUB_ENV if name in os.environ}


@dataclass(frozen=True)
class WeightsManifest:
    """What one labeler's weights were when ``make models`` recorded them."""

    modality: str
    model: str
    """As configured: a hub id, or a local folder or file."""
    revision: str | None
    """The commit fetched (a hub id), or None (local weights)."""
    location: str
    """Where this machine holds them (the hub cache's snapshot folder, or the local path)."""
    files: tuple[FileDigest, ...]
    """Each file's digest, its path relative to the weights folder with ``/`` separators (the
    file's own name for a single file)."""

    @property
    def weights_sha256(self) -> str:
        lines = "".join(f"{f.sha256}  {f.path}\n" for f in self.files)
        return hashlib.sha256(lines.encode()).hexdigest()

    def matches(self, model: str | None, revision: str | None) -> bool:
        """Recorded for these weights (a manifest of another model or revision says nothing of them)."""
        return model == self.model and (revision if is_hub_id(model) else None) == self.revision

    def line(self) -> str:
        """One summary line: what, where, how much, and the digest the labels will carry."""
        at = f" at {self.revision}" if self.revision else ""
        size = sum(f.bytes for f in self.files) / 2**20
        return (
            f"{self.model}{at} -> {self.location}: {len(self.files)} files, {size:.1f} MiB,"
            f" weights sha256 {self.weights_sha256}"
        )

    def to_json(self) -> str:
        record = {
            "modality": self.modality,
            "model": self.model,
            "revision": self.revision,
            "location": self.location,
            "weights_sha256": self.weights_sha256,
            "files": [asdict(f) for f in self.files],
        }
        return json.dumps(record, indent=1) + "\n"


def hash_weights(modality: str, model: str, revision: str | None, location: Path) -> WeightsManifest:
    """Every file of the weights at ``location`` (a folder, walked in path order, or one file),
    hashed. A hub cache's file is a link to a blob named by the hub's own hash of it: the sha256
    for large (LFS) files, the git blob hash for the rest. A blob whose bytes do not hash to its
    name is refused, naming it, since a cut or damaged download would otherwise be recorded as the
    weights."""
    paths = sorted(p for p in location.rglob("*") if p.is_file()) if location.is_dir() else [location]
    files = []
    for path in paths:
        relative = path.relative_to(location).as_posix() if location.is_dir() else path.name
        digest = sha256_file(path)
        _check_blob(path, digest, model)
        files.append(FileDigest(relative, path.stat().st_size, digest))
    return WeightsManifest(modality, model, revision, str(location), tuple(files))


def _check_blob(path: Path, sha256: str, model: str) -> None:
    if not path.is_symlink():
        return
    name = Path(os.readlink(path)).name
    if _SHA256.fullmatch(name):
        actual = sha256
    elif _GIT_SHA1.fullmatch(name):
        actual = _git_blob_sha1(path)
    else:
        return
    if actual != name:
        raise CorruptWeightsError(
            f"{model}: cached file {path} does not match the hub's hash of it ({name}, its bytes hash to "
            f"{actual}): delete it and run `make models` again"
        )


def _git_blob_sha1(path: Path) -> str:
    """git's object id of the file: sha1 of ``blob <size>\\0`` and the bytes (small files only: the
    hub keeps anything large in LFS, named by sha256)."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def manifest_path(root: RootPath, modality: str) -> RootPath:
    return root / MANIFESTS / f"{modality}.json"


def write_manifest(root: RootPath, manifest: WeightsManifest) -> RootPath:
    """Write (atomically) the manifest of ``manifest.modality`` into the root; returns its path."""
    path = manifest_path(root, manifest.modality)
    write_text_atomic(path, manifest.to_json())
    return path


def read_manifest(root: RootPath, modality: str) -> WeightsManifest | None:
    """The recorded manifest of ``modality``'s weights, or None if none was written."""
    path = manifest_path(root, modality)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    files = tuple(FileDigest(**f) for f in record["files"])
    return WeightsManifest(record["modality"], record["model"], record["revision"], record["location"], files)
