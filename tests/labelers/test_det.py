import pyarrow as pa
import pytest
import torch

from four_m.core.config import DetConfig
from four_m.labelers.base import RANDOM_INIT, MissingWeightsError
from four_m.labelers.coco import COCO_THINGS
from four_m.labelers.det import TINY_WEIGHTS, DetLabeler

SIZE = 160


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("det")
    labeler = DetLabeler(DetConfig(input_size=SIZE, score_threshold=0.0, max_boxes=5), view_size=64, tiny_dir=folder)
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
    strict = DetLabeler(DetConfig(input_size=SIZE, score_threshold=1.0), view_size=64, tiny_dir=folder)
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


def test_saved_weights_load_through_the_production_path(tiny, batch):
    labeler, folder = tiny
    loaded = DetLabeler(
        DetConfig(model=str(folder / TINY_WEIGHTS), input_size=SIZE, score_threshold=0.0, max_boxes=5), view_size=64
    )
    loaded.setup()
    assert loaded.label(batch(SIZE)) == labeler.label(batch(SIZE))
    assert labeler.provenance()["model"] == RANDOM_INIT
    assert loaded.provenance()["model"] == str(folder / TINY_WEIGHTS)


def test_missing_weights_name_the_path(tmp_path):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(MissingWeightsError, match="nope.pt"):
        DetLabeler(DetConfig(model=missing), view_size=64).setup()
