import dataclasses
import json
import unicodedata

import numpy as np
import pytest

from four_m.core.coco import COCO_THINGS
from four_m.core.config import TextTokenizerConfig
from four_m.tokenize.base import TOKEN_DTYPE, TokenizerInputError
from four_m.tokenize.text import TextTokenizer

CFG = TextTokenizerConfig(vocab_size=200, sentinels=8, coordinate_bins=1000, max_tokens=32)
CAPTIONS = [
    "A dog runs across the green grass",
    "Two cats sleeping on a red couch",
    "A man riding a bicycle down the street",
    "A traffic light at a busy crossing",
    "A plate of pasta next to a glass of wine",
    "Children playing with a kite on the beach",
    "An old bus parked near the station",
    "A bowl of fruit on a wooden table",
    "A woman holding an umbrella in the rain",
    "Three sheep standing in a foggy field",
    "A small boat on a calm lake at sunset",
    "A Café with people sitting outside",
    "A red fire hydrant on the sidewalk",
    "A pizza with cheese and tomatoes",
    "A cat looking out of the window",
    "A giraffe eating leaves from a tall tree",
    "Two horses running in a sandy field",
    "A laptop and a cup of coffee on a desk",
    "A person surfing a big wave",
    "A stop sign at the end of the road",
    "An elephant walking along the river",
    "A skateboard leaning against a wall",
    "A train crossing a bridge over the river",
    "A teddy bear sitting on a bed",
]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(CAPTIONS, CFG)


def _normalized(text: str) -> str:
    """What BERT-uncased normalisation makes of a caption: lower case, no accents."""
    return "".join(c for c in unicodedata.normalize("NFD", text.lower()) if not unicodedata.combining(c))


def test_reserved_tokens_have_fixed_ids(tok):
    hf = tok.hf
    assert [hf.token_to_id(t) for t in ("[PAD]", "[UNK]", "[SOS]", "[EOS]")] == [0, 1, 2, 3]
    assert (tok.pad_id, tok.unk_id, tok.sos_id, tok.eos_id) == (0, 1, 2, 3)
    assert list(tok.sentinel_ids) == [hf.token_to_id(f"[S_{i}]") for i in range(CFG.sentinels)] == list(range(4, 12))
    assert tok.coordinate_id(0, 0) == 12 == hf.token_to_id("v0=0")
    assert tok.coordinate_id(3, 999) == 12 + 4 * 1000 - 1 == hf.token_to_id("v3=999")
    assert tok.coordinate_id(2, 517) == hf.token_to_id("v2=517")
    assert list(tok.class_ids) == [hf.token_to_id(name) for name in COCO_THINGS]
    assert tok.first_word_id == tok.class_ids.stop == 12 + 4000 + 80
    assert tok.vocab_size > tok.first_word_id
    with pytest.raises(ValueError, match="v4=0"):
        tok.coordinate_id(4, 0)


@pytest.mark.parametrize("name", ["traffic light", "dog", "hot dog", "tennis racket", "teddy bear"])
def test_class_names_are_single_tokens_in_captions(tok, name):
    (ids,) = tok.encode([name.upper()])
    assert ids.tolist() == [tok.class_id(name), tok.eos_id]


def test_class_names_match_whole_words_only(tok):
    # Were the added token "cat" matched inside the word, the rest would start a new word: "cat alog".
    assert tok.decode(tok.encode(["catalog", "dogs"])) == ["catalog", "dogs"]


def test_captions_round_trip_lower_cased(tok):
    encoded = tok.encode(CAPTIONS)
    assert tok.decode(encoded) == [_normalized(c) for c in CAPTIONS]
    for ids in encoded:
        assert ids.dtype == TOKEN_DTYPE
        assert ids[-1] == tok.eos_id and ids[0] != tok.sos_id
        assert int(ids.max()) < tok.vocab_size
        assert tok.unk_id not in ids.tolist()


def test_long_text_is_capped_with_eos_last(tok):
    (ids,) = tok.encode([" ".join(CAPTIONS)])
    assert len(ids) == CFG.max_tokens and ids[-1] == tok.eos_id
    assert tok.eos_id not in ids[:-1].tolist()
    assert _normalized(" ".join(CAPTIONS)).startswith(tok.decode([ids])[0])
    assert [len(x) for x in tok.encode(["", "dog"])] == [1, 2]


def test_caption_text_cannot_produce_control_tokens(tok):
    (ids,) = tok.encode(["[EOS] [PAD] [S_0] v0=12 dog"])
    assert ids[-1] == tok.eos_id
    assert all(i == tok.unk_id or i >= tok.class_ids.start for i in ids[:-1].tolist())


def test_decode_stops_at_eos_and_drops_reserved_ids(tok):
    dog, cat = tok.class_id("dog"), tok.class_id("cat")
    ids = [tok.sos_id, dog, tok.sentinel_ids[0], tok.coordinate_id(1, 5), tok.pad_id, tok.unk_id, tok.vocab_size + 7]
    ids += [cat, tok.eos_id, cat]
    assert tok.decode([np.asarray(ids)]) == ["dog cat"]


def test_save_load_gives_identical_ids(tok, tmp_path):
    tok.save(tmp_path / "text")
    assert json.loads((tmp_path / "text" / "text_config.json").read_text()) == dataclasses.asdict(CFG)
    loaded = TextTokenizer.load(tmp_path / "text")
    assert loaded.vocab_size == tok.vocab_size and loaded.cfg == tok.cfg
    texts = [*CAPTIONS, "Unseen wörds & a traffic light!"]
    assert [x.tolist() for x in loaded.encode(texts)] == [x.tolist() for x in tok.encode(texts)]


def test_from_config_loads_the_file_or_trains(tok, tmp_path):
    tok.save(tmp_path)
    loaded = TextTokenizer.from_config(dataclasses.replace(CFG, file=str(tmp_path), max_tokens=8), texts=None)
    assert loaded.max_tokens == 8
    assert loaded.encode(CAPTIONS[:3])[0].tolist() == tok.encode(CAPTIONS[:3])[0][:7].tolist() + [tok.eos_id]
    trained = TextTokenizer.from_config(CFG, iter(CAPTIONS))
    assert trained.vocab_size == tok.vocab_size
    with pytest.raises(TokenizerInputError, match="sentinels=9"):
        TextTokenizer.from_config(dataclasses.replace(CFG, file=str(tmp_path), sentinels=9))
    with pytest.raises(TokenizerInputError, match="no tokenizer.json"):
        TextTokenizer.from_config(dataclasses.replace(CFG, file=str(tmp_path / "missing")))
    with pytest.raises(TokenizerInputError, match="no captions"):
        TextTokenizer.from_config(CFG)


@pytest.mark.parametrize("bad", [None, b"a dog", 3, 2.5, ["a", "dog"]])
def test_non_strings_are_rejected_naming_the_modality(tok, bad):
    with pytest.raises(TokenizerInputError, match="caption: expected a str"):
        tok.encode(["a dog", bad])
    with pytest.raises(TokenizerInputError, match="caption: expected a str"):
        TextTokenizer.train(["a dog", bad], CFG)


def test_bare_string_and_empty_corpus_are_rejected(tok):
    with pytest.raises(TokenizerInputError, match="caption: expected a sequence of strings"):
        tok.encode("a dog")
    with pytest.raises(TokenizerInputError, match="caption: no words"):
        TextTokenizer.train(["", "   "], CFG)


def test_vocabulary_over_16_bits_fails_clearly():
    with pytest.raises(TokenizerInputError, match="does not fit uint16"):
        TextTokenizer.train(CAPTIONS, dataclasses.replace(CFG, sentinels=30_000, coordinate_bins=10_000))


ALPHABETICAL = tuple(sorted(COCO_THINGS))
"""ml-4m's class-token order."""


def ml4m_layout_file(tmp_path, classes=ALPHABETICAL):
    """A tokenizer file laid out as ml-4m's text_tokenizer_4m_wordpiece_30k.json: 200 sentinels,
    coordinates, the class names alphabetically (as added tokens), then word pieces."""
    from tokenizers import AddedToken, models
    from tokenizers import Tokenizer as HFTokenizer

    from four_m.tokenize.text import COORDINATE_AXES, SPECIAL_TOKENS, _empty_tokenizer

    reserved = [*SPECIAL_TOKENS, *(f"[S_{i}]" for i in range(200))]
    reserved += [f"v{a}={b}" for a in range(COORDINATE_AXES) for b in range(1000)]
    words = ["a", "on", "sits", "the", "##s"]
    vocab = {token: i for i, token in enumerate([*reserved, *classes, *words])}
    hf: HFTokenizer = _empty_tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    hf.add_tokens([AddedToken(name, single_word=True, normalized=True) for name in classes])
    path = tmp_path / "text_tokenizer_4m_wordpiece_30k.json"
    hf.save(str(path))
    return path


def test_a_file_in_ml4ms_layout_loads_with_its_class_order_and_boxes_use_its_ids(tmp_path):
    from four_m.tokenize.boxes import BoxSequenceTokenizer

    cfg = TextTokenizerConfig(file=str(ml4m_layout_file(tmp_path)), sentinels=200)
    tok = TextTokenizer.from_config(cfg)
    first_class = 4 + 200 + 4 * 1000
    assert tok.class_id("airplane") == first_class and tok.class_id("zebra") == first_class + 79  # alphabetical
    assert tok.class_id("person") == first_class + ALPHABETICAL.index("person")
    ids = tok.encode(["A dog sits on a bench"])[0]
    assert ids.tolist()[1] == tok.class_id("dog") and ids[-1] == tok.eos_id
    boxes = BoxSequenceTokenizer(tok)
    box = {"x0": 0.1, "y0": 0.2, "x1": 0.5, "y1": 0.9, "class": "zebra", "score": 0.9}
    (encoded,) = boxes.encode([[box]])
    assert encoded.tolist()[4] == first_class + 79
    assert boxes.decode([encoded])[0][0]["class"] == "zebra"


def test_a_file_whose_class_block_holds_another_token_is_refused(tmp_path):
    classes = ALPHABETICAL[:-1] + ("lidar",)
    cfg = TextTokenizerConfig(file=str(ml4m_layout_file(tmp_path, classes)), sentinels=200)
    with pytest.raises(
        TokenizerInputError, match=r"must be the 80 COCO class names \(in any order\), but hold \['lidar'\]"
    ):
        TextTokenizer.from_config(cfg)
