"""One run per dataset root and stage: a lock file that names its holder.

Two runs of one stage on one root would share shard temporaries and markers: one deletes what
the other is writing, or both do all the work. So each stage run holds
``_state/locks/<stage>.json`` (host, pid, the process's start time, run id) for its whole run.

- Taken atomically: locally the lock is written under a private name and hard-linked to its
  final name (the link fails if the name exists, and the file is complete when it appears); on an
  object store with an exclusive create (``xb``, a conditional put on S3).
- A lock whose holder is a dead process on this host (a SIGKILLed run) is taken over with a
  warning: the pid is gone, or belongs to a process started at another time (pid reuse).
- A lock held from another host cannot be checked from here: the run stops naming the holder;
  ``--force-unlock`` removes the root's locks when the user knows that run is gone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass

import psutil

from four_m.core.errors import UserError
from four_m.core.storage import RootPath, is_remote

LOCKS = "_state/locks"
log = logging.getLogger(__name__)


class StageLocked(UserError):
    """Another run holds this stage of this root."""


@dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    started: float
    """The process's start time: tells a live holder from a new process that reuses its pid."""
    run: str
    """Unique per run: a run releases only its own lock."""
    taken_at: float

    @classmethod
    def this_process(cls) -> LockHolder:
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=psutil.Process().create_time(),
            run=uuid.uuid4().hex,
            taken_at=time.time(),
        )

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.taken_at))
        return f"pid {self.pid} on {self.host} since {since}"

    def is_dead_here(self) -> bool:
        """True only when the holder provably is gone: a process of this host that no longer runs."""
        if self.host != socket.gethostname():
            return False
        try:
            return abs(psutil.Process(self.pid).create_time() - self.started) > 1.0
        except psutil.NoSuchProcess:
            return True


def lock_path(root: RootPath, stage: str) -> RootPath:
    """``stage`` may have a slash (``train/<run>``): one flat file per lock."""
    return root / LOCKS / f"{stage.replace('/', '--')}.json"


@contextmanager
def stage_lock(root: RootPath, stage: str) -> Iterator[LockHolder]:
    """Hold ``stage``'s lock on ``root`` for the block; released even when the block raises."""
    path = lock_path(root, stage)
    me = LockHolder.this_process()
    _acquire(path, stage, me)
    try:
        yield me
    finally:
        _release(path, me)


def force_unlock(root: RootPath) -> list[str]:
    """Remove every lock of ``root`` (``--force-unlock``); the holders removed, described."""
    folder = root / LOCKS
    removed = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        holder = _read(path)
        path.unlink(missing_ok=True)
        removed.append(f"{path.stem.replace('--', '/')}: {holder.describe() if holder else 'unreadable lock'}")
        log.warning("removed the lock of %s", removed[-1])
    return removed


def _acquire(path: RootPath, stage: str, me: LockHolder) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if _create(path, me):
        return
    holder = _read(path)
    if holder is not None and holder.is_dead_here():
        log.warning("taking over the %s lock of a run that is gone (%s)", stage, holder.describe())
        if _take_over(path, holder, me):
            return
        holder = _read(path)
    who = holder.describe() if holder else "a holder whose lock file does not parse"
    raise StageLocked(
        f"another {stage} run holds {path} ({who}): wait for it to finish; if it is gone (a lost machine),"
        " rerun with --force-unlock"
    )


def _create(path: RootPath, me: LockHolder) -> bool:
    """Write the lock if no lock exists; False if one does."""
    text = json.dumps(asdict(me))
    if is_remote(path):
        try:
            with path.open("x") as handle:
                handle.write(text)
        except FileExistsError:
            return False
        return True
    private = path.with_name(f".{path.name}.{me.run}.tmp")
    private.write_text(text)
    try:
        os.link(private, path)
    except FileExistsError:
        return False
    finally:
        private.unlink(missing_ok=True)
    return True


def _take_over(path: RootPath, dead: LockHolder, me: LockHolder) -> bool:
    """Replace a dead holder's lock by ours. Locally the dead lock is first moved aside under a
    private name and checked to be the one read, so two runs taking over at once cannot both win."""
    if is_remote(path):
        path.unlink(missing_ok=True)
        return _create(path, me)
    aside = path.with_name(f".{path.name}.{me.run}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return _create(path, me)
    if _read(aside) != dead:  # someone else's fresh lock: put it back
        with suppress(FileExistsError):
            os.link(aside, path)
        aside.unlink()
        return False
    aside.unlink()
    return _create(path, me)


def _release(path: RootPath, me: LockHolder) -> None:
    if _read(path) == me:
        path.unlink(missing_ok=True)


def _read(path: RootPath) -> LockHolder | None:
    try:
        return LockHolder(**json.loads(path.read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None
