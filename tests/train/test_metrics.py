import json
import math

import numpy as np
import pytest

from four_m.core.coco import NO_CLASS
from four_m.train.metrics import (
    BASELINES,
    EOS_ID,
    METRICS,
    BoxesBaseline,
    BoxesMetric,
    ClassMapBaseline,
    ClassMapMetric,
    ContinuousMapMetric,
    DirectionMapBaseline,
    DirectionMapMetric,
    FeatureMapMetric,
    MetricInputError,
    TextBaseline,
    TextMetric,
    results_table,
)

MODALITIES = (
    "depth",
    "normal",
    "semseg",
    "clip",
    "dinov2",
    "caption",
    "det",
    "canny_edge",
    "color_palette",
    "sam_edge",
    "metadata",
    "rgb",
)
MID_GREY = 128 / 127.5 - 1  # how a stored zero normal reads back (tokenize.maps.DirectionMapAdapter.parse)


def unit_normals(rng: np.random.Generator, size: int = 8) -> np.ndarray:
    vectors = rng.normal(size=(3, size, size))
    return vectors / np.linalg.norm(vectors, axis=0)


def box(x0: float, y0: float, x1: float, y1: float, name: str = "cat", score: float | None = None) -> dict:
    return {"x0": x0, "y0": y0, "x1": x1, "y1": y1, "class": name, "score": score}


def label_of(modality: str, rng: np.random.Generator):
    """A valid, random label of ``modality`` in the adapters' value form."""
    return {
        "depth": lambda: rng.random((1, 8, 8)).astype(np.float32),
        "normal": lambda: unit_normals(rng).astype(np.float32),
        "semseg": lambda: rng.integers(0, 6, size=(8, 8)),
        "det": lambda: [box(*(corner := rng.random(2) / 2), *(corner + 0.5), name) for name in ("cat", "dog")],
        "caption": lambda: np.append(rng.integers(200, 300, size=int(rng.integers(1, 6))), EOS_ID),
        "clip": lambda: rng.normal(size=(16, 3, 3)).astype(np.float32),
        "dinov2": lambda: rng.normal(size=(16, 4, 4)).astype(np.float32),
        "canny_edge": lambda: edges_of(rng),
        "sam_edge": lambda: edges_of(rng),
        "color_palette": lambda: [rng.integers(0, 256, 3 * k).tolist() for k in range(1, 8)],
        # counts: their bin is the value itself, so a label is also a perfect prediction of itself
        "metadata": lambda: {"n_humans": float(rng.integers(0, 5)), "caption_n_words": float(rng.integers(1, 30))},
        "rgb": lambda: rng.random((3, 8, 8)).astype(np.float32),
    }[modality]()


def edges_of(rng: np.random.Generator) -> np.ndarray:
    edges = (rng.random((1, 16, 16)) < 0.2).astype(np.float32)
    edges[0, 8, 8] = 1.0  # never empty
    return edges


def one(modality: str, prediction, label) -> dict[str, float]:
    metric = METRICS[modality]()
    metric.update(prediction, label)
    return metric.result()


def test_registries_cover_every_predicted_modality():
    assert set(METRICS) == set(BASELINES) == set(MODALITIES)
    for name in MODALITIES:
        assert METRICS[name].name == BASELINES[name].name == name


PERFECT = {
    "depth": {"abs_rel": 0.0, "delta_1.25": 1.0},
    "normal": {"angular_error_deg": 0.0, "within_11.25deg": 1.0},
    "semseg": {"miou": 1.0, "pixel_accuracy": 1.0},
    "det": {"map_50": 1.0},
    "caption": {"token_accuracy": 1.0},
    "clip": {"cosine": 1.0},
    "dinov2": {"cosine": 1.0},
    "canny_edge": {"edge_f1": 1.0},
    "sam_edge": {"edge_f1": 1.0},
    "color_palette": {"delta_e": 0.0, "well_formed": 1.0},
    "metadata": {"bin_accuracy": 1.0},
    "rgb": {"psnr_db": 100.0, "abs_error": 0.0},
}


@pytest.mark.parametrize("modality", MODALITIES)
def test_a_perfect_prediction_scores_perfectly(modality):
    rng = np.random.default_rng(0)
    metric = METRICS[modality]()
    for _ in range(3):
        label = label_of(modality, rng)
        metric.update(label, label)
    result = metric.result()
    assert result == pytest.approx({**PERFECT[modality], "samples": 3}, abs=1e-6)


def test_depth_by_hand_on_values_shifted_by_one():
    label = np.array([[[0.5, 0.5, 0.0, 0.0]]])
    prediction = np.array([[[1.0, 1.0, 0.2, -1.5]]])
    # 1 + values: 1.5 -> 2 (|0.5| / 1.5, ratio 1.33), 1 -> 1.2 (0.2, ratio 1.2), 1 -> -0.5 (1.5, never within)
    result = one("depth", prediction, label)
    assert result["abs_rel"] == pytest.approx((1 / 3 + 1 / 3 + 0.2 + 1.5) / 4)
    assert result["delta_1.25"] == pytest.approx(1 / 4)


def test_normal_by_hand():
    x, y = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    label = np.stack([x, x, x, [MID_GREY] * 3], axis=1)[:, None, :]  # (3, 1, 4); the last has no direction
    diagonal = (x + y) * 3  # 45 degrees from x, and not unit length: only directions count
    prediction = np.stack([y, diagonal, 2 * x, -x], axis=1)[:, None, :]
    result = one("normal", prediction, label)
    assert result["angular_error_deg"] == pytest.approx((90 + 45 + 0) / 3)
    assert result["within_11.25deg"] == pytest.approx(1 / 3)


def test_semseg_by_hand():
    label = np.array([[0, 0, 0, 0], [1, 1, NO_CLASS, NO_CLASS]])
    prediction = np.array([[0, 0, 0, 1], [1, 3, 4, 4]])  # class 4 only where nothing is labelled
    metric = ClassMapMetric(classes=5)
    metric.update(prediction, label)
    result = metric.result()
    # class 0: 3 hits / (4 labelled + 3 predicted - 3); class 1: 1 / (2 + 2 - 1); class 3: predicted, never
    # labelled: 0 / 1. Class 2 is in neither and class 4 only on ignored pixels: both left out.
    assert result["miou"] == pytest.approx((3 / 4 + 1 / 3 + 0) / 3)
    assert result["pixel_accuracy"] == pytest.approx(4 / 6)


def test_det_false_positive_ranked_first_halves_the_precision():
    label = [box(0, 0, 0.4, 0.4)]
    prediction = [box(0.5, 0.5, 0.9, 0.9, score=0.9), box(0.02, 0, 0.4, 0.4, score=0.8)]
    # rank 1: a miss (precision 0, recall 0); rank 2: the hit (precision 1/2, recall 1) -> AP 1/2
    assert one("det", prediction, label)["map_50"] == pytest.approx(0.5)
    swapped = [{**prediction[0], "score": 0.8}, {**prediction[1], "score": 0.9}]
    assert one("det", swapped, label)["map_50"] == pytest.approx(1.0)


def test_det_interpolated_precision_over_two_images_and_classes():
    metric = BoxesMetric()
    cat_a, cat_b, dog = box(0, 0, 0.5, 0.5), box(0.5, 0.5, 1, 1), box(0, 0.5, 0.5, 1, "dog")
    metric.update([box(0, 0, 0.5, 0.5, score=0.9), box(0, 0, 0.5, 0.5, score=0.8)], [cat_a])  # hit, duplicate
    metric.update([box(0.5, 0.5, 1, 1, score=0.7), box(0, 0.5, 0.5, 1, "cat", 0.95)], [cat_b, dog])
    # cats ranked: 0.95 miss (dog's place), 0.9 hit, 0.8 duplicate miss, 0.7 hit; 2 cat boxes.
    # recall 1/2 first reached at precision 1/2, recall 1 at 2/4 -> AP 1/2. Dogs: one box, no prediction -> 0.
    assert metric.result() == pytest.approx({"map_50": (0.5 + 0.0) / 2, "samples": 2})


def test_det_counts_only_classes_with_label_boxes_and_is_nan_without_any():
    label = [box(0, 0, 0.4, 0.4)]
    extra = box(0.5, 0.5, 0.9, 0.9, "dog", score=1.0)
    assert one("det", [box(0, 0, 0.4, 0.4), extra], label)["map_50"] == pytest.approx(1.0)
    assert math.isnan(one("det", [extra], [])["map_50"])


def test_det_unscored_predictions_keep_their_order_and_wrong_classes_miss():
    label = [box(0, 0, 0.4, 0.4)]
    assert one("det", [box(0.5, 0.5, 1, 1), box(0, 0, 0.4, 0.4)], label)["map_50"] == pytest.approx(0.5)
    assert one("det", [box(0, 0, 0.4, 0.4, "dog")], label)["map_50"] == 0.0


def test_caption_by_hand():
    label = np.array([10, 11, 12, EOS_ID])
    assert one("caption", np.array([10, 99, 12, 98]), label)["token_accuracy"] == 0.5
    assert one("caption", np.array([10]), label)["token_accuracy"] == 0.25  # missing tokens are wrong
    # after the prediction's [EOS] nothing counts, even where it would match
    assert one("caption", np.array([10, EOS_ID, 12, EOS_ID]), label)["token_accuracy"] == 0.25


def test_clip_by_hand():
    label = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])[:, None, :]  # (2, 1, 3)
    prediction = np.array([[3.0, 0.0, -1.0], [0.0, 2.0, 0.0]])[:, None, :]
    assert one("clip", prediction, label)["cosine"] == pytest.approx((1 + 0 - 1) / 3)


@pytest.mark.parametrize("modality", ["depth", "normal", "semseg", "clip"])
def test_map_metrics_pool_samples_like_one_concatenated_sample(modality):
    rng = np.random.default_rng(1)
    pairs = [(label_of(modality, rng), label_of(modality, rng)) for _ in range(3)]
    if modality == "normal":  # pixels without direction in some labels: counts differ per sample
        pairs[0][1][:, :3] = MID_GREY
    separate, together = METRICS[modality](), METRICS[modality]()
    for prediction, label in pairs:
        separate.update(prediction, label)
    together.update(*(np.concatenate(side, axis=-1) for side in zip(*pairs, strict=True)))
    figures = {k: v for k, v in separate.result().items() if k != "samples"}
    assert figures == pytest.approx({k: v for k, v in together.result().items() if k != "samples"})
    assert separate.result()["samples"] == 3


def test_caption_pools_tokens_over_samples():
    metric = TextMetric()
    metric.update(np.array([10, 99, 12, 98]), np.array([10, 11, 12, EOS_ID]))  # 2 of 4
    metric.update(np.array([20, EOS_ID]), np.array([20, EOS_ID]))  # 2 of 2
    assert metric.result() == {"token_accuracy": 4 / 6, "samples": 2}


def test_empty_metrics_are_nan():
    for modality in MODALITIES:
        result = METRICS[modality]().result()
        assert result["samples"] == 0
        assert all(math.isnan(v) for k, v in result.items() if k != "samples")


@pytest.mark.parametrize(
    ("metric", "prediction", "label", "message"),
    [
        (ContinuousMapMetric(), np.zeros((1, 4, 4)), np.zeros((1, 4, 5)), "differs from label shape"),
        (ContinuousMapMetric(), np.full((1, 2, 2), np.nan), np.zeros((1, 2, 2)), "non-finite"),
        (DirectionMapMetric(), np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), r"expected a \(3, H, W\) prediction"),
        (ClassMapMetric(classes=5), np.full((2, 2), 5), np.zeros((2, 2), int), r"prediction class ids \[5\]"),
        (ClassMapMetric(classes=5), np.zeros((2, 2)), np.zeros((2, 2), int), "integer prediction"),
        (BoxesMetric(), [{"x0": 0, "class": "cat"}], [], "'y0' must be a finite number"),
        (BoxesMetric(), {"x0": 0}, [], "list of box dicts"),
        (TextMetric(), np.array([[1, 2]]), np.array([1]), "1-D integer token ids"),
        (FeatureMapMetric(), np.zeros((4, 2)), np.zeros((4, 2)), r"\(C, H, W\)"),
    ],
)
def test_bad_input_is_a_one_line_error_naming_the_modality(metric, prediction, label, message):
    with pytest.raises(MetricInputError, match=f"^{metric.name}: .*{message}"):
        metric.update(prediction, label)


def test_palettes_are_compared_with_the_label_palette_of_their_length_whatever_the_order():
    label = [[255, 0, 0]] + [[0, 0, 255, 255, 0, 0]] + [[10 * k] * (3 * k) for k in range(3, 8)]
    assert one("color_palette", [[255, 0, 0, 0, 0, 255]], label) == {"delta_e": 0.0, "well_formed": 1.0, "samples": 1}
    near = one("color_palette", [[250, 0, 0]], label)["delta_e"]
    far = one("color_palette", [[0, 255, 0]], label)["delta_e"]
    assert 0 < near < 5 < far
    assert one("color_palette", [], label)["well_formed"] == 0.0


def test_metadata_bin_accuracy_counts_the_label_keys_a_prediction_gets_right():
    label = {"original_width": 640.0, "brightness": 255.0, "n_humans": 2.0, "watermark_score": None}
    # bins: width 20, brightness 49, humans 2; one right, one wrong, one missing; extra keys do not count
    prediction = {"original_width": 20, "brightness": 48, "entropy": 3}
    assert one("metadata", prediction, label) == {"bin_accuracy": 1 / 3, "samples": 1}


def test_edge_baseline_puts_the_mean_edge_count_where_edges_are_most_frequent():
    labels = [np.zeros((1, 4, 4), np.float32) for _ in range(3)]
    for label in labels:
        label[0, 1, :2] = 1.0  # two edge pixels in every label, at the same place
    labels[0][0, 3, 3] = 1.0  # and one more in one label: the mean count rounds to 2
    baseline = BASELINES["canny_edge"]()
    baseline.fit(labels)
    expected = np.zeros((1, 4, 4), np.float32)
    expected[0, 1, :2] = 1.0
    assert np.array_equal(baseline.predict(), expected)


# --- baselines ---


@pytest.mark.parametrize("modality", ["depth", "clip"])
def test_mean_baselines_predict_the_per_pixel_mean(modality):
    rng = np.random.default_rng(2)
    labels = [label_of(modality, rng) for _ in range(4)]
    baseline = BASELINES[modality]()
    baseline.fit(iter(labels))  # one pass over an iterator is enough
    np.testing.assert_allclose(baseline.predict(), np.mean(labels, axis=0), rtol=1e-6, atol=1e-6)


def test_normal_baseline_is_the_mean_direction_of_labels_with_one():
    x, y = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    first = np.stack([x, x], axis=1)[:, None, :]
    second = np.stack([y, [MID_GREY] * 3], axis=1)[:, None, :]  # the second pixel has no direction here
    baseline = DirectionMapBaseline()
    baseline.fit([first, second])
    expected = np.stack([(x + y) / math.sqrt(2), x], axis=1)[:, None, :]
    np.testing.assert_allclose(baseline.predict(), expected, atol=1e-6)


def test_semseg_baseline_predicts_the_per_pixel_mode():
    ignore = NO_CLASS
    labels = [np.array([[1, 2, ignore]]), np.array([[1, 3, ignore]]), np.array([[0, 3, ignore]])]
    baseline = ClassMapBaseline(classes=5)
    baseline.fit(labels)
    # the never-labelled pixel gets the overall most frequent class (3, seen twice; 1 too: the smaller wins)
    np.testing.assert_array_equal(baseline.predict(), [[1, 3, 1]])


def test_det_baseline_predicts_the_most_frequent_class_at_its_mean_box():
    baseline = BoxesBaseline()
    baseline.fit([[box(0, 0, 0.2, 0.4, "dog"), box(0.5, 0.5, 1, 1)], [box(0.1, 0.2, 0.4, 0.6, "dog")], []])
    (predicted,) = baseline.predict()
    assert predicted == pytest.approx({"x0": 0.05, "y0": 0.1, "x1": 0.3, "y1": 0.5, "class": "dog", "score": 1.0})
    baseline.fit([[], []])
    assert baseline.predict() == []


def test_caption_baseline_predicts_the_per_position_mode_to_its_eos():
    baseline = TextBaseline()
    baseline.fit([np.array([5, EOS_ID]), np.array([5, 6, 8, EOS_ID]), np.array([5, 6, 7, EOS_ID, 9])])
    np.testing.assert_array_equal(baseline.predict(), [5, 6, 7, EOS_ID])  # 6 outvotes [EOS]; 7 ties 8
    baseline.fit([np.array([5, EOS_ID])] * 3 + [np.array([5, 6, 7, 8, EOS_ID])])
    np.testing.assert_array_equal(baseline.predict(), [5, EOS_ID])


@pytest.mark.parametrize("modality", MODALITIES)
def test_baseline_predictions_are_scored_by_the_metric_and_refits_start_over(modality):
    rng = np.random.default_rng(3)
    baseline = BASELINES[modality]()
    with pytest.raises(MetricInputError, match=f"^{modality}: the baseline has seen no labels"):
        baseline.predict()
    baseline.fit([label_of(modality, rng) for _ in range(5)])
    metric = METRICS[modality]()
    for _ in range(3):
        metric.update(baseline.predict(), label_of(modality, rng))
    assert all(math.isfinite(v) for v in metric.result().values())
    baseline.fit([])
    with pytest.raises(MetricInputError, match="seen no labels"):
        baseline.predict()


# --- agreement with the tokenizers' reconstruction metrics (the "tokenizer ceiling") ---


@pytest.mark.parametrize("modality", ["depth", "normal", "semseg", "clip"])
def test_metrics_agree_with_the_tokenizer_adapters(modality):
    from four_m.tokenize.maps import ADAPTERS

    rng = np.random.default_rng(4)
    labels = np.stack([label_of(modality, rng) for _ in range(3)])
    # semseg: predictions within the labelled classes, where the adapter's mean (over labelled
    # classes) and ours (over labelled or predicted ones) are the same
    predictions = (
        labels[:, :, ::-1].copy() if modality == "semseg" else np.stack([label_of(modality, rng) for _ in range(3)])
    )
    adapter = ADAPTERS[modality]
    metric = METRICS[modality]()
    for prediction, label in zip(predictions, labels, strict=True):
        metric.update(prediction, label)
    ours = metric.result()[adapter.metric_name]
    assert ours == pytest.approx(adapter.metric(adapter.metric_sums(predictions, labels)))


# --- the table ---


def test_results_table_shows_every_column_and_metric():
    columns = {
        "baseline": {"depth": {"abs_rel": 0.25, "delta_1.25": 0.5, "samples": 4}, "det": {"map_50": math.nan}},
        "model": {"depth": {"abs_rel": 0.125, "delta_1.25": 0.75, "samples": 4}},
        "tokenizer ceiling": {"caption": {"token_accuracy": 1.0, "samples": 2}},
    }
    table, data = results_table(columns)
    lines = table.splitlines()
    assert lines[0] == "| modality | metric | baseline | model | tokenizer ceiling |"
    assert "| depth | abs_rel | 0.25 | 0.125 | - |" in lines
    assert "| depth | samples | 4 | 4 | - |" in lines
    assert "| det | map_50 | n/a | - | - |" in lines
    assert "| caption | token_accuracy | - | - | 1 |" in lines
    assert len(lines) == 2 + 6
    json.dumps(data, allow_nan=False)  # NaN became None
    assert data["columns"] == ["baseline", "model", "tokenizer ceiling"]
    assert data["results"]["depth"]["delta_1.25"] == {"baseline": 0.5, "model": 0.75}
    assert data["results"]["det"]["map_50"] == {"baseline": None}
