import json
import re
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from four_m.core.errors import UserError
from four_m.core.label_codec import encode_png
from four_m.core.modalities import MODALITIES, map_modalities, of_kind
from four_m.core.views import centre_square, resize_square
from four_m.tokenize.base import TokenizerInputError
from four_m.tokenize.maps import ADAPTERS, configured

SIZE = 16
CLASSES = 5
GRID, DIM = 4, 8
FEATURE_MAPS = of_kind("feature_map")
EDGE_MAPS = of_kind("edge_map")


def adapter_params(classes: int, dim: int) -> dict[str, dict]:
    """Per map modality, the settings its test adapter is built with: a class map's class count, a
    feature map's width; nothing for the others."""
    settings = {"class_map": {"classes": classes}, "feature_map": {"dim": dim}}
    return {m: settings.get(MODALITIES[m].kind, {}) for m in map_modalities()}


PARAMS = adapter_params(CLASSES, DIM)
SIDES = {**dict.fromkeys(PARAMS, SIZE), **dict.fromkeys(FEATURE_MAPS, GRID)}
UPSTREAM = "labeler failed: out of memory"


def adapter(modality: str):
    return configured(modality, SIDES[modality], PARAMS[modality])


def through_parquet(table: pa.Table, tmp_path) -> pa.Table:
    """The table as a label file stores and returns it."""
    pq.write_table(table, tmp_path / "labels.parquet")
    return pq.read_table(tmp_path / "labels.parquet")


def label_table(column: str, payloads: list, fields: list[pa.Field], metadata=None, **extra) -> pa.Table:
    """A label file: key, the payload (null where the labeler failed), extra columns, error."""
    schema = pa.schema([pa.field("key", pa.string()), *fields, pa.field("error", pa.string())], metadata=metadata)
    errors = [None if p is not None else UPSTREAM for p in payloads]
    columns = {"key": [f"{i:04d}" for i in range(len(payloads))], column: payloads, **extra, "error": errors}
    return pa.table(columns, schema=schema)


def stored_depth(rng):
    codes = rng.integers(0, 65536, (SIZE, SIZE), dtype=np.uint16)
    table = label_table(
        "depth",
        [encode_png(codes), None],
        [pa.field("depth", pa.binary()), pa.field("depth_min", pa.float32()), pa.field("depth_max", pa.float32())],
        depth_min=[0.5, None],
        depth_max=[2.5, None],
    )
    return table, (codes / 65535)[None]


def stored_normal(rng):
    colours = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    table = label_table("normal", [encode_png(colours), None], [pa.field("normal", pa.binary())])
    return table, colours.transpose(2, 0, 1) / 255 * 2 - 1


def stored_semseg(rng):
    ids = rng.integers(0, CLASSES, (SIZE, SIZE), dtype=np.uint8)
    ids[0, :4] = 255
    metadata = {"four_m.classes": json.dumps([f"class {i}" for i in range(CLASSES)])}
    table = label_table("semseg", [encode_png(ids), None], [pa.field("semseg", pa.binary())], metadata)
    return table, ids.astype(np.int64)


def stored_features(modality, rng, shape_key="four_m.feature_shape"):
    features = rng.normal(size=(GRID, GRID, DIM)).astype(np.float16)  # stored (G, G, D)
    field = pa.field(modality, pa.list_(pa.float16(), GRID * GRID * DIM))
    metadata = {shape_key: f"{GRID}x{GRID}x{DIM}"}
    table = label_table(modality, [features.ravel(), None], [field], metadata)
    return table, features.transpose(2, 0, 1)


stored_clip = partial(stored_features, "clip")


def stored_edges(modality, rng):
    edges = rng.random((SIZE, SIZE)) < 0.2
    table = label_table(modality, [encode_png(edges.astype(np.uint8) * 255), None], [pa.field(modality, pa.binary())])
    return table, edges.astype(np.float32)[None]


def stored_rgb(rng):
    """An images/ shard: a 20 x 28 image (cut to its centred square), then a failed download."""
    image = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
    table = pa.table(
        {
            "key": ["0000", "0001"],
            "jpg": [encode_png(image), None],  # PNG: lossless, so the value is known exactly
            "status": ["success", "failed_to_download"],
            "error_message": [None, "HTTP Error 404: Not Found"],
        }
    )
    return table, resize_square(centre_square(image), SIZE).transpose(2, 0, 1) / 255


STORED = {
    "rgb": stored_rgb,
    "depth": stored_depth,
    "normal": stored_normal,
    "semseg": stored_semseg,
    **{modality: partial(stored_features, modality) for modality in FEATURE_MAPS},
    **{modality: partial(stored_edges, modality) for modality in EDGE_MAPS},
}


def test_there_is_one_adapter_per_map_modality_in_a_read_only_registry():
    assert tuple(ADAPTERS) == map_modalities()
    assert all(a.modality == m for m, a in ADAPTERS.items())
    with pytest.raises(TypeError):
        ADAPTERS["rgb"] = ADAPTERS["depth"]  # type: ignore[index]
    assert adapter("semseg").classes == CLASSES and ADAPTERS["semseg"].classes == 133


@pytest.mark.parametrize("modality", map_modalities())
def test_reading_gives_values_and_keeps_failed_rows_in_place(modality, tmp_path):
    table, expected = STORED[modality](np.random.default_rng(0))
    values, errors = adapter(modality).read(through_parquet(table, tmp_path))
    assert len(values) == len(errors) == 2
    assert errors[0] is None and values[1] is None
    adapter(modality).check(values[0])  # dtype, shape and range of a value
    np.testing.assert_allclose(values[0], expected, rtol=0, atol=1e-6)
    expected_error = "no image: download failed (http_404)" if modality == "rgb" else UPSTREAM
    assert errors[1] == expected_error


@pytest.mark.parametrize("modality", ["depth", "normal", "semseg"])
def test_undecodable_payloads_and_wrong_png_formats_read_as_errors(modality, tmp_path):
    table, _ = STORED[modality](np.random.default_rng(0))
    wrong_format = encode_png(np.zeros((SIZE, SIZE, 3) if modality != "normal" else (SIZE, SIZE), np.uint8))
    table = table.set_column(1, modality, pa.array([b"not a png", wrong_format]))
    table = table.set_column(table.num_columns - 1, "error", pa.nulls(2, pa.string()))
    values, errors = adapter(modality).read(through_parquet(table, tmp_path))
    assert values == [None, None]
    assert errors[0] == f"{modality}: not a PNG label map"
    assert errors[1].startswith(f"{modality}: expected") and "PNG" in errors[1]


def test_an_image_that_does_not_decode_or_is_missing_reads_as_an_error(tmp_path):
    table = pa.table({"jpg": [b"garbage", None], "status": ["success"] * 2, "error_message": [None, None]})
    values, errors = adapter("rgb").read(table)
    assert values == [None, None]
    assert errors == ["rgb: cannot decode the stored image", "rgb: no jpg payload"]


def test_label_files_give_their_adapter_params(tmp_path):
    rng = np.random.default_rng(0)
    assert ADAPTERS["semseg"].params_of(stored_semseg(rng)[0].schema) == {"classes": CLASSES}
    assert ADAPTERS["clip"].params_of(stored_clip(rng)[0].schema) == {"dim": DIM}
    depth = stored_depth(rng)[0]
    assert ADAPTERS["depth"].params_of(depth.schema) == {"quantity": "inverse_depth"}  # files before the key
    omnidata = depth.replace_schema_metadata({"four_m.depth_quantity": "depth"})  # Omnidata's labels say so
    assert ADAPTERS["depth"].params_of(omnidata.schema) == {"quantity": "depth"}
    table = stored_clip(rng)[0].replace_schema_metadata(None)
    with pytest.raises(TokenizerInputError, match="clip: .*four_m.feature_shape"):
        ADAPTERS["clip"].read(table)
    table = stored_features("dinov2", rng)[0].replace_schema_metadata({"four_m.feature_shape": "16x16"})
    with pytest.raises(TokenizerInputError, match="dinov2: four_m.feature_shape '16x16' is not like"):
        ADAPTERS["dinov2"].read(table)


def test_clip_label_files_written_with_the_old_shape_key_still_read(tmp_path):
    table, expected = stored_clip(np.random.default_rng(0), shape_key="four_m.clip_shape")
    assert ADAPTERS["clip"].params_of(table.schema) == {"dim": DIM}
    values, errors = adapter("clip").read(through_parquet(table, tmp_path))
    np.testing.assert_array_equal(values[0], expected)
    assert errors == [None, UPSTREAM]


def test_each_feature_map_sits_on_its_tokenizer_grid():
    assert ADAPTERS["clip"].size == 14 and ADAPTERS["dinov2"].size == 16


def test_configured_rejects_unknown_modalities_and_params():
    with pytest.raises(UserError, match="caption"):
        configured("caption", SIZE, {})
    with pytest.raises(UserError, match=r"semseg: unknown adapter params \['dim'\]"):
        configured("semseg", SIZE, {"dim": 3})


def good(modality: str) -> np.ndarray:
    return adapter(modality).read(STORED[modality](np.random.default_rng(0))[0])[0][0]


BAD = {
    "rgb": [
        np.zeros((SIZE, SIZE, 3), np.float32),
        np.zeros((3, SIZE, SIZE)),
        np.full((3, SIZE, SIZE), 255, np.float32),
    ],
    "depth": [
        np.zeros((SIZE, SIZE), np.float32),
        np.zeros((1, SIZE, SIZE), np.float16),
        -np.ones((1, SIZE, SIZE), np.float32),
    ],
    "normal": [
        np.zeros((3, 8, 8), np.float32),
        np.zeros((3, SIZE, SIZE), np.uint8),
        np.full((3, SIZE, SIZE), 2, np.float32),
    ],
    "semseg": [np.zeros((1, SIZE, SIZE), np.int64), np.zeros((SIZE, SIZE), np.uint8), np.full((SIZE, SIZE), CLASSES)],
    **dict.fromkeys(
        FEATURE_MAPS,
        [
            np.zeros((DIM + 1, GRID, GRID), np.float32),
            np.zeros((DIM, GRID, GRID), np.float16),
            np.full((DIM, GRID, GRID), np.nan, np.float32),
        ],
    ),
    **dict.fromkeys(
        EDGE_MAPS,
        [
            np.zeros((SIZE, SIZE), np.float32),
            np.zeros((1, SIZE, SIZE), np.uint8),
            np.full((1, SIZE, SIZE), 2, np.float32),
        ],
    ),
}
"""Per modality: a wrong shape, a wrong dtype, then wrong contents (range, class count, NaN)."""


@pytest.mark.parametrize("modality", map_modalities())
def test_wrong_values_raise_naming_the_modality_and_what_was_expected(modality):
    checker = adapter(modality)
    checker.check(good(modality))
    for value in [*BAD[modality], good(modality).tolist()]:
        with pytest.raises(
            TokenizerInputError, match=rf"^{modality}: expected .*{re.escape(str(checker.shape))}.*, got "
        ):
            checker.check(value)


def test_class_ids_beyond_the_class_count_name_them():
    value = good("semseg")
    value[1, 1], value[2, 2] = CLASSES, 200
    with pytest.raises(TokenizerInputError, match=rf"ids in \[0, {CLASSES}\) or 255.*got class ids \[5, 200\]"):
        adapter("semseg").check(value)


@pytest.mark.parametrize("modality", map_modalities())
def test_a_perfect_reconstruction_scores_best_and_renders_as_rgb(modality):
    checker = adapter(modality)
    values = np.stack([good(modality)] * 2)
    score = checker.metric(checker.metric_sums(values, values) * 3)  # sums add up over batches
    best = {"psnr_db": 100.0, "abs_rel": 0.0, "angular_error_deg": 0.0, "miou": 1.0, "cosine": 1.0, "edge_f1": 1.0}
    assert score == pytest.approx(best[checker.metric_name], abs=0.05)
    tile = checker.render(values[0])
    assert tile.dtype == np.uint8 and tile.shape == (*values.shape[-2:], 3)


def test_edge_f1_forgives_a_shift_within_the_tolerance_and_no_more():
    truth = np.zeros((1, 1, 224, 224), np.float32)
    truth[0, 0, 100, 20:200] = 1  # a horizontal line
    near, far = np.roll(truth, 2, axis=2), np.roll(truth, 6, axis=2)
    half = truth.copy()
    half[0, 0, 100, 110:] = 0  # half the line found, nothing wrong predicted
    checker = configured("canny_edge", 224, {})
    assert checker.metric(checker.metric_sums(near, truth)) == 1.0
    assert checker.metric(checker.metric_sums(far, truth)) == 0.0
    # precision 1, recall 90/180 -> F1 2/3
    assert checker.metric(checker.metric_sums(half, truth)) == pytest.approx(2 / 3, abs=0.02)
    assert checker.metric(checker.metric_sums(np.zeros_like(truth), np.zeros_like(truth))) is None


def test_miou_counts_classes_present_in_the_targets_and_skips_unlabelled_pixels():
    checker = adapter("semseg")
    targets = np.array([[[0, 0, 1, 1, 255]]])
    predictions = np.array([[[0, 1, 1, 1, 4]]])  # IoU 1/2 for class 0, 2/3 for class 1; 4 is unlabelled
    assert checker.metric(checker.metric_sums(predictions, targets)) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert checker.metric(checker.metric_sums(predictions, np.full_like(targets, 255))) is None


def test_semseg_loss_ignores_unlabelled_pixels_and_stays_finite_without_labels():
    checker = adapter("semseg")
    logits = torch.randn(2, CLASSES, 3, 3)
    unlabelled = torch.full((2, 3, 3), 255)
    assert checker.loss(logits, unlabelled).item() == 0.0
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, CLASSES, (2, 3, 3), generator=generator)
    confident = torch.nn.functional.one_hot(targets, CLASSES).permute(0, 3, 1, 2).float() * 50
    mixed = torch.where(torch.rand(2, 3, 3, generator=generator) < 0.5, targets, unlabelled)
    assert (mixed != 255).any()
    assert checker.loss(confident, mixed).item() < 1e-3  # confident and right where labelled
