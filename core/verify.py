"""``make verify``: every file of a dataset root checked against the marker that recorded it.

Each stage records, when it finishes a unit of work, the size and sha256 of every file it wrote:
``_state/<stage>/<shard>.done.json`` for the shards of ``images/``, ``labels/<modality>/`` and
``tokens/<modality>/``, one marker (shard 0) per tokenizer folder and per run's model. Verifying
reads every marker, then each file it lists (streamed, several at once: hashing releases the GIL
and a remote read waits on the network), and names what does not hold: a file missing, of another
size than recorded, or with another sha256 (a flipped bit). Two more checks cost no read of the data:
a shard made from an upstream file other than the one recorded now (a download retried since:
the next run of its stage remakes it), and a file in a shard or tokenizer folder that no marker
lists (a shard killed between its rename and its marker, or a file put there by hand).

Run it while no stage runs on the root: a stage at work has files that its marker does not list yet.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from four_m.core.dataset_root import DatasetRoot, FileDigest, ShardMarker, file_problem
from four_m.core.errors import UserError
from four_m.core.storage import RootPath, list_files

STATE = "_state"
MARKER = ".done.json"
WORKERS = 8
"""Markers checked at once (threads): enough to keep a disk or an object store's connections busy."""
MARKED_FOLDERS = ("images", "labels", "tokens", "tokenizers")
"""Folders whose every file a marker lists (work files aside, see ``_work_file``), so that a file no
marker lists is reported. Not ``runs/``: its logs, checkpoints, samples and evals are not marked."""


@dataclass(frozen=True)
class Problem:
    path: str
    """Relative to the root."""
    what: str

    def line(self) -> str:
        return f"verify: {self.path}: {self.what}"


@dataclass
class StageTally:
    """One stage's markers (``download``, ``label/depth``, ``tokenizers/rgb``, ``train/tiny``)."""

    markers: int = 0
    files: int = 0
    bytes: int = 0
    problems: int = 0

    def line(self, stage: str) -> str:
        return f"verify: {stage}: {_counts(self.markers, self.files, self.bytes)}: {_verdict(self.problems)}"


@dataclass
class Verification:
    root: RootPath
    stages: dict[str, StageTally] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    """In the order of the markers' paths, then stale shards, then files no marker lists."""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        total = StageTally(*(sum(getattr(t, f) for t in self.stages.values()) for f in ("markers", "files", "bytes")))
        return [
            *(p.line() for p in self.problems),
            *(tally.line(stage) for stage, tally in sorted(self.stages.items())),
            f"verify: {self.root}: {_counts(total.markers, total.files, total.bytes)} in {self.seconds:.1f} s:"
            f" {_verdict(len(self.problems), 'all hold')}",
        ]


@dataclass(frozen=True)
class _Checked:
    """One marker and what was wrong with it or its files (done in a worker thread)."""

    path: str
    stage: str
    marker: ShardMarker | None
    problems: tuple[Problem, ...]


def verify_root(path: str | RootPath, workers: int = WORKERS) -> Verification:
    """Check every marker of the root at ``path`` and the files it lists; see the module's docstring."""
    started = time.perf_counter()
    root = DatasetRoot(path)
    markers = sorted(f"{STATE}/{name}" for name in list_files(root / STATE) if name.endswith(MARKER))
    if not markers:
        raise UserError(f"no markers under {root / STATE}: not a dataset root, or no stage has finished there")
    result = Verification(root.path)
    recorded: dict[str, FileDigest] = {}
    made_from: list[tuple[str, str, FileDigest]] = []  # (stage, shard, an input as the shard was made from it)
    with ThreadPoolExecutor(workers) as pool:
        for checked in pool.map(partial(_check, root), markers):
            tally = result.stages.setdefault(checked.stage, StageTally())
            _add(result, tally, checked.problems)
            if checked.marker is None:
                continue
            tally.markers += 1
            tally.files += len(checked.marker.files)
            tally.bytes += sum(f.bytes for f in checked.marker.files)
            recorded.update((f.path, f) for f in checked.marker.files)
            shard = checked.marker.files[0].path if checked.marker.files else checked.path
            made_from += [(checked.stage, shard, used) for used in checked.marker.inputs]
    for stage, file, used in made_from:
        now = recorded.get(used.path)
        if now != used:
            why = "no marker lists it now" if now is None else "it was remade since"
            verb = stage.split("/")[0]
            what = f"stale: made from {used.path}, but {why}; the next {verb} run remakes this shard"
            _add(result, result.stages[stage], (Problem(file, what),))
    result.problems += [
        Problem(file, "no marker lists it: a shard not finished (rerun its stage) or a file put there by hand")
        for file in _unmarked(root, recorded.keys())
    ]
    result.seconds = time.perf_counter() - started
    return result


def _check(root: DatasetRoot, marker: str) -> _Checked:
    stage = marker.removeprefix(f"{STATE}/").rpartition("/")[0]
    try:
        parsed = ShardMarker.parse((root / marker).read_text())
    except FileNotFoundError:
        return _Checked(
            marker, stage, None, (Problem(marker, "removed while verifying: is a stage running on this root?"),)
        )
    except (ValueError, TypeError, KeyError) as err:
        problem = Problem(marker, f"not a marker ({type(err).__name__}: {err}): its stage redoes that shard")
        return _Checked(marker, stage, None, (problem,))
    problems = ((f.path, file_problem(root / f.path, f, verify_checksums=True)) for f in parsed.files)
    return _Checked(marker, stage, parsed, tuple(Problem(path, what) for path, what in problems if what))


def _add(result: Verification, tally: StageTally, problems: tuple[Problem, ...]) -> None:
    result.problems += problems
    tally.problems += len(problems)


def _unmarked(root: DatasetRoot, recorded: Collection[str]) -> Iterator[str]:
    """Files of ``MARKED_FOLDERS`` that no marker lists, in path order."""
    for folder in MARKED_FOLDERS:
        for name in sorted(list_files(root / folder)):
            file = f"{folder}/{name}"
            if file not in recorded and not _work_file(file):
                yield file


def _work_file(file: str) -> bool:
    """A temporary (``.name.tmp``, ``.<modality>.tmp/``) or a work folder (``_tmp/``): what a run is
    writing, or a killed one left for the next run to clear; never a finished output."""
    return any(part.startswith((".", "_")) for part in file.split("/"))


def _counts(markers: int, files: int, size: int) -> str:
    return f"{_many(markers, 'marker')}, {_many(files, 'file')}, {size / 1e6:.1f} MB"


def _verdict(problems: int, ok: str = "ok") -> str:
    return _many(problems, "problem") if problems else ok


def _many(count: int, thing: str) -> str:
    return f"{count} {thing}{'' if count == 1 else 's'}"
