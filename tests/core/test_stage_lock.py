"""One run per root and stage: the lock file, its atomic take, stale takeover and --force-unlock."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import asdict, replace

import pytest

from four_m.cli import main
from four_m.core import storage
from four_m.core.stage_lock import LockHolder, StageLocked, force_unlock, lock_path, stage_lock


def _plant(root, stage: str, holder: LockHolder) -> None:
    path = lock_path(root, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(holder)))


def _dead_holder() -> LockHolder:
    """A holder on this host whose process has exited (a SIGKILLed run)."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return replace(LockHolder.this_process(), pid=int(finished.stdout), run="dead-run")


def test_a_held_stage_refuses_a_second_run_naming_the_holder_and_other_stages_stay_free(tmp_path):
    with stage_lock(tmp_path, "label") as me:
        with pytest.raises(StageLocked, match=rf"another label run holds .*pid {me.pid} on {me.host} since"):
            with stage_lock(tmp_path, "label"):
                pass
        with stage_lock(tmp_path, "tokenize"), stage_lock(tmp_path, "train/tiny"):
            assert lock_path(tmp_path, "train/tiny").name == "train--tiny.json"
        assert json.loads(lock_path(tmp_path, "label").read_text())["run"] == me.run
    assert not lock_path(tmp_path, "label").exists(), "released when the block ends"


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(RuntimeError), stage_lock(tmp_path, "label"):
        raise RuntimeError("a stage error")
    with stage_lock(tmp_path, "label"):
        pass


def test_a_dead_processs_lock_on_this_host_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = _dead_holder()
    _plant(tmp_path, "label", dead)
    with caplog.at_level(logging.WARNING, logger="four_m.core.stage_lock"), stage_lock(tmp_path, "label") as me:
        assert json.loads(lock_path(tmp_path, "label").read_text())["run"] == me.run
    assert f"taking over the label lock of a run that is gone (pid {dead.pid} on" in caplog.text
    assert not list(lock_path(tmp_path, "label").parent.glob(".*")), "no private file is left beside the lock"


def test_a_reused_pid_does_not_keep_a_dead_runs_lock(tmp_path):
    """The pid now belongs to this very process, started at another time than the recorded holder."""
    reused = replace(LockHolder.this_process(), started=1.0, run="old-run")
    assert reused.is_dead_here()
    assert not LockHolder.this_process().is_dead_here()


def test_another_hosts_lock_is_refused_until_force_unlock_and_the_cli_flag_removes_it(tmp_path, capsys):
    elsewhere = replace(LockHolder.this_process(), host="node-7.cluster", pid=4242)
    _plant(tmp_path, "download", elsewhere)
    with pytest.raises(StageLocked, match="pid 4242 on node-7.cluster since .* rerun with --force-unlock"):
        with stage_lock(tmp_path, "download"):
            pass
    assert force_unlock(tmp_path)[0].startswith("download: pid 4242 on node-7.cluster")
    with stage_lock(tmp_path, "download"):
        pass
    _plant(tmp_path, "download", elsewhere)
    main(["card", "--root", str(tmp_path / "missing-run"), "--force-unlock"])  # fails later: nothing to card
    assert lock_path(tmp_path, "download").exists(), "--force-unlock touches only the root it is given"
    main(["card", "--root", str(tmp_path), "--force-unlock"])
    assert "removed the lock of download: pid 4242 on node-7.cluster" in capsys.readouterr().err
    assert not lock_path(tmp_path, "download").exists()


def test_an_object_store_lock_is_taken_exclusively(object_store):
    root = storage.location(object_store.uri("locked"))
    with stage_lock(root, "tokenize") as me:
        assert json.loads(lock_path(root, "tokenize").read_text())["pid"] == me.pid
        with pytest.raises(StageLocked, match="another tokenize run holds s3://"):
            with stage_lock(root, "tokenize"):
                pass
    assert not lock_path(root, "tokenize").exists()
    _plant(root, "tokenize", _dead_holder())
    with stage_lock(root, "tokenize") as me:
        assert json.loads(lock_path(root, "tokenize").read_text())["run"] == me.run
