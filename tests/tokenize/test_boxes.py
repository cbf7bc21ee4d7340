import dataclasses
import random

import numpy as np
import pytest

from four_m.core.coco import COCO_THINGS
from four_m.core.config import TextTokenizerConfig
from four_m.tokenize.base import TOKEN_DTYPE, TokenizerInputError
from four_m.tokenize.boxes import BoxSequenceTokenizer
from four_m.tokenize.text import TextTokenizer

CFG = TextTokenizerConfig(vocab_size=100, sentinels=4, coordinate_bins=1000, max_tokens=256, min_box_score=0.25)
BINS = CFG.coordinate_bins - 1
CAPTIONS = ["a dog and a cat on a couch", "two people riding bicycles down the street"] * 4


@pytest.fixture(scope="module")
def boxes() -> BoxSequenceTokenizer:
    return BoxSequenceTokenizer(TextTokenizer.train(CAPTIONS, CFG))


def _box(x0, y0, x1, y1, name="dog", score=0.9):
    return {"x0": x0, "y0": y0, "x1": x1, "y1": y1, "class": name, "score": score}


def _grid_box(rng: random.Random, step: int = 1) -> dict:
    """A box whose corners lie on the bin grid (every ``step``-th bin), so it must round-trip exactly."""
    x0, x1 = sorted(rng.randrange(0, CFG.coordinate_bins, step) for _ in range(2))
    y0, y1 = sorted(rng.randrange(0, CFG.coordinate_bins, step) for _ in range(2))
    return _box(x0 / BINS, y0 / BINS, x1 / BINS, y1 / BINS, rng.choice(COCO_THINGS), rng.uniform(0.25, 1.0))


def _documented_order(box: dict) -> tuple:
    x0, y0 = round(box["x0"] * BINS), round(box["y0"] * BINS)
    return x0 * x0 + y0 * y0, y0, x0, box["class"], box["x1"], box["y1"]


def test_random_grid_boxes_round_trip_exactly_in_documented_order(boxes):
    rng = random.Random(0)
    # A coarse grid (step 333) makes ties in distance, corner and class, which the order must break.
    images = [[_grid_box(rng, step) for _ in range(rng.randrange(0, 20))] for step in (1, 333) for _ in range(25)]
    assert sum(map(len, images)) > 300
    encoded = boxes.encode(images)
    decoded = boxes.decode(encoded)
    for image, ids, got in zip(images, encoded, decoded, strict=True):
        assert ids.dtype == TOKEN_DTYPE and len(ids) == 5 * len(image) + 1 and ids[-1] == boxes.text.eos_id
        assert int(ids.max()) < boxes.vocab_size
        expected = [{**b, "score": None} for b in sorted(image, key=_documented_order)]
        assert got == expected
        distances = [b["x0"] ** 2 + b["y0"] ** 2 for b in got]
        assert distances == sorted(distances)


def test_tokens_of_one_box(boxes):
    text = boxes.text
    (ids,) = boxes.encode([[_box(0.0, 0.5, 1.0, 1.0, "traffic light")]])
    coordinates = [text.coordinate_id(0, 0), text.coordinate_id(1, 500), text.coordinate_id(2, 999)]
    assert ids.tolist() == [*coordinates, text.coordinate_id(3, 999), text.class_id("traffic light"), text.eos_id]
    assert [text.hf.id_to_token(i) for i in ids[:5].tolist()] == ["v0=0", "v1=500", "v2=999", "v3=999", "traffic light"]


def test_off_grid_values_bin_to_nearest_and_clip(boxes):
    ((box,),) = boxes.decode(boxes.encode([[_box(0.5004, -0.2, 1.3, 0.0001)]]))
    assert (box["x0"], box["y0"], box["x1"], box["y1"]) == (500 / BINS, 0.0, 1.0, 0.0)


def test_low_score_boxes_are_dropped_unscored_kept(boxes):
    kept = [_box(0.1, 0.1, 0.2, 0.2, "cat", 0.25), _box(0.3, 0.3, 0.4, 0.4, "dog", None)]
    unscored = {k: v for k, v in _box(0.5, 0.5, 0.6, 0.6, "bus").items() if k != "score"}
    dropped = [_box(0.0, 0.0, 0.1, 0.1, "cat", 0.2499), _box(0.2, 0.2, 0.3, 0.3, "person", 0.0)]
    (got,) = boxes.decode(boxes.encode([[*dropped, *kept, unscored]]))
    assert [b["class"] for b in got] == ["cat", "dog", "bus"]
    assert all(b["score"] is None for b in got)


def test_cap_keeps_whole_nearest_boxes_and_eos():
    text = TextTokenizer.train(CAPTIONS, dataclasses.replace(CFG, max_tokens=23))
    capped = BoxSequenceTokenizer(text)
    image = [_box(i / 10, i / 10, 1.0, 1.0, COCO_THINGS[i]) for i in range(9, -1, -1)]
    (ids,) = capped.encode([image])
    assert len(ids) == 21 and ids[-1] == text.eos_id
    assert [b["class"] for b in capped.decode([ids])[0]] == list(COCO_THINGS[:4])


def test_malformed_sequences_decode_without_crashing(boxes):
    text = boxes.text
    v = text.coordinate_id
    dog, cat, eos = text.class_id("dog"), text.class_id("cat"), text.eos_id
    good = [v(0, 1), v(1, 2), v(2, 3), v(3, 4), dog]
    rows = [
        [v(0, 9), v(1, 9), v(2, 9), cat, *good, eos],  # incomplete box, then a good one
        [v(0, 9), v(1, 9), v(2, 9), v(3, 9), *good, eos],  # box without class, then a good one
        [v(0, 9), v(2, 9), v(1, 9), v(3, 9), cat, *good],  # axes out of order; no EOS at all
        [*good[:4], text.first_word_id, dog, *good, eos, *good],  # word inside a box; boxes after EOS
        [*good[:4], text.sentinel_ids[0], cat, *good[:4], boxes.vocab_size + 3, dog, *good, eos],
        [*good[:4], v(3, 4), dog, *good],  # axis repeated
        [v(2, 9), *good[1:4], cat, *good, eos],  # box starting at v2: its v1..v3 must not count
    ]
    expected = [{"x0": 1 / BINS, "y0": 2 / BINS, "x1": 3 / BINS, "y1": 4 / BINS, "class": "dog", "score": None}]
    assert boxes.decode([np.asarray(r, dtype=TOKEN_DTYPE) for r in rows]) == [expected] * len(rows)
    assert boxes.decode([np.asarray([], dtype=TOKEN_DTYPE), np.asarray([eos, *good])]) == [[], []]

    rng = np.random.default_rng(0)
    noise = [rng.integers(0, boxes.vocab_size + 50, size=rng.integers(0, 200)) for _ in range(200)]
    for got in boxes.decode(noise):
        for box in got:
            assert box["class"] in COCO_THINGS and all(0 <= box[k] <= 1 for k in ("x0", "y0", "x1", "y1"))


def test_save_load_gives_identical_ids(boxes, tmp_path):
    boxes.save(tmp_path)
    loaded = BoxSequenceTokenizer.load(tmp_path)
    assert loaded.vocab_size == boxes.vocab_size == boxes.text.vocab_size
    image = [_grid_box(random.Random(i)) for i in range(30)]
    assert loaded.encode([image])[0].tolist() == boxes.encode([image])[0].tolist()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([[_box(0.1, 0.1, 0.2, 0.2, "dragon")]], "boxes: unknown class 'dragon'"),
        ([[_box(0.1, 0.1, 0.2, 0.2, None)]], "boxes: unknown class None"),
        ([[_box(0.1, "0.1", 0.2, 0.2)]], "boxes: box 'y0' must be a finite number"),
        ([[_box(0.1, 0.1, float("nan"), 0.2)]], "boxes: box 'x1' must be a finite number"),
        ([[_box(0.1, 0.1, 0.2, 0.2, score="high")]], "boxes: box 'score' must be a finite number"),
        ([[{"x0": 0.1, "class": "dog"}]], "boxes: box 'y0' must be a finite number"),
        ([[("dog", 0.1, 0.1, 0.2, 0.2)]], "boxes: expected a dict per box"),
        ([None], "boxes: expected a list of box dicts"),
        ([_box(0.1, 0.1, 0.2, 0.2)], "boxes: expected a list of box dicts"),
        (None, "boxes: expected a sequence of box lists"),
    ],
)
def test_bad_inputs_name_the_kind(boxes, values, message):
    with pytest.raises(TokenizerInputError, match=message.replace("(", r"\(")):
        boxes.encode(values)
