"""The package layout: stage folders import as subpackages and nothing shadows the stdlib."""

import importlib
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_stdlib_tokenize_wins_from_the_repo_root():
    code = "import tokenize, inspect; print(tokenize.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    path = Path(out.stdout.strip())
    assert path.name == "tokenize.py"
    assert REPO not in path.parents, f"the repo's tokenize/ shadows the stdlib: {path}"


def test_stage_folders_are_subpackages_of_one_package():
    for name in ("pipeline", "labelers", "tokenize", "train", "datasets_cards", "core"):
        module = importlib.import_module(f"four_m.{name}")
        locations = list(module.__path__)
        assert locations == [str(REPO / name)], (name, locations)


def test_cv2_is_the_pinned_headless_build():
    import cv2

    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line)
    assert cv2.__version__ == pins["opencv-python-headless"].rsplit(".", 1)[0]
    gui = [line for line in cv2.getBuildInformation().splitlines() if line.strip().startswith("GUI:")]
    assert gui and gui[0].split(":", 1)[1].strip() == "NONE", gui
