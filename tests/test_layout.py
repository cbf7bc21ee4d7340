"""The package layout: stage folders import as subpackages, nothing shadows the stdlib, and the
packages import each other only downwards (docs/design.md, "Layers")."""

import ast
import importlib
import io
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from four_m.core.failures import SUCCESS
from four_m.core.label_codec import encode_png
from four_m.core.modalities import KINDS, MODALITIES, pixel_inputs
from four_m.core.provenance import RANDOM_INIT

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "four_m"


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


# Layers: what each package must not import. ``core/`` is the on-disk contract and imports nothing
# else of ours; ``modalities/`` are declarations that ``make card`` loads, so they import only core
# and the torch-free labeler protocol (an algorithmic labeler lives in its modality's one module);
# ``filters/`` (curation's declarations and scorers) import only core, and no stage library them;
# the stages' libraries never import ``pipeline/`` (the only Ray user) nor each other sideways;
# ``train/`` imports ``tokenize/`` (vocabularies, decoders) but not ``labelers/``; the card reads
# files through core only, so that it loads neither torch nor Ray. ``pipeline/`` may import every
# package. The CLI (``cli.py``, beside ``__main__.py``) sits above them all, and none imports it.
OURS = ("core", "modalities", "filters", "labelers", "tokenize", "train", "datasets_cards", "pipeline")
TOP = ("cli", "__main__")
"""The root's modules above every package: the verbs, each importing its stage when it runs."""
FORBIDDEN: dict[str, frozenset[str]] = {
    "core": frozenset(OURS + TOP) - {"core"},
    "modalities": frozenset(OURS + TOP) - {"core", "modalities"},
    "filters": frozenset(OURS + TOP) - {"core", "filters"},
    "labelers": frozenset({"pipeline", "filters", "tokenize", "train", "datasets_cards", *TOP}),
    "tokenize": frozenset({"pipeline", "filters", "labelers", "train", "datasets_cards", *TOP}),
    "train": frozenset({"pipeline", "filters", "labelers", "datasets_cards", *TOP}),
    "datasets_cards": frozenset({"pipeline", "filters", "labelers", "tokenize", "train", *TOP}),
    "pipeline": frozenset(TOP),
}
ALLOWED: dict[str, frozenset[str]] = {"modalities": frozenset({f"{PACKAGE}.labelers.base"})}
"""Modules a package may import although their package is forbidden to it."""
HEAVY = ("ray", "torch", "img2dataset")
"""What ``make card`` must not import: it reads files, and runs where no stage is installed."""


@dataclass(frozen=True)
class Import:
    file: str
    """Relative to the repository, e.g. ``tokenize/maps.py``."""
    line: int
    module: str
    """Absolute dotted name, e.g. ``four_m.core.views``."""
    names: tuple[str, ...]
    """What ``from module import ...`` takes; empty for ``import module``."""

    def __str__(self) -> str:
        statement = f"from {self.module} import {', '.join(self.names)}" if self.names else f"import {self.module}"
        return f"{self.file}:{self.line}: {statement}"


def _package_files() -> dict[str, Path]:
    """Every module of the package (the root's and each subpackage folder's), as dotted name -> file."""
    files = {}
    for package in (PACKAGE, *(f"{PACKAGE}.{name}" for name in OURS)):
        folder = REPO.joinpath(*package.split(".")[1:])
        for path in sorted(folder.glob("*.py")):
            dotted = package if path.stem == "__init__" else f"{package}.{path.stem}"
            files[dotted] = path
    return files


def _imports(dotted: str, path: Path) -> list[Import]:
    """Every import statement of one module, with relative imports resolved, parsed (not grepped)."""
    package = dotted if path.stem == "__init__" else dotted.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            relative = str(path.relative_to(REPO))
            if isinstance(child, ast.Import):
                found.extend(Import(relative, child.lineno, a.name, ()) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - child.level + 1] if child.level else []
                module = ".".join([*base, *([child.module] if child.module else [])])
                found.append(Import(relative, child.lineno, module, tuple(a.name for a in child.names)))
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def _our_package(module: str, names: tuple[str, ...]) -> set[str]:
    """The packages of ours an import reaches: ``four_m.x.y`` is x; ``from four_m import x`` is x."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return set()
    if len(parts) > 1:
        return {parts[1]}
    return {name for name in names if name in OURS + TOP}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_packages_import_only_downwards():
    offences = []
    for dotted, path in _package_files().items():
        parts = dotted.split(".")
        if len(parts) < 2 or parts[1] not in FORBIDDEN:
            continue
        owner = parts[1]
        for found in _imports(dotted, path):
            if found.module in ALLOWED.get(owner, ()):
                continue
            for target in sorted(_our_package(found.module, found.names) & FORBIDDEN[owner]):
                what = f"{target}.py" if target in TOP else f"{target}/"
                offences.append(f"{found}  ({owner}/ must not import {what})")
    assert not offences, "imports against the layers of docs/design.md:\n" + "\n".join(offences)


def test_no_module_imports_a_private_name_of_another():
    offences = []
    for dotted, path in _package_files().items():
        for found in _imports(dotted, path):
            if not _our_package(found.module, found.names) and found.module != PACKAGE:
                continue
            private = [p for p in found.module.split(".") if _private(p)] + [n for n in found.names if _private(n)]
            if private and found.module != dotted:
                offences.append(f"{found}  (private: {', '.join(private)})")
    assert not offences, "imports of private names (make them public, or keep them in their module):\n" + "\n".join(
        offences
    )


def _card_root(root: Path) -> None:
    """A small root as the stages leave it: one images/ shard with a failed row, semseg labels and
    tokens, and a training run's description and loss log; written directly, without Ray."""
    keys = ["000000000", "000000001"]
    jpeg = io.BytesIO()
    Image.fromarray(np.full((16, 24, 3), 120, np.uint8)).save(jpeg, format="JPEG")
    (root / "images").mkdir(parents=True)
    images = {
        "key": keys,
        "jpg": [jpeg.getvalue(), None],
        "caption": ["a grey photo", "a missing photo"],
        "url": ["http://127.0.0.1/a.jpg", "http://127.0.0.1/b.jpg"],
        "status": [SUCCESS, "failed_to_download"],
        "error_message": [None, "HTTP Error 404: Not Found"],
    }
    pq.write_table(pa.table(images), root / "images/00000.parquet")
    (root / "labels/semseg").mkdir(parents=True)
    labels = pa.schema(
        [("key", pa.string()), ("semseg", pa.binary()), ("error", pa.string())],
        metadata={"four_m.model": RANDOM_INIT, "four_m.classes": json.dumps(["person"])},
    )
    semseg = [encode_png(np.zeros((8, 8), np.uint8)), None]
    table = pa.table({"key": keys, "semseg": semseg, "error": [None, "no image: download failed (http_404)"]})
    pq.write_table(table.cast(labels), root / "labels/semseg/00000.parquet")
    (root / "tokens/semseg").mkdir(parents=True)
    tokens = pa.schema(
        [("key", pa.string()), ("tokens", pa.list_(pa.uint16())), ("error", pa.string())],
        metadata={"four_m.vocab_size": "16", "four_m.tokenizer": "semseg-vq"},
    )
    table = pa.table({"key": keys, "tokens": [[1, 2, 3], None], "error": [None, "absent: no image"]})
    pq.write_table(table.cast(tokens), root / "tokens/semseg/00000.parquet")
    run = root / "runs/tiny"
    (run / "logs/version_0").mkdir(parents=True)
    model = {"encoder_layers": 1, "decoder_layers": 1, "dim": 8}
    (run / "model.json").write_text(json.dumps({"model": model, "modalities": [{"name": "semseg"}]}))
    (run / "logs/version_0/metrics.csv").write_text("step,train/loss\n0,5.0\n1,4.0\n")


def test_card_imports_neither_torch_nor_ray(tmp_path):
    root = tmp_path / "root"
    _card_root(root)
    script = (
        "import json, sys\n"
        "from four_m.cli import main\n"
        f"status = main(['card', '--root', {str(root)!r}])\n"
        f"print(json.dumps([status, sorted(m for m in {HEAVY!r} if m in sys.modules)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    status, loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert status == 0 and (root / "README.md").is_file(), out.stdout + out.stderr
    assert loaded == [], f"make card imported {loaded}"
    card = (root / "README.md").read_text()
    assert "| `runs/tiny/` | 1+1 layers, dim 8 | semseg | 1 | 5.000 -> 4.000 |" in card, "the run was not read"


def _words(identifier: str) -> list[str]:
    """``ContinuousMapAdapter`` and ``NO_CLASS`` -> lower-case words: continuous, map, adapter; no, class."""
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", identifier).lower().strip("_").split("_")


def test_no_class_or_constant_outside_modalities_and_labelers_is_named_after_a_modality():
    """What a kind shares is named after the kind (``ContinuousMapAdapter`` serves every continuous
    map, not only depth), so a modality's name is spelled only in its own module and its labeler.
    Classes and module constants are checked, parsed; string literals, functions and locals are not:
    the words also mean other things there (images/' caption column, RGB colour, a network's depth)."""
    names = [n.split("_") for n in (*MODALITIES, *pixel_inputs()) if n not in KINDS]  # a kind's name is a kind's
    offences = []
    for dotted, path in _package_files().items():
        if dotted.split(".")[1:2] in (["modalities"], ["labelers"]):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                defined = [node.name]
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                defined = [t.id for t in targets if isinstance(t, ast.Name) and t.id.lstrip("_").isupper()]
            else:
                continue
            for name in defined:
                words = _words(name)
                for modality in names:
                    if any(words[i : i + len(modality)] == modality for i in range(len(words))):
                        offences.append(f"{path.relative_to(REPO)}:{node.lineno}: {name} ({'_'.join(modality)})")
    assert not offences, "named after a modality, not its kind:\n" + "\n".join(offences)
