"""The resume bookkeeping every shard stage shares (download, label, tokenize), written once.

A stage has one or more *outputs*: a folder of shards with its markers and the hash of the config
that shapes it (download: ``images/``; label: ``labels/<modality>/`` per labeler; tokenize:
``tokens/<modality>/`` per modality). A ``StageRun`` holds them with, per output and shard, the
upstream digests the shard is made from, and takes a run through the same steps in every stage:

1. ``check_not_stale``: finished shards made with another config stop the run before any work;
2. ``begin``: clear what a killed run left half-written, write this run's config beside the markers;
3. ``pending``: the shards whose marker is missing, broken or made from other inputs;
4. the stage's own work, then per written file ``finish``: its keys against ``images/``, its marker;
5. ``write_summary``: ``_state/<stage>/summary.json``.

The stage's lock (``DatasetRoot.lock``) is taken by its entry point around all of this.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Generic, TypeVar

import pyarrow as pa

from four_m.core import storage
from four_m.core.config import Config
from four_m.core.dataset_root import (
    DatasetRoot,
    FileDigest,
    StageState,
    clear_temporaries,
    shard_name,
    write_text_atomic,
)
from four_m.core.errors import UserError
from four_m.core.storage import RootPath

Summary = TypeVar("Summary")
DOWNLOAD = "download"


@dataclass(frozen=True)
class Output:
    """One resumable output of a stage; small and picklable, so workers can mark their own shards."""

    folder: str
    """Where its shards go, relative to the root: ``labels/depth``."""
    state: StageState
    config_hash: str
    """The hash of what shapes its shards: a finished shard with another one is stale."""

    def mark_done(self, shard: int, rows: int, files: list[RootPath], inputs: tuple[FileDigest, ...]) -> None:
        self.state.mark_done(shard, rows, files, self.config_hash, inputs)


@dataclass
class StageRun(Generic[Summary]):
    """One run of a stage over a dataset root: what it writes, what from, and what it reports."""

    root: DatasetRoot
    config: Config
    stage: str
    outputs: dict[str, Output]
    """By name: the labeler or modality (or the stage itself, for a stage with one output)."""
    inputs: dict[str, dict[int, tuple[FileDigest, ...]]]
    """Per output, the shards it can be made from, each with the upstream digests it is made from
    (its marker records them, so a shard made from other inputs is no longer done)."""
    summary: Summary

    def check_not_stale(self, shards: list[int], error: type[UserError], made_with: str) -> None:
        """Stop if finished ``shards`` of any output were made with another config: mixing them would
        make an incoherent dataset. ``made_with`` names what differs ("label config")."""
        for output in self.outputs.values():
            stale = output.state.stale_shards(shards, output.config_hash)
            if stale:
                state = output.state.folder.relative_to(self.root.path).as_posix()
                raise error(
                    f"{len(stale)} finished shards of {self.root / output.folder} were made with another"
                    f" {made_with} (see {output.state.folder / 'config.yaml'}); use a new root, or delete"
                    f" {output.folder}/ and {state}/ in it"
                )

    def begin(self, *also: RootPath) -> None:
        """Remove what a killed run left half-written (in each output's folders and ``also``); write
        this run's config beside each output's markers."""
        for output in self.outputs.values():
            for folder in (self.root / output.folder, output.state.folder):
                clear_temporaries(folder)
            output.state.write_run_config(self.config.recorded_yaml())
        for folder in also:
            clear_temporaries(folder)

    def pending(self, name: str) -> list[int]:
        """The shards of output ``name`` still to make: no marker, a broken file, or other inputs."""
        state, verify = self.outputs[name].state, self.config.verify_checksums
        return [s for s, inputs in sorted(self.inputs[name].items()) if not state.is_done(s, verify, inputs)]

    def finish(
        self, name: str, shard: int, file: RootPath, keys: pa.ChunkedArray, rows: int, image_keys: pa.ChunkedArray
    ) -> None:
        """Mark a written shard done, once its keys are those of ``images/`` (see ``check_keys``)."""
        check_keys(file, keys, image_keys)
        self.outputs[name].mark_done(shard, rows, [file], self.inputs[name][shard])

    def write_summary(self, record: dict) -> None:
        write_summary(self.root, self.stage, record)


def images_file(root: DatasetRoot, shard: int) -> RootPath:
    return root / f"images/{shard_name(shard)}.parquet"


def image_keys(root: DatasetRoot, shard: int) -> pa.ChunkedArray:
    """The join key of every later stage, in the row order they must keep."""
    return storage.read_table(images_file(root, shard), columns=["key"])["key"]


def check_keys(file: RootPath, keys: pa.ChunkedArray, images: pa.ChunkedArray) -> None:
    """A shard made from ``images/`` holds its keys in its order; if not, the file is removed (it must
    never be marked done) and the run stops naming it."""
    if not keys.equals(images):
        file.unlink()
        raise RuntimeError(f"{file}: keys are not those of images/ (row order broken)")


def downloaded_shards(root: DatasetRoot, error: type[UserError]) -> list[int]:
    """The shards the download stage has finished, by their markers; none stops the run."""
    folder = root.stage(DOWNLOAD).folder
    shards = sorted(int(p.name.split(".")[0]) for p in folder.glob("*.done.json"))
    if not shards:
        raise error(f"no finished download shards under {root.path}: run the download stage first")
    return shards


def downloaded_images(root: DatasetRoot, verify_checksums: bool, error: type[UserError]) -> dict[int, FileDigest]:
    """Finished download shards, each with the digest of its ``images/`` file as its marker recorded
    it, once the file is checked against it: a later shard made from it is trusted only while the
    file is unchanged."""
    download = root.stage(DOWNLOAD)
    return {s: download.verified(s, images_file(root, s), verify_checksums) for s in downloaded_shards(root, error)}


def write_summary(root: DatasetRoot, stage: str, record: dict, name: str = "summary.json") -> None:
    """``_state/<stage>/<name>``: the run's summary, for cards and scripts."""
    write_text_atomic(root / f"_state/{stage}/{name}", json.dumps(record, indent=1))
