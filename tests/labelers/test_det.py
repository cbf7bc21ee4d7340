import json
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from four_m.core import storage
from four_m.core.coco import COCO_THINGS
from four_m.core.provenance import RANDOM_INIT
from four_m.labelers.det import (
    CONFIG_FILE,
    TINY_ARCHITECTURE,
    WEIGHTS_FILE,
    DetLabeler,
    UntrustedWeightsError,
    convert_pickle,
)
from four_m.labelers.pretrained import MissingWeightsError
from four_m.modalities.det import DetConfig

SIZE = 160


class WritesOnUnpickle:
    """Unpickling this opens ``target`` for writing: a harmless stand-in for a payload like os.system."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def plant(path: Path, target: Path) -> None:
    """A torch-saved pickle at ``path`` that creates ``target`` if anything ever unpickles it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(WritesOnUnpickle(target), path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("det")
    labeler = DetLabeler(DetConfig(input_size=SIZE, score_threshold=0.0, max_boxes=5), view_size=64, workdir=folder)
    labeler.setup()
    return labeler, folder


def test_boxes_follow_the_schema_and_ranges(tiny, batch):
    labeler, _ = tiny
    out = labeler.label(batch(SIZE))
    table = pa.Table.from_pylist(out, schema=labeler.schema())
    assert table.num_rows == 4
    boxes = [box for row in out for box in row["det"]]
    assert boxes, "with a zero threshold the random detector still returns boxes"
    assert all(len(row["det"]) <= 5 for row in out)
    for box in boxes:
        assert 0.0 <= box["x0"] <= box["x1"] <= 1.0 and 0.0 <= box["y0"] <= box["y1"] <= 1.0
        assert box["class"] in COCO_THINGS and 0.0 <= box["score"] <= 1.0


def test_score_threshold_drops_boxes(tiny, batch):
    _, folder = tiny
    strict = DetLabeler(DetConfig(input_size=SIZE, score_threshold=1.0), view_size=64, workdir=folder)
    strict.setup()
    assert all(row["det"] == [] for row in strict.label(batch(SIZE)))


def test_torch_threads_of_the_process_are_left_alone(tiny, batch):
    """ultralytics resets them to its own count; the other labelers in the actor need ours."""
    from ultralytics.utils import NUM_THREADS

    labeler, _ = tiny
    before = torch.get_num_threads()
    torch.set_num_threads(NUM_THREADS + 1)
    try:
        labeler.label(batch(SIZE))
        assert torch.get_num_threads() == NUM_THREADS + 1
    finally:
        torch.set_num_threads(before)


def test_trusted_pickles_and_safetensors_folders_label_like_the_tiny_model(tiny, tmp_path, batch):
    """The tiny folder loads as a configured model; a pickle of the same seeded model (the tiny
    format before safetensors) loads when trusted, and converted to safetensors gives the same boxes."""
    labeler, folder = tiny
    from ultralytics import YOLO

    torch.manual_seed(0)
    YOLO(TINY_ARCHITECTURE).save(tmp_path / "yolo.pt")
    convert_pickle(tmp_path / "yolo.pt", tmp_path / "converted")
    settings = {"input_size": SIZE, "score_threshold": 0.0, "max_boxes": 5}
    configured = [
        DetConfig(model=str(folder), **settings),
        DetConfig(model=str(tmp_path / "yolo.pt"), trust_pickle=True, **settings),
        DetConfig(model=str(tmp_path / "converted"), **settings),
    ]
    expected = labeler.label(batch(SIZE))
    for cfg in configured:
        loaded = DetLabeler(cfg, view_size=64)
        loaded.setup()
        assert loaded.label(batch(SIZE)) == expected, cfg.model
        assert loaded.provenance()["model"] == cfg.model
    assert labeler.provenance()["model"] == RANDOM_INIT


def test_a_pickle_planted_as_the_old_tiny_model_is_replaced_unread(tiny, tmp_path, batch):
    """The old tiny format was ``yolo.pt`` plus ``done``: planted in a root, it is rebuilt, never loaded."""
    labeler, _ = tiny
    folder = tmp_path / "root/_models/det"
    plant(folder / "yolo.pt", tmp_path / "pwned")
    (folder / "done").touch()
    rebuilt = DetLabeler(labeler.cfg, view_size=64, workdir=folder)
    rebuilt.setup()
    assert not (tmp_path / "pwned").exists()
    assert not (folder / "yolo.pt").exists()
    assert rebuilt.label(batch(SIZE)) == labeler.label(batch(SIZE))


@pytest.mark.parametrize("planted", [WEIGHTS_FILE, CONFIG_FILE])
def test_a_pickle_planted_where_the_loader_reads_is_refused_unread(tiny, tmp_path, planted):
    _, built = tiny
    folder = tmp_path / "det"
    shutil.copytree(built, folder)
    plant(folder / planted, tmp_path / "pwned")
    with pytest.raises(MissingWeightsError, match=planted):
        DetLabeler(DetConfig(input_size=SIZE), view_size=64, workdir=folder).setup()
    assert not (tmp_path / "pwned").exists()


def test_a_configured_pickle_is_refused_unless_trusted(tmp_path):
    weights = tmp_path / "models/yolov8x.pt"
    plant(weights, tmp_path / "pwned")
    with pytest.raises(UntrustedWeightsError, match="label.det.trust_pickle") as refused:
        DetLabeler(DetConfig(model=str(weights)), view_size=64).setup()
    assert str(weights) in str(refused.value) and "safetensors" in str(refused.value)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("where", ["root", "scratch", "link into the root"])
def test_a_trusted_pickle_that_others_could_write_is_still_refused(tmp_path, monkeypatch, where):
    """The dataset root and scratch space are written by jobs and, on shared machines, other users."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    root = tmp_path / "root"
    weights = {
        "root": root / "models/yolov8x.pt",
        "scratch": storage.scratch_base() / "models/yolov8x.pt",
        "link into the root": root / "yolov8x.pt",
    }[where]
    plant(weights, tmp_path / "pwned")
    if where == "link into the root":
        link = tmp_path / "models/yolov8x.pt"
        link.parent.mkdir()
        link.symlink_to(weights)
        weights = link
    cfg = DetConfig(model=str(weights), trust_pickle=True)
    with pytest.raises(UntrustedWeightsError, match="inside"):
        DetLabeler(cfg, view_size=64, root=root).setup()
    assert not (tmp_path / "pwned").exists()


def test_missing_weights_name_the_path(tmp_path):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(MissingWeightsError, match="nope.pt"):
        DetLabeler(DetConfig(model=missing), view_size=64).setup()


def test_only_architectures_shipped_with_ultralytics_are_built(tmp_path, monkeypatch):
    """Building a model YAML evaluates its ``activation``: a same-named YAML in the working folder,
    or one that a planted ``config.json`` names, is never built."""
    import ultralytics

    shipped = (Path(ultralytics.__file__).parent / "cfg/models/v8/yolov8.yaml").read_text()
    planted = shipped + f"activation: __import__('pathlib').Path({str(tmp_path / 'pwned')!r}).touch() or nn.SiLU()\n"
    for name in ("yolov8.yaml", "yolov8n.yaml", "evil.yaml"):
        (tmp_path / name).write_text(planted)
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "det"
    DetLabeler(DetConfig(input_size=SIZE), view_size=64, workdir=folder).setup()
    for architecture in ("evil.yaml", str(tmp_path / "yolov8.yaml")):
        (folder / CONFIG_FILE).write_text(json.dumps({"architecture": architecture, "names": list(COCO_THINGS)}))
        with pytest.raises(MissingWeightsError, match="not a model architecture shipped with ultralytics"):
            DetLabeler(DetConfig(model=str(folder)), view_size=64).setup()
    assert not (tmp_path / "pwned").exists()
