"""4M-21's palette and metadata sequences in the shared text vocabulary: ml-4m's token formats,
round trips, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from four_m.core.config import TextTokenizerConfig
from four_m.modalities.metadata import KEYS
from four_m.tokenize.base import TokenizerInputError
from four_m.tokenize.metadata import MetadataTokenizer, binned, metadata_bin
from four_m.tokenize.palette import PaletteTokenizer
from four_m.tokenize.text import TextTokenizer

CFG = TextTokenizerConfig(vocab_size=100, sentinels=4, coordinate_bins=1000, max_tokens=256)
PALETTES = [[10 * k + c for _ in range(k) for c in (0, 1, 2)] for k in range(1, 8)]


@pytest.fixture(scope="module")
def text() -> TextTokenizer:
    return TextTokenizer.train(["a red bus at the stop", "two cats on a couch"] * 4, CFG)


def tokens(text: TextTokenizer, ids: np.ndarray) -> list[str]:
    return [text.hf.id_to_token(int(i)) for i in ids]


def test_palettes_are_v1_length_then_v0_channels_all_seven_then_eos(text):
    palette = PaletteTokenizer(text)
    (ids,) = palette.encode([PALETTES])
    words = tokens(text, ids)
    assert words[:4] == ["v1=1", "v0=10", "v0=11", "v0=12"]
    assert words[4:11] == ["v1=2", "v0=20", "v0=21", "v0=22", "v0=20", "v0=21", "v0=22"]
    assert words[-1] == "[EOS]" and len(ids) == 7 + 3 * 28 + 1
    assert palette.decode([ids]) == [PALETTES]


def test_a_generated_palette_is_read_only_when_well_formed(text):
    palette = PaletteTokenizer(text)
    v = lambda axis, b: text.coordinate_id(axis, b)  # noqa: E731
    cut = [v(1, 2), v(0, 1), v(0, 2), v(0, 3), v(0, 4)]  # two colours announced, 4 values given
    whole = [v(1, 1), v(0, 7), v(0, 8), v(0, 9)]
    word = text.first_word_id
    assert palette.decode([np.array([*cut, *whole, text.eos_id])]) == [[[7, 8, 9]]]
    assert palette.decode([np.array([v(1, 1), v(0, 1), word, v(0, 2), v(0, 3)])]) == [[]]
    assert palette.decode([np.array([v(1, 1), v(0, 1), v(0, 574), v(0, 3)])]) == [[]]


def test_palette_values_outside_rgb_are_refused(text):
    with pytest.raises(TokenizerInputError, match="palette: a palette is 1-7 RGB colours"):
        PaletteTokenizer(text).encode([[[0, 0, 256]]])
    with pytest.raises(TokenizerInputError, match="coordinate_bins >= 256"):
        PaletteTokenizer(TextTokenizer.train(["a b"], TextTokenizerConfig(vocab_size=16, coordinate_bins=100)))


def test_metadata_bins_follow_ml_4m():
    assert metadata_bin("original_width", 640) == 20 and metadata_bin("original_height", 31) == 0
    assert metadata_bin("caption_n_words", 12) == 12 and metadata_bin("n_humans", 5000) == 999
    assert [metadata_bin("aesthetic_score", s) for s in (4.4, 4.5, 5.0, 5.5, 9)] == [0, 1, 1, 2, 2]
    assert [metadata_bin("watermark_score", s) for s in (0.2, 0.5)] == [0, 1]
    assert metadata_bin("brightness", 0) == 0 and metadata_bin("brightness", 255) == 49
    assert metadata_bin("brightness", 127.5) == 24  # int(0.5 * 49)
    assert metadata_bin("geometric_complexity", 2.0) == 49 and metadata_bin("contrast", -3) == 0


def test_metadata_is_key_value_pairs_in_key_order_and_absent_keys_are_left_out(text):
    metadata = MetadataTokenizer(text)
    value = dict.fromkeys(KEYS) | {"brightness": 255.0, "original_width": 640.0, "n_humans": 2.0}
    (ids,) = metadata.encode([value])
    assert tokens(text, ids) == ["v1=0", "v0=20", "v1=5", "v0=2", "v1=10", "v0=49", "[EOS]"]
    assert metadata.decode([ids]) == [binned(value)] == [{"original_width": 20, "n_humans": 2, "brightness": 49}]


def test_generated_metadata_in_any_order_decodes_to_its_pairs(text):
    metadata = MetadataTokenizer(text)
    v = lambda axis, b: text.coordinate_id(axis, b)  # noqa: E731
    ids = np.array([v(1, 10), v(0, 3), v(1, 10), v(0, 9), v(1, 5), v(1, 0), v(0, 4), text.eos_id, v(1, 2), v(0, 1)])
    assert metadata.decode([ids]) == [{"brightness": 3, "original_width": 4}]


def test_metadata_with_an_unknown_key_is_refused(text):
    with pytest.raises(TokenizerInputError, match=r"metadata: unknown keys \['height'\]"):
        MetadataTokenizer(text).encode([{"height": 3.0}])


def test_an_empty_or_eos_only_generation_decodes_to_nothing(text):
    for ids in (np.array([], np.int64), np.array([text.eos_id])):
        assert MetadataTokenizer(text).decode([ids]) == [{}]
        assert PaletteTokenizer(text).decode([ids]) == [[]]
