"""The dataset root, atomic writes and per-shard completion markers: resume for every stage.

A shard is done only when its marker exists under ``_state/<stage>/`` and the files it lists are
there with the recorded size (and checksum, when verifying). Output files are written to a
temporary name beside their final place and renamed, and the marker is written last, so a run
killed at any point leaves either a finished shard or one that the next run redoes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from four_m.core.errors import UserError
from four_m.core.stage_lock import stage_lock
from four_m.core.storage import RootPath, is_remote, location, remove_tree, replace, scratch

SHARD_DIGITS = 5  # img2dataset's shard naming (00000.parquet), kept by every later stage


class UpstreamChanged(UserError):
    """An upstream shard no longer matches the marker its stage wrote: it was changed or cut since."""


def shard_name(shard: int) -> str:
    return f"{shard:0{SHARD_DIGITS}d}"


@contextmanager
def atomic_path(final: RootPath) -> Iterator[RootPath]:
    """Yield a temporary path beside ``final``; rename it into place only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield temp
        replace(temp, final)
    finally:
        temp.unlink(missing_ok=True)


def clear_temporaries(folder: RootPath) -> None:
    """Remove what a killed run left half-written in ``folder``: temp files and the ``_tmp/`` area
    (and its local stand-in, for a remote root).

    Call only at the start of a stage: one run per dataset root and stage at a time.
    """
    if folder.is_dir():
        for temp in folder.glob(".*.tmp"):
            temp.unlink(missing_ok=True)
    for work in {folder / "_tmp", scratch(folder / "_tmp")}:
        remove_tree(work)


def write_text_atomic(final: RootPath, text: str) -> None:
    with atomic_path(final) as temp:
        temp.write_text(text)


def sha256_file(path: RootPath, chunk: int = 1 << 20) -> str:
    """Streamed in 1 MiB blocks: a shard of any size costs that much memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileDigest:
    path: str
    """Relative to the dataset root, so a root can be moved or mounted elsewhere."""
    bytes: int
    sha256: str

    @classmethod
    def of(cls, file: RootPath, path: str) -> FileDigest:
        """``file``'s digest, recorded under the root-relative ``path``: ``file`` may be a local copy
        of what was uploaded there (hashed here, not downloaded back)."""
        return cls(path, file.stat().st_size, sha256_file(file))


def file_problem(file: RootPath, digest: FileDigest, verify_checksums: bool) -> str | None:
    """What is wrong with ``file`` against its recorded digest, in a few words (``missing``,
    ``truncated: ...``, ``size changed: ...``, ``altered: ...``); None when it matches: its size
    always, its sha256 too with ``verify_checksums``."""
    if not file.is_file():
        return "missing"
    size = file.stat().st_size
    if size != digest.bytes:
        return f"{'truncated' if size < digest.bytes else 'size changed'}: {size} bytes, recorded {digest.bytes}"
    if verify_checksums and sha256_file(file) != digest.sha256:
        return "altered: its sha256 differs from the recorded one"
    return None


@dataclass(frozen=True)
class ShardMarker:
    shard: int
    rows: int
    files: tuple[FileDigest, ...]
    config_hash: str
    finished_at: float
    inputs: tuple[FileDigest, ...] = ()
    """The upstream files the shard was made from, as their own stage's marker recorded them: when
    an upstream shard is remade (a download retried), this shard is no longer done."""

    @classmethod
    def parse(cls, text: str) -> ShardMarker:
        """A marker from its JSON; ValueError, TypeError or KeyError if it is not one."""
        raw = json.loads(text)
        files = tuple(FileDigest(**f) for f in raw.pop("files"))
        inputs = tuple(FileDigest(**f) for f in raw.pop("inputs", ()))
        return cls(files=files, inputs=inputs, **raw)


class DatasetRoot:
    """Paths of one pipeline run (see docs/dataset-root.md): a local folder, or a folder
    on any fsspec filesystem (``core/storage.py``)."""

    def __init__(self, path: str | Path):
        self.path = location(path)

    def __truediv__(self, relative: str) -> RootPath:
        return self.path / relative

    def lock(self, stage: str):
        """Hold ``stage``'s lock on this root for a ``with`` block (``core/stage_lock.py``)."""
        return stage_lock(self.path, stage)

    def stage(self, name: str) -> StageState:
        return StageState(self, name)

    def digest(self, file: RootPath) -> FileDigest:
        return FileDigest.of(file, self.relative(file))

    def relative(self, file: RootPath) -> str:
        """``file``'s path under the root, as markers record it."""
        return file.relative_to(self.path).as_posix()


class StageState:
    """Completion markers of one stage: ``_state/<stage>/<shard>.done.json``."""

    def __init__(self, root: DatasetRoot, stage: str):
        self.root = root
        self.stage = stage
        self.folder = root / f"_state/{stage}"

    def marker_path(self, shard: int) -> RootPath:
        return self.folder / f"{shard_name(shard)}.done.json"

    def read_marker(self, shard: int) -> ShardMarker | None:
        try:
            return ShardMarker.parse(self.marker_path(shard).read_text())
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError):
            return None  # a marker that does not parse is not trusted: the shard is redone

    def is_done(self, shard: int, verify_checksums: bool, inputs: tuple[FileDigest, ...] | None = None) -> bool:
        """True only if the marker exists, every file it lists is intact and, when ``inputs`` is
        given, the shard was made from exactly those upstream files."""
        marker = self.read_marker(shard)
        if marker is None or (inputs is not None and marker.inputs != inputs):
            return False
        return not any(file_problem(self.root / d.path, d, verify_checksums) for d in marker.files)

    def mark_done(
        self, shard: int, rows: int, files: list[RootPath], config_hash: str, inputs: tuple[FileDigest, ...] = ()
    ) -> ShardMarker:
        """Record a finished shard; call only after every file in ``files`` is in its final place.

        ``inputs``: the upstream digests it was made from (see ``recorded``), for ``is_done``.
        """
        digests = tuple(self.root.digest(f) for f in files)
        marker = self.record(shard, rows, digests, config_hash, inputs)
        return marker

    def record(
        self,
        shard: int,
        rows: int,
        files: tuple[FileDigest, ...],
        config_hash: str,
        inputs: tuple[FileDigest, ...] = (),
    ) -> ShardMarker:
        """Write the marker of files already digested (``FileDigest.of`` a local copy, before its
        upload: a remote root's files are then not read back); call once they are in place."""
        marker = ShardMarker(shard, rows, files, config_hash, time.time(), inputs)
        write_text_atomic(self.marker_path(shard), json.dumps(asdict(marker), indent=1))
        return marker

    def recorded(self, shard: int, file: RootPath) -> FileDigest | None:
        """The digest this stage's marker holds for one of the shard's files (None: not finished).

        Read from the marker, not the file: a later stage compares it with what it recorded
        without re-hashing large shards on every run.
        """
        marker = self.read_marker(shard)
        relative = self.root.relative(file)
        return next((f for f in marker.files if f.path == relative), None) if marker else None

    def verified(self, shard: int, file: RootPath, verify_checksums: bool) -> FileDigest:
        """The digest this stage's marker holds for ``file``, once the file is checked against it
        (its size always, its hash when ``verify_checksums``): a later stage trusts its own skips
        and markers only as far as its inputs are still what was recorded."""
        digest = self.recorded(shard, file)
        if digest is None:
            raise UpstreamChanged(f"{file} has no finished {self.stage} marker: run that stage first")
        problem = file_problem(file, digest, verify_checksums)
        if problem:
            verb = self.stage.split("/")[0]
            raise UpstreamChanged(
                f"{file} does not match what the {self.stage} stage recorded ({problem}): it was changed, cut"
                f" or removed since; rerun the {verb} stage, which remakes that shard, then this one"
            )
        return digest

    def stale_shards(self, shards: list[int], config_hash: str) -> list[int]:
        """Finished shards that were made with another config of this stage."""
        markers = (self.read_marker(s) for s in shards)
        return [m.shard for m in markers if m is not None and m.config_hash != config_hash]

    def write_run_config(self, config_yaml: str) -> RootPath:
        """The resolved config of this run, beside the markers it produced."""
        path = self.folder / "config.yaml"
        write_text_atomic(path, config_yaml)
        return path


class UnusableRootError(UserError):
    """A local dataset root that cannot take a stage's output."""


def check_root_writable(path: str | Path) -> None:
    """Stop before any work when a local root cannot take output, naming the root and why.

    Found later, the first write fails deep inside a stage (``NotADirectoryError``, ``OSError``
    EROFS: a long traceback), or a stage reports "no finished download shards" where the truth is
    that the root is unusable. A relative root's missing folders are created as the stages write
    (the default ``data/default`` on a fresh checkout); an absolute root's parent must exist: a
    missing one is a typo or an unmounted disk (``/mnt/dtaa/cc12m``) that would be filled silently.
    A remote root is left to its filesystem: an object store has no folders, and a probe write
    would cost requests on every command.
    """
    root = location(path)
    if is_remote(root):
        return
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not existing.is_dir():
        raise UnusableRootError(f"dataset root {root}: {existing} is a file, not a folder")
    if existing not in (root, root.parent) and os.path.isabs(path):
        raise UnusableRootError(
            f"dataset root {root}: its parent folder {root.parent} does not exist (a typo, or a disk not mounted?)"
        )
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise UnusableRootError(f"dataset root {root}: {existing} is not writable ({err.strerror})") from None
