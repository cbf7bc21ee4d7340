"""4M-21's algorithmic labelers: Canny edges, colour palettes, metadata and SAM edges. Their labels
are real, so each is checked against an image whose answer is known, and on real sample photos."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from four_m.core.coco import COCO_PANOPTIC, COCO_THINGS
from four_m.core.config import LabelerConfig
from four_m.core.label_codec import decode_png, encode_png, encode_rle
from four_m.core.views import centre_square, resize_square
from four_m.labelers.base import LabelBatch
from four_m.labelers.canny import CannyLabeler
from four_m.labelers.metadata import MetadataLabeler
from four_m.labelers.palette import PaletteLabeler
from four_m.labelers.sam_edge import SamEdgeLabeler, instance_boundaries
from four_m.modalities.canny_edge import CannyConfig
from four_m.modalities.color_palette import PaletteConfig
from four_m.modalities.metadata import KEYS, MetadataConfig

SIZE = 224


def photos() -> np.ndarray:
    """(3, 224, 224, 3): scikit-image's astronaut, cat and coffee, centre squares shrunk to 224."""
    return np.stack(
        [resize_square(centre_square(image), SIZE) for image in (data.astronaut(), data.chelsea(), data.coffee())]
    )


def square_image() -> np.ndarray:
    image = np.full((SIZE, SIZE, 3), 30, np.uint8)
    image[60:160, 60:160] = 220
    return image


def edges_of(payload: dict, column: str) -> np.ndarray:
    codes = decode_png(payload[column])
    assert codes.dtype == np.uint8 and codes.shape == (SIZE, SIZE)
    assert set(np.unique(codes)) <= {0, 255}
    return codes > 0


def test_canny_finds_the_border_of_a_square_and_nothing_else():
    labeler = CannyLabeler(CannyConfig(), SIZE)
    edges = edges_of(labeler.label(square_image()[None])[0], "canny_edge")
    rows, columns = np.nonzero(edges)
    near_border = np.minimum(
        np.abs(rows[:, None] - [59, 60, 159, 160]).min(1), np.abs(columns[:, None] - [59, 60, 159, 160]).min(1)
    )
    assert edges.any() and near_border.max() <= 2, "an edge away from the square's border"
    assert edges[100, 57:63].any() and edges[57:63, 100].any() and edges[100, 157:163].any()
    flat = edges_of(labeler.label(np.full((1, SIZE, SIZE, 3), 128, np.uint8))[0], "canny_edge")
    assert not flat.any()


def test_canny_on_photos_gives_thin_binary_maps_at_the_view_size():
    labeler = CannyLabeler(CannyConfig(input_size=SIZE), SIZE)
    for payload in labeler.label(photos()):
        share = edges_of(payload, "canny_edge").mean()
        assert 0.01 < share < 0.4
    assert labeler.provenance()["method"].startswith("algorithmic (canny_edge")
    assert not labeler.random_init


def test_a_three_colour_image_has_exactly_those_colours_as_its_three_colour_palette():
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    colours = [(255, 0, 0), (0, 128, 255), (20, 200, 30)]
    image[:100], image[100:180], image[180:] = colours
    (payload,) = PaletteLabeler(PaletteConfig(), SIZE).label(image[None])
    palettes = payload["color_palette"]
    assert [len(p) for p in palettes] == [3 * k for k in range(1, 8)]
    three = np.asarray(palettes[2]).reshape(3, 3)
    assert sorted(map(tuple, three)) == sorted(colours)
    assert tuple(three[0]) == colours[0], "the colour of most pixels comes first"


def test_palettes_of_photos_are_deterministic_in_range_and_unchanged_by_a_flip():
    labeler = PaletteLabeler(PaletteConfig(), SIZE)
    pixels = photos()
    first = labeler.label(pixels)
    assert first == labeler.label(pixels)
    assert first == labeler.label(np.ascontiguousarray(pixels[:, :, ::-1]))
    for payload in first:
        for k, palette in enumerate(payload["color_palette"], start=1):
            assert len(palette) == 3 * k and all(0 <= c <= 255 for c in palette)


def metadata_batch(pixels: np.ndarray, **labels) -> LabelBatch:
    return LabelBatch(
        pixels,
        keys=[f"{i:04d}" for i in range(len(pixels))],
        alt_texts=["A red bus. It waits at the stop!"] * len(pixels),
        original_sizes=[(640, 480)] * len(pixels),
        labels=labels,
    )


def test_metadata_of_a_known_image_size_brightness_and_caption():
    grey = np.full((1, SIZE, SIZE, 3), 100, np.uint8)
    (payload,) = MetadataLabeler(MetadataConfig(), SIZE).label_batch(metadata_batch(grey))
    found = payload["metadata"]
    assert list(found) == list(KEYS)
    assert found["original_width"] == 640 and found["original_height"] == 480
    assert found["caption_n_words"] == 8 and found["caption_n_sentences"] == 2
    assert found["caption_n_chars"] == len("A red bus. It waits at the stop!")
    assert found["brightness"] == pytest.approx(100) and found["contrast"] == 0 and found["colorfulness"] == 0
    assert found["saturation"] == 0 and found["entropy"] == 0
    # no det, semseg, normal or sam_instance labels in this run: their keys are left out, not guessed
    absent = ("n_humans", "n_coco_instances", "walkability", "geometric_complexity", "n_sam_instances")
    assert all(found[key] is None for key in absent)
    assert all(found[key] is None for key in ("occlusion_score", "watermark_score", "aesthetic_score"))


def test_metadata_counts_what_the_other_labels_say():
    boxes = [{"x0": 0, "y0": 0, "x1": 1, "y1": 1, "class": c, "score": 0.9} for c in ("person", "person", "dog")]
    semseg = np.full((SIZE, SIZE), 255, np.uint8)
    semseg[:100] = 0  # person: a thing
    semseg[100:150] = len(COCO_THINGS)  # the first stuff class
    semseg[150:] = COCO_PANOPTIC.index("road")
    normals = np.zeros((SIZE, SIZE, 3), np.uint8)
    normals[...] = (128, 128, 255)  # all facing the camera: a plane
    masks = [{"counts": encode_rle(np.eye(SIZE, dtype=bool)), "score": 1.0, "area": SIZE}] * 4
    labels = {
        "det": [{"det": boxes}],
        "semseg": [{"semseg": encode_png(semseg)}],
        "normal": [{"normal": encode_png(normals)}],
        "sam_instance": [{"sam_instance": masks}],
    }
    (payload,) = MetadataLabeler(MetadataConfig(), SIZE).label_batch(metadata_batch(photos()[:1], **labels))
    found = payload["metadata"]
    assert (found["n_humans"], found["n_coco_instances"], found["coco_instance_diversity"]) == (2, 3, 2)
    assert found["n_sam_instances"] == 4
    assert found["semantic_diversity"] == 3
    assert found["objectness"] == pytest.approx(100 / SIZE)
    assert found["walkability"] == pytest.approx((SIZE - 150) / SIZE)
    assert found["geometric_complexity"] == pytest.approx(0, abs=1e-6)
    assert 0 < found["colorfulness"] < 150 and 0 < found["entropy"] <= 8


def test_metadata_of_a_failed_source_row_leaves_its_keys_out():
    (payload,) = MetadataLabeler(MetadataConfig(), SIZE).label_batch(metadata_batch(photos()[:1], det=[None]))
    assert payload["metadata"]["n_coco_instances"] is None and payload["metadata"]["brightness"] is not None


def test_sam_edges_are_the_inner_boundaries_of_the_instances():
    mask = np.zeros((SIZE, SIZE), bool)
    mask[50:100, 60:120] = True
    row = {"sam_instance": [{"counts": encode_rle(mask), "score": 0.9, "area": int(mask.sum())}]}
    labeler = SamEdgeLabeler(LabelerConfig(input_size=SIZE), SIZE)
    (payload,) = labeler.label_batch(LabelBatch(photos()[:1], labels={"sam_instance": [row]}))
    edges = edges_of(payload, "sam_edge")
    expected = mask.copy()
    expected[51:99, 61:119] = False
    assert np.array_equal(edges, expected)
    assert np.array_equal(instance_boundaries([], SIZE), np.zeros((SIZE, SIZE), bool))
    with pytest.raises(TypeError, match="labels from other labels"):
        labeler.label(photos()[:1])


def test_sam_edges_without_the_instances_fail_the_row_clearly():
    labeler = SamEdgeLabeler(LabelerConfig(input_size=SIZE), SIZE)
    with pytest.raises(ValueError, match="no sam_instance label"):
        labeler.label_batch(LabelBatch(photos()[:1], labels={"sam_instance": [None]}))
