import pyarrow as pa
import pytest

from four_m.core.provenance import RANDOM_INIT
from four_m.labelers.caption import CaptionLabeler, tiny_vocabulary
from four_m.labelers.pretrained import MissingWeightsError
from four_m.modalities.caption import CaptionConfig

SIZE = 64
MAX_NEW_TOKENS = 5


def _config(**overrides) -> CaptionConfig:
    return CaptionConfig(**{"input_size": SIZE, "max_new_tokens": MAX_NEW_TOKENS, "num_beams": 2, **overrides})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("caption")
    labeler = CaptionLabeler(_config(), view_size=48, workdir=folder)
    labeler.setup()
    return labeler, folder


def _check_captions(labeler: CaptionLabeler, out: list[dict]) -> None:
    table = pa.Table.from_pylist(out, schema=labeler.schema())
    assert table.num_rows == len(out) and table.column_names == ["caption"]
    captions = [row["caption"] for row in out]
    assert all(isinstance(text, str) and text == text.strip() for text in captions)
    assert any(captions), "the random decoder should still say something"
    for text in captions:
        assert "[" not in text, "special tokens are skipped"
        assert len(labeler.tokenizer.tokenize(text)) <= MAX_NEW_TOKENS


def test_captions_follow_the_schema_and_length(tiny, batch):
    labeler, _ = tiny
    assert CaptionLabeler.keeps_alt_text
    out = labeler.label(batch(SIZE))
    _check_captions(labeler, out)
    assert len({row["caption"] for row in out}) > 1, "captions should depend on the image"


def test_tiny_tokenizer_knows_its_words(tiny):
    labeler, _ = tiny
    vocabulary = tiny_vocabulary()
    assert labeler.model.config.text_config.vocab_size == len(vocabulary) == len(labeler.tokenizer)
    assert labeler.tokenizer.bos_token_id == labeler.model.config.text_config.bos_token_id
    assert labeler.tokenizer.tokenize("a person sitting on a couch") == ["a", "person", "sitting", "on", "a", "couch"]


def test_saved_weights_load_through_the_production_path(tiny, batch):
    labeler, folder = tiny
    loaded = CaptionLabeler(_config(model=str(folder)), view_size=48)
    loaded.setup()
    assert loaded.label(batch(SIZE)) == labeler.label(batch(SIZE))
    assert labeler.provenance()["model"] == RANDOM_INIT
    assert loaded.provenance()["model"] == str(folder)
    assert loaded.provenance()["revision"] != RANDOM_INIT


def test_other_input_sizes_interpolate_position_embeddings(tiny, batch):
    _, folder = tiny
    larger = CaptionLabeler(_config(model=str(folder), input_size=96, num_beams=1), view_size=48)
    larger.setup()
    assert larger.interpolate
    _check_captions(larger, larger.label(batch(96)))


def test_missing_weights_name_the_path(tmp_path):
    missing = str(tmp_path / "no-such-blip")
    with pytest.raises(MissingWeightsError, match="no-such-blip"):
        CaptionLabeler(_config(model=missing), view_size=48).setup()
