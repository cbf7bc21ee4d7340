"""The command line: an unusable root stops every verb that writes, in one line, before any work."""

import subprocess
import sys

import pytest

from four_m.core.cli import main


@pytest.mark.parametrize("verb", ["download", "label", "tokenize", "train", "sample", "card"])
def test_a_root_that_is_a_file_stops_the_verb_in_one_line(tmp_path, capsys, verb):
    root = tmp_path / "root"
    root.write_text("not a folder")
    assert main([verb, "--root", str(root), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error == f"four_m {verb}: error: dataset root {root}: {root} is a file, not a folder\n"


def test_a_root_whose_parent_is_missing_stops_the_command_in_one_line(tmp_path):
    root = tmp_path / "typo" / "root"
    run = subprocess.run(
        [sys.executable, "-m", "four_m", "label", "--root", str(root), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and run.stderr.startswith(f"four_m label: error: dataset root {root}: ")
    assert f"its parent folder {root.parent} does not exist" in run.stderr
    assert not root.parent.exists()
