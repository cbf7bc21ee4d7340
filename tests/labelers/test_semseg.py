import json

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from four_m.core.coco import COCO_PANOPTIC, NO_CLASS
from four_m.core.config import LabelerConfig
from four_m.core.label_codec import decode_png
from four_m.core.provenance import RANDOM_INIT
from four_m.labelers.pretrained import MissingWeightsError
from four_m.labelers.semseg import SemsegLabeler

SIZE = 64
VIEW = 48  # not the input size: maps must come back at the label view's size


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("semseg")
    labeler = SemsegLabeler(LabelerConfig(input_size=SIZE), view_size=VIEW, workdir=folder)
    labeler.setup()
    return labeler, folder


def test_maps_follow_the_schema_and_ranges(tiny, batch):
    labeler, _ = tiny
    out = labeler.label(batch(SIZE))
    table = pa.Table.from_pylist(out, schema=labeler.schema())
    assert table.num_rows == 4 and table.column_names == ["semseg"]
    maps = [decode_png(row["semseg"]) for row in out]
    for classes in maps:
        assert classes.dtype == np.uint8 and classes.shape == (VIEW, VIEW)
        assert np.all((classes < len(COCO_PANOPTIC)) | (classes == NO_CLASS))
    assert not all(np.array_equal(maps[0], other) for other in maps[1:]), "maps should depend on the image"


def test_maps_are_the_argmax_of_mask2former_semantic_inference(tiny, batch):
    """Recomputed image by image from the raw outputs, as the reference implementation does it."""
    labeler, _ = tiny
    pixels = batch(SIZE)
    ours = np.stack([decode_png(row["semseg"]) for row in labeler.label(pixels)])
    with torch.inference_mode():
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(labeler.mean).view(1, 3, 1, 1)
        std = torch.tensor(labeler.std).view(1, 3, 1, 1)
        outputs = labeler.model(pixel_values=(images - mean) / std)
        reference = []
        for class_logits, mask_logits in zip(outputs.class_queries_logits, outputs.masks_queries_logits, strict=True):
            probs = class_logits.softmax(-1)[:, :-1]  # (Q, C): the last class is "no object"
            masks = F.interpolate(mask_logits[None], size=(VIEW, VIEW), mode="bilinear", align_corners=False)
            scores = probs.T @ masks[0].sigmoid().flatten(1)  # (C, V*V)
            reference.append(scores.argmax(0).view(VIEW, VIEW).numpy())
    assert len(np.unique(ours)) > 1
    assert (ours == np.stack(reference)).mean() > 0.999  # float summation order may flip exact ties


def test_class_table_travels_with_the_checkpoint(tiny):
    labeler, folder = tiny
    classes = json.loads(labeler.provenance()["classes"])
    assert len(classes) == 133 and classes[0] == "person" and classes == list(COCO_PANOPTIC)
    # The driver writes file metadata after prepare() only: the names come from the saved config.
    unloaded = SemsegLabeler(LabelerConfig(model=str(folder), input_size=SIZE), view_size=VIEW)
    assert json.loads(unloaded.provenance()["classes"]) == classes


def test_saved_weights_load_through_the_production_path(tiny, batch):
    labeler, folder = tiny
    loaded = SemsegLabeler(LabelerConfig(model=str(folder), input_size=SIZE), view_size=VIEW)
    loaded.setup()
    assert loaded.label(batch(SIZE)) == labeler.label(batch(SIZE))
    assert labeler.provenance()["model"] == RANDOM_INIT
    assert loaded.provenance()["model"] == str(folder)
    assert loaded.provenance()["revision"] != RANDOM_INIT


def test_missing_weights_name_the_path(tmp_path):
    missing = str(tmp_path / "no-such-mask2former")
    with pytest.raises(MissingWeightsError, match="no-such-mask2former"):
        SemsegLabeler(LabelerConfig(model=missing), view_size=VIEW).setup()
