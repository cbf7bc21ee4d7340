"""Tests only: halt a run after a chosen number of its finished units are put in place.

A kill-and-resume test must kill a run mid-work, never after its last unit. Killing after a delay
races with the run's pace (a loaded machine, shards that finish in one burst), so a test instead
starts the run with ``HALT_AFTER`` set (``halt_after`` makes it): the first ``placements`` files or
folders put in place at a path matching ``matching`` go through; then every process of the run that
is about to put another one there blocks for good, before it does. However fast or loaded the
machine, a run told to halt after fewer placements than it has left is still mid-work when the test
kills it, at a moment the test chooses after it saw those placements on disk.

The primitives that put finished work in place (``storage.replace`` under every atomic write, and
``storage.publish_folder``) call ``before_placing``; with the variable unset (always, outside
tests) that costs one environment lookup.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path, PurePosixPath

HALT_AFTER = "FOUR_M_TEST_HALT_AFTER"
HALTED = "halted"


def halt_after(placements: int, matching: str, claims: Path) -> dict[str, str]:
    """The environment that halts a run after ``placements`` placements at paths matching ``matching``
    (``PurePath.match``: absolute patterns match the whole path, relative ones its end).

    ``claims``: a folder of this run only, created here; each placement that may go through takes
    one numbered file in it first, so the processes of a run (Ray's workers) share the count. The
    first process to block creates ``HALTED`` in it: the run can put nothing more in place.
    """
    claims.mkdir(parents=True, exist_ok=True)
    return {HALT_AFTER: json.dumps({"placements": placements, "matching": matching, "claims": str(claims)})}


def before_placing(final: str) -> None:
    """Block for good if the run halts here: ``final`` (a local path or a url) matches, and the
    allowed placements are all taken."""
    setting = os.environ.get(HALT_AFTER)
    if not setting:
        return
    halt = json.loads(setting)
    if not PurePosixPath(final).match(halt["matching"]):
        return
    for slot in range(halt["placements"]):
        try:
            os.close(os.open(os.path.join(halt["claims"], str(slot)), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return  # this placement is one of the allowed ones
        except FileExistsError:
            continue
    Path(halt["claims"], HALTED).touch()
    while True:  # until the test kills the run
        time.sleep(60)
