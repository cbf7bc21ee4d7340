"""The kill tests' halt hook: a run puts the allowed units in place, then stops before the next."""

from __future__ import annotations

import os
import threading

from four_m.core import storage
from four_m.core.halt import HALT_AFTER, halt_after


def _blocked(target, *args) -> bool:
    """Whether ``target(*args)`` is still waiting a second later (a blocked thread sleeps until pytest exits)."""
    call = threading.Thread(target=target, args=args, daemon=True)
    call.start()
    call.join(timeout=1.0)
    return call.is_alive()


def test_a_run_places_the_allowed_units_then_blocks_before_the_next_and_nothing_else_is_held(tmp_path, monkeypatch):
    markers = tmp_path / "root/_state/label/depth"
    markers.mkdir(parents=True)
    monkeypatch.setenv(
        HALT_AFTER, halt_after(2, f"{tmp_path}/root/_state/*/*/*.done.json", tmp_path / "claims")[HALT_AFTER]
    )
    temp = tmp_path / "temp"
    for shard in range(2):
        temp.write_text("{}")
        storage.replace(temp, markers / f"{shard:05d}.done.json")
    temp.write_text("x")
    storage.replace(temp, markers.parent / "depth.parquet")  # not a marker: not counted, never held
    temp.write_text("{}")
    storage.replace(temp, tmp_path / "elsewhere.done.json")  # the pattern is absolute: its whole path
    assert sorted(os.listdir(tmp_path / "claims")) == ["0", "1"]

    temp.write_text("{}")
    assert not (tmp_path / "claims/halted").exists()
    assert _blocked(storage.replace, temp, markers / "00002.done.json"), "the third marker should wait for the kill"
    assert (tmp_path / "claims/halted").is_file(), "the test's sign that the run can go no further"
    assert sorted(p.name for p in markers.iterdir()) == ["00000.done.json", "00001.done.json"]


def test_a_published_folder_is_a_placement_too_and_none_may_be_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv(HALT_AFTER, halt_after(0, f"{tmp_path}/tokenizers/*", tmp_path / "claims")[HALT_AFTER])
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "trained.json").write_text("{}")
    assert _blocked(storage.publish_folder, trained, tmp_path / "tokenizers/rgb", "trained.json")
    assert not (tmp_path / "tokenizers/rgb").exists()


def test_without_the_variable_nothing_is_held(tmp_path, monkeypatch):
    monkeypatch.delenv(HALT_AFTER, raising=False)
    temp = tmp_path / "temp"
    temp.write_text("{}")
    storage.replace(temp, tmp_path / "00000.done.json")
    assert (tmp_path / "00000.done.json").read_text() == "{}"
