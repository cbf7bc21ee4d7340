"""The WordPiece vocabulary shared by ``caption`` and ``det``, and the caption tokenizer on top of it.

As in 4M, one vocabulary serves captions and box sequences, so the two modalities share token
embeddings. Its ids are laid out in fixed blocks, word pieces last, so that everything the trainer
and the box tokenizer need is found by arithmetic rather than by string look-ups:

====================  =========================================  ======================
block                 tokens                                     ids
====================  =========================================  ======================
special               ``[PAD] [UNK] [SOS] [EOS]``                 0, 1, 2, 3
sentinels             ``[S_0]`` .. ``[S_{n-1}]``                  4 .. 4+n-1
coordinates           ``v0=0`` .. ``v3={bins-1}`` (axis-major)    then 4 x bins ids
classes               the 80 COCO detection class names          then 80 ids
word pieces           trained WordPiece vocabulary (``##`` cont.)  the rest
====================  =========================================  ======================

ml-4m's own ``text_tokenizer_4m_wordpiece_30k.json`` has this layout with 200 sentinels and its
class names in alphabetical order: set ``tokenize.text.file`` to it and ``tokenize.text.sentinels``
to 200, and captions and boxes get the ids its models were trained on. The class block may hold
the 80 names in any order (the file's order is read); every other block must be exactly the
config's. (ml-4m's file also matches sentinel and coordinate tokens written in a caption's text,
where this project's own vocabulary never does.)

Special, sentinel and coordinate tokens live only in the model's vocabulary, never in the added
tokens the tokenizer matches in raw text: no caption, whatever it says ("[EOS]", "v0=12"), can
produce a control token. Class names, by contrast, are added tokens matched as whole words, so
"traffic light" in a caption is the same single token as a ``det`` box of that class.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from four_m.core.coco import COCO_THINGS
from four_m.core.config import TextTokenizerConfig
from four_m.tokenize.base import TOKEN_DTYPE, Tokenizer, TokenizerInputError
from four_m.tokenize.wordpiece import learn_pieces

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[SOS]", "[EOS]")
PAD, UNK, SOS, EOS = SPECIAL_TOKENS
COORDINATE_AXES = 4
"""x0, y0, x1, y1: tokens v0=..v3=."""
MAX_VOCAB = int(np.iinfo(TOKEN_DTYPE).max)
HF_FILE = "tokenizer.json"
CONFIG_FILE = "text_config.json"
CLASS_NAMES = frozenset(COCO_THINGS)


def reserved_tokens(cfg: TextTokenizerConfig) -> list[str]:
    """Every token before the word pieces, in id order (the table in the module docstring)."""
    sentinels = [f"[S_{i}]" for i in range(cfg.sentinels)]
    coordinates = [f"v{axis}={b}" for axis in range(COORDINATE_AXES) for b in range(cfg.coordinate_bins)]
    return [*SPECIAL_TOKENS, *sentinels, *coordinates, *COCO_THINGS]


def coordinate_block(cfg: TextTokenizerConfig, axis: int) -> range:
    """The ids of tokens ``v{axis}=0`` .. ``v{axis}={bins-1}`` under ``cfg`` (the table above)."""
    start = len(SPECIAL_TOKENS) + cfg.sentinels + axis * cfg.coordinate_bins
    return range(start, start + cfg.coordinate_bins)


class TextTokenizer(Tokenizer):
    """Captions <-> WordPiece ids, lower-cased and accent-stripped like BERT's uncased tokenizer.

    ``encode`` gives the word tokens then ``[EOS]``, at most ``cfg.max_tokens`` ids with ``[EOS]``
    always last. ``[SOS]`` is not stored: 4M's decoder prepends it when it builds its input at
    training time, so storing it would waste a slot of every sequence.
    """

    modality = "caption"
    fixed_length: ClassVar[bool] = False

    def __init__(self, hf: HFTokenizer, cfg: TextTokenizerConfig) -> None:
        self.hf = hf
        self.cfg = cfg
        self._check_layout()
        self.class_names: tuple[str, ...] = tuple(hf.id_to_token(i) for i in self.class_ids)
        """The class block's names in id order: ``COCO_THINGS``'s, or a loaded file's (ml-4m's: alphabetical)."""
        self._class_index = {name: i for i, name in enumerate(self.class_names)}

    @classmethod
    def train(cls, texts: Iterable[str], cfg: TextTokenizerConfig) -> TextTokenizer:
        """WordPiece on ``texts`` (about ``cfg.vocab_size`` word pieces), then the reserved blocks in front.

        The same captions give the same file byte for byte, in any process (``wordpiece.py``).
        """
        probe = _empty_tokenizer(models.WordPiece(unk_token=UNK))
        counts = Counter(word for text in _checked_texts(texts) for word in _words(probe, text))
        if not counts:
            raise TokenizerInputError("caption: no words in the captions to train the text tokenizer on")
        reserved = reserved_tokens(cfg)
        taken = set(reserved)
        words = [t for t in learn_pieces(counts, cfg.vocab_size) if t not in taken]
        vocab = {token: i for i, token in enumerate(reserved + words)}
        hf = _empty_tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK))
        hf.add_tokens([AddedToken(name, single_word=True, normalized=True, special=False) for name in COCO_THINGS])
        return cls(hf, cfg)

    @classmethod
    def from_config(cls, cfg: TextTokenizerConfig, texts: Iterable[str] | None = None) -> TextTokenizer:
        """The saved tokenizer in ``cfg.file`` if set (``texts`` untouched), else one trained on ``texts``.

        A loaded vocabulary is used with this run's ``cfg`` (its cap, its score threshold); its
        sentinel and coordinate blocks must match ``cfg``, which the constructor checks.
        """
        if cfg.file is not None:
            return cls(_read_hf(Path(cfg.file)), cfg)
        if texts is None:
            raise TokenizerInputError("caption: tokenize.text.file is not set and no captions were given to train on")
        return cls.train(texts, cfg)

    # -- id layout ---------------------------------------------------------------------------

    @property
    def pad_id(self) -> int:
        return SPECIAL_TOKENS.index(PAD)

    @property
    def unk_id(self) -> int:
        return SPECIAL_TOKENS.index(UNK)

    @property
    def sos_id(self) -> int:
        return SPECIAL_TOKENS.index(SOS)

    @property
    def eos_id(self) -> int:
        return SPECIAL_TOKENS.index(EOS)

    @property
    def sentinel_ids(self) -> range:
        """``[S_0]``.. in order: T5-style span masking uses them as ``sentinel_ids[k]`` for span k."""
        return range(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + self.cfg.sentinels)

    @property
    def coordinate_ids(self) -> range:
        """All coordinate tokens; axis ``a``'s bin ``b`` is ``coordinate_ids[a * bins + b]``."""
        start = self.sentinel_ids.stop
        return range(start, start + COORDINATE_AXES * self.cfg.coordinate_bins)

    @property
    def class_ids(self) -> range:
        """The COCO class names in ``COCO_THINGS`` order."""
        start = self.coordinate_ids.stop
        return range(start, start + len(COCO_THINGS))

    @property
    def first_word_id(self) -> int:
        """Ids from here on are trained word pieces; below it, the reserved blocks."""
        return self.class_ids.stop

    def coordinate_id(self, axis: int, bin_: int) -> int:
        """Token ``v{axis}={bin_}``: axis 0..3 is x0, y0, x1, y1."""
        if not (0 <= axis < COORDINATE_AXES and 0 <= bin_ < self.cfg.coordinate_bins):
            raise ValueError(f"no coordinate token v{axis}={bin_} (bins: {self.cfg.coordinate_bins})")
        return self.coordinate_ids[axis * self.cfg.coordinate_bins + bin_]

    def class_id(self, name: str) -> int:
        """Token of a COCO class name (``KeyError`` outside the table)."""
        return self.class_ids[self._class_index[name]]

    # -- Tokenizer ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def max_tokens(self) -> int:
        return self.cfg.max_tokens

    def encode(self, values: Sequence[str]) -> list[np.ndarray]:
        if isinstance(values, str):
            raise TokenizerInputError("caption: expected a sequence of strings, got one str")
        for value in values:
            _check_text(value)
        out = []
        for encoding in self.hf.encode_batch(list(values), add_special_tokens=False):
            ids = np.asarray([*encoding.ids[: self.max_tokens - 1], self.eos_id], dtype=TOKEN_DTYPE)
            self.check_ids(ids, "encode")
            out.append(ids)
        return out

    def decode(self, ids: Sequence[np.ndarray]) -> list[str]:
        """Text up to the first ``[EOS]``; special, sentinel, coordinate and out-of-vocabulary ids are dropped."""
        texts = []
        for row in ids:
            kept = []
            for i in np.asarray(row).tolist():
                if i == self.eos_id:
                    break
                if self.class_ids.start <= i < self.vocab_size:
                    kept.append(i)
            texts.append(self.hf.decode(kept, skip_special_tokens=False))
        return texts

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / HF_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> TextTokenizer:
        directory = Path(directory)
        cfg = TextTokenizerConfig(**json.loads((directory / CONFIG_FILE).read_text()))
        return cls(_read_hf(directory), cfg)

    def _check_layout(self) -> None:
        """A vocabulary from a file must have the ids this config implies, or every id would be misread."""
        if self.vocab_size > MAX_VOCAB:
            raise TokenizerInputError(
                f"caption: vocabulary of {self.vocab_size} tokens does not fit {np.dtype(TOKEN_DTYPE).name}"
                f" (at most {MAX_VOCAB}); lower tokenize.text.vocab_size, sentinels or coordinate_bins"
            )
        reserved = reserved_tokens(self.cfg)
        fixed = len(reserved) - len(COCO_THINGS)  # specials, sentinels, coordinates: exactly these ids
        for expected, token in enumerate(reserved[:fixed]):
            found = self.hf.token_to_id(token)
            if found != expected:
                raise TokenizerInputError(
                    f"caption: token {token!r} has id {found}, expected {expected}: the tokenizer file does not"
                    f" match tokenize.text (sentinels={self.cfg.sentinels},"
                    f" coordinate_bins={self.cfg.coordinate_bins})"
                )
        block = {self.hf.id_to_token(i) for i in range(fixed, len(reserved))}
        if block != CLASS_NAMES:
            strays = sorted(str(t) for t in block - CLASS_NAMES)[:3]
            raise TokenizerInputError(
                f"caption: ids {fixed}..{len(reserved) - 1} must be the 80 COCO class names (in any order),"
                f" but hold {strays}: the tokenizer file does not match tokenize.text"
            )


def _empty_tokenizer(model: models.Model) -> HFTokenizer:
    """BERT-uncased text handling around ``model``: NFD, lower case, no accents, split on punctuation."""
    hf = HFTokenizer(model)
    hf.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece(prefix="##")
    return hf


def _words(hf: HFTokenizer, text: str) -> list[str]:
    """``text`` split as ``hf`` splits it before its model runs: the words WordPiece learns from."""
    return [word for word, _ in hf.pre_tokenizer.pre_tokenize_str(hf.normalizer.normalize_str(text))]


def _read_hf(directory: Path) -> HFTokenizer:
    """A saved tokenizer folder's file, or a tokenizer file itself (ml-4m's text_tokenizer_4m_wordpiece_30k.json)."""
    path = directory if directory.is_file() else directory / HF_FILE
    if not path.is_file():
        raise TokenizerInputError(f"caption: no {HF_FILE} in {directory} (expected a saved text tokenizer folder)")
    return HFTokenizer.from_file(str(path))


def _check_text(value: Any) -> None:
    if not isinstance(value, str):
        raise TokenizerInputError(f"caption: expected a str per caption, got {type(value).__name__} {value!r:.80}")


def _checked_texts(texts: Iterable[str]) -> Iterator[str]:
    """Type-check captions while they are counted (streamed: only the word counts are kept)."""
    if isinstance(texts, str):
        raise TokenizerInputError("caption: expected an iterable of strings to train on, got one str")
    for text in texts:
        _check_text(text)
        yield text
