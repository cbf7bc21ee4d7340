import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from four_m.core.config import ConfigError
from four_m.core.errors import UserError
from four_m.core.label_codec import decode_rle, encode_rle
from four_m.core.modalities import MODALITIES
from four_m.core.provenance import RANDOM_INIT
from four_m.core.views import label_view
from four_m.labelers.base import LabelBatch
from four_m.labelers.pretrained import MissingWeightsError
from four_m.labelers.sam import SamInstanceLabeler, point_grid
from four_m.modalities.sam_instance import SamInstanceConfig

SIZE = 64
VIEW = 32  # not the input size: masks must come back at the label view's size
OPEN = SamInstanceConfig(input_size=SIZE, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
"""The demo's tiny setting: random weights rate masks at random, so no quality threshold."""


def masks_of(payload: dict) -> list[np.ndarray]:
    return [decode_rle(instance["counts"], (VIEW, VIEW)) for instance in payload["sam_instance"]]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


@pytest.fixture(scope="module")
def pixels(photos) -> np.ndarray:
    """Four real photos as label views at the input size."""
    return np.stack([label_view(path.read_bytes(), SIZE) for path, _ in photos[:4]])


def labeler(folder, cfg: SamInstanceConfig = OPEN, **changes) -> SamInstanceLabeler:
    built = SamInstanceLabeler(dataclasses.replace(cfg, **changes), VIEW, folder)
    built.setup()
    return built


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SamInstanceLabeler:
    return labeler(tmp_path_factory.mktemp("sam") / "tiny")


@pytest.fixture(scope="module")
def folder(tiny):
    """The tiny model's folder, built: other settings label with the same weights."""
    return tiny.workdir


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((5, 7), bool),
        np.ones((5, 7), bool),
        np.pad(np.ones((1, 1), bool), ((2, 2), (3, 3))),  # one pixel in the middle
        np.pad(np.ones((1, 1), bool), ((0, 4), (0, 6))),  # the first pixel only
        np.pad(np.ones((1, 1), bool), ((4, 0), (6, 0))),  # the last pixel only
        *(np.random.default_rng(0).random((4, 9, 13)) < 0.5),
        np.random.default_rng(1).random((32, 32)) < 0.05,
    ],
)
def test_rle_round_trips(mask):
    counts = encode_rle(mask)
    assert counts.dtype == np.int32 and (counts >= 0).all() and counts.sum() == mask.size
    assert (counts[1:] > 0).all(), "only the first run (False) may be empty"
    decoded = decode_rle(counts, mask.shape)
    assert decoded.dtype == bool and np.array_equal(decoded, mask)


def test_rle_is_row_major_and_starts_with_false():
    mask = np.array([[1, 1, 0], [0, 0, 1]], bool)
    assert encode_rle(mask).tolist() == [0, 2, 3, 1]  # column-major (COCO) would be [0, 1, 2, 1, 1, 1]
    assert encode_rle(~mask).tolist() == [2, 3, 1]
    with pytest.raises(ValueError, match="2x3"):
        decode_rle([2, 3], (2, 3))


def test_the_modality_is_stored_not_tokenized():
    spec = MODALITIES["sam_instance"]
    assert spec.layout == "labels" and not spec.tokenized and spec.no_metric
    assert isinstance(spec.labeler_config, SamInstanceConfig) and spec.labeler_config.input_size == 1024
    with pytest.raises(ConfigError, match="points_per_side"):
        SamInstanceConfig(points_per_side=0)
    with pytest.raises(ConfigError, match="mask_nms_thresh"):
        SamInstanceConfig(mask_nms_thresh=0.0)


def test_instances_follow_the_schema_and_the_filters(tiny, pixels):
    out = tiny.label(pixels)
    table = pa.Table.from_pylist(out, schema=tiny.schema())
    assert table.num_rows == len(pixels) and table.column_names == ["sam_instance"]
    assert any(len(payload["sam_instance"]) > 1 for payload in out)
    for payload in out:
        instances, masks = payload["sam_instance"], masks_of(payload)
        assert len(instances) <= OPEN.max_instances
        scores = [instance["score"] for instance in instances]
        assert scores == sorted(scores, reverse=True) and all(s >= OPEN.pred_iou_thresh for s in scores)
        for instance, mask in zip(instances, masks, strict=True):
            assert mask.shape == (VIEW, VIEW) and mask.dtype == bool
            assert instance["area"] == mask.sum() > 0
        pairs = [(a, b) for i, a in enumerate(masks) for b in masks[i + 1 :]]
        assert all(iou(a, b) <= OPEN.mask_nms_thresh for a, b in pairs)
    flat = [tuple(c for m in masks_of(p) for c in encode_rle(m)) for p in out]
    assert len(set(flat)) == len(flat), "masks should depend on the image"


def stored(instance: dict) -> dict:
    """An instance as its file holds it (counts a list): comparable with ``==``."""
    return {**instance, "counts": np.asarray(instance["counts"]).tolist()}


def test_nms_and_the_cap_keep_the_greedy_best(folder, pixels):
    """Without suppression every mask that passes the filters comes back; with it, exactly those a
    greedy pass by score keeps, cut at max_instances."""
    everything = labeler(folder, mask_nms_thresh=1.0, max_instances=16).label(pixels)
    capped = labeler(folder, mask_nms_thresh=0.5, max_instances=3).label(pixels)
    suppressed = 0
    for every, few in zip(everything, capped, strict=True):
        masks, expected = masks_of(every), []
        for index, mask in enumerate(masks):
            if len(expected) < 3 and all(iou(mask, masks[k]) <= 0.5 for k in expected):
                expected.append(index)
        kept = [every["sam_instance"][k] for k in expected]
        assert [stored(i) for i in few["sam_instance"]] == [stored(i) for i in kept]
        suppressed += expected != list(range(len(expected)))
    assert suppressed, "some masks should overlap a better one by more than the threshold"


def test_labels_are_sam_automatic_generation_recomputed(folder, pixels):
    """Recomputed from the raw model outputs with every point in one pass, image by image; the
    labeler's chunks of 5 points must not change them (points_per_batch is runtime only). No NMS
    here: the test above checks it on these very lists."""
    changes = {"stability_score_thresh": 0.6, "min_area": 250, "mask_nms_thresh": 1.0, "max_instances": 16}
    cfg = dataclasses.replace(OPEN, points_per_batch=5, **changes)
    sam = labeler(folder, cfg)
    ours = sam.label(pixels)
    grid = point_grid(4, SIZE)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    images = (images - torch.tensor(sam.mean).view(1, 3, 1, 1)) / torch.tensor(sam.std).view(1, 3, 1, 1)
    checked = 0
    for image, payload in zip(images, ours, strict=True):
        with torch.inference_mode():
            out = sam.model(pixel_values=image[None], input_points=grid[None, :, None], multimask_output=True)
        reference = []
        for ious, logits in zip(out.iou_scores[0], out.pred_masks[0], strict=True):  # per point: (3,), (3, h, w)
            best = int(ious.argmax())
            stability = (logits[best] > 1).sum() / max(int((logits[best] > -1).sum()), 1)  # at the decoder's size
            up = F.interpolate(logits[best][None, None], size=(VIEW, VIEW), mode="bilinear", align_corners=False)[0, 0]
            mask = (up > 0).numpy()
            if ious[best] >= cfg.pred_iou_thresh and stability >= cfg.stability_score_thresh and mask.sum() >= 250:
                reference.append((float(ious[best]), mask))
        reference.sort(key=lambda found: -found[0])
        scores = [instance["score"] for instance in payload["sam_instance"]]
        assert scores == pytest.approx([score for score, _ in reference], abs=1e-4)
        for mask, (_, expected) in zip(masks_of(payload), reference, strict=True):
            assert (mask == expected).mean() > 0.99  # summation order may flip a pixel at logit 0
        checked += len(reference)
    assert 0 < checked < len(pixels) * len(grid), "the filters should keep some masks and drop others"


def test_tiny_is_flagged_and_rebuilds_to_the_same_labels(tiny, folder, pixels, tmp_path):
    assert tiny.random_init and tiny.provenance()["model"] == RANDOM_INIT
    assert tiny.provenance()["mask_size"] == f"{VIEW}x{VIEW}" and tiny.provenance()["point_grid"] == "4x4"

    def labels(sam) -> list[list[dict]]:
        return [[stored(i) for i in payload["sam_instance"]] for payload in sam.label(pixels)]

    first = labels(tiny)
    assert labels(labeler(tmp_path / "again")) == first
    loaded = labeler(None, model=str(folder))  # the tiny folder through the production path
    assert not loaded.random_init and loaded.provenance()["model"] == str(folder)
    assert labels(loaded) == first


def test_bf16_autocast_keeps_the_counts_exact(folder, pixels):
    """The decoder may run in bf16; thresholds, resizing and pixel counts do not."""
    sam = labeler(folder, precision="bf16")
    out = sam.labelled(LabelBatch(pixels))
    assert pa.Table.from_pylist(out, schema=sam.schema()).num_rows == len(pixels)
    assert any(payload["sam_instance"] for payload in out)
    for payload in out:
        for instance, mask in zip(payload["sam_instance"], masks_of(payload), strict=True):
            assert instance["area"] == mask.sum() > 0 and isinstance(instance["score"], float)


def test_nothing_confident_gives_empty_lists(folder, pixels):
    quiet = labeler(folder, pred_iou_thresh=1.0, stability_score_thresh=1.0, min_area=VIEW * VIEW)
    out = quiet.label(pixels)
    assert pa.Table.from_pylist(out, schema=quiet.schema()).num_rows == len(pixels)
    assert all(payload == {"sam_instance": []} for payload in out)


def test_a_checkpoint_of_another_input_size_is_refused(folder):
    with pytest.raises(UserError, match=f"input_size: {SIZE}"):
        labeler(None, model=str(folder), input_size=SIZE * 2)


def test_missing_weights_name_the_path(tmp_path):
    with pytest.raises(MissingWeightsError, match="no-such-sam"):
        labeler(None, model=str(tmp_path / "no-such-sam"))


def test_the_dry_run_scale_keeps_the_model_and_cuts_only_the_prompt_grid():
    production = SamInstanceConfig()
    dry = production.at_dry_run_scale()
    assert dry.points_per_side < production.points_per_side
    assert dry.points_per_batch == dry.points_per_side**2  # the whole small grid in one decoder pass
    unchanged = {"points_per_side", "points_per_batch"}
    for field in dataclasses.fields(SamInstanceConfig):
        if field.name not in unchanged:
            assert getattr(dry, field.name) == getattr(production, field.name), field.name


def test_cost_parts_add_up_to_the_labelling_and_scale_the_decoder_to_production_grid(folder, pixels):
    """Measured at this grid, the parts' FLOPs are the whole labelling's but the mask NMS (a product
    of the surviving masks, left out); production's 32 x 32 grid repeats the decoder pass (16
    prompts) 64 times and makes each of its passes 4x larger."""
    from torch.utils.flop_counter import FlopCounterMode

    small = labeler(folder, points_per_batch=16)
    batch = LabelBatch(pixels[:1])

    def flops(run) -> int:
        with FlopCounterMode(display=False) as counter:
            run()
        return counter.get_total_flops()

    parts = small.cost_parts(batch, small.cfg)
    assert [(p.flops_times, p.memory_times) for p in parts] == [(1.0, 1.0), (1.0, 1.0)]
    whole = flops(lambda: small.labelled(batch))
    assert 0.9 * whole <= sum(flops(p.run) for p in parts) <= whole
    production = dataclasses.replace(OPEN, points_per_side=32, points_per_batch=64)
    encoder, decoder = small.cost_parts(batch, production)
    assert (encoder.flops_times, decoder.flops_times, decoder.memory_times) == (1.0, 64.0, 4.0)
