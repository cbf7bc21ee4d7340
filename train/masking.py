"""4M's multimodal masking: one sample's tokens -> the input tokens the encoder sees and the target
tokens the decoder predicts.

Per sample, over the modalities present in it only (an absent one is never drawn):

1. a mixture is drawn uniformly from ``MaskingConfig.mixtures``: ``all2all`` (any present modality
   can be input and target) or ``rgb2all`` (the whole input budget on rgb, targets among the others);
2. a Dirichlet draw splits the input budget across the input candidates and an independent one the
   target budget across the target candidates; :func:`split_budget` turns shares into integer token
   counts that sum exactly to the budget wherever the sample has the tokens;
3. a map gives a random subset of its grid as input and a random subset of the *remaining*
   positions as target, so inputs and targets never overlap; a sequence is span-masked like T5:
   each hidden span becomes one sentinel in the input, and ``S_0 span0 S_1 span1 ... EOS`` is the
   target, decoded autoregressively.

Sequences and sentinels against the budgets (the choices made here):

- The input is allocated first, because what a sequence can offer as target depends on what of it
  is visible. A sequence allotted ``a`` input tokens (``0 < a < n``, ``n`` its tokens before EOS)
  uses exactly ``a``: ``a - k`` visible tokens and ``k`` sentinels, with ``k`` chosen so the hidden
  spans average ``span_mean`` tokens (at most ``num_sentinels``; spans are separated by at least
  one visible token). ``a >= n`` shows it whole (no target); ``a = 0`` hides it whole, as span 0
  with no sentinel in the input (:func:`unmask_spans` reads an empty input as ``[S_0]``).
- Its target (``S_0 span0 ... EOS``, at most ``num_tokens`` long) then competes for the target
  budget like a map's remaining positions. A sequence allotted fewer target tokens than its target
  has keeps the target's prefix: teacher forcing on a prefix is still exact, the spans cut off are
  simply not predicted this step (as a map's unchosen positions are not).
- Tokens that are neither input nor target exist for maps and sequences alike; that is 4M's design.

``max_tokens_per_modality`` caps the input and the target of a modality separately.
Everything here is numpy on one sample, so it runs in DataLoader workers; :func:`collate` pads to
exactly the budgets, so a step's tensor shapes never depend on how many modalities a run has.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from four_m.core.config import ConfigError, TextTokenizerConfig
from four_m.core.modalities import MODALITIES, of_kind
from four_m.tokenize.text import EOS, PAD, SOS, SPECIAL_TOKENS
from four_m.train.batch import MaskedBatch

MIXTURES = ("all2all", "rgb2all")
_KEY = "train.masking"


def _check(ok: bool, name: str, requirement: str) -> None:
    if not ok:
        raise ConfigError(f"{_KEY}.{name}: {requirement}")


@dataclass(frozen=True)
class MaskingConfig:
    input_budget: int = 128
    """Input tokens per sample, whatever the number of modalities: the encoder's sequence length."""
    target_budget: int = 128
    """Target tokens per sample: the decoder's sequence length."""
    alphas: float | Mapping[str, float] = 1.0
    """Dirichlet concentration. 1.0 draws shares uniformly from the simplex; below 1 most of a budget
    tends to go to one modality, above 1 it is split more evenly. A mapping sets it per modality
    (unlisted modalities keep 1.0)."""
    mixtures: tuple[str, ...] = ("all2all",)
    """Drawn uniformly per sample: ``all2all``, ``rgb2all`` (needs rgb in the sample; samples
    without it fall back to all2all)."""
    max_tokens_per_modality: Mapping[str, int] | None = None
    """Caps on one modality's input tokens and, separately, its target tokens."""
    span_mean: float = 3.0
    """Mean length of a hidden span in a sequence (T5's default: 3)."""
    unconditional_rate: float = 0.0
    """Share of samples shown no input at all (only targets): the model then also learns the
    unconditional distribution, which classifier-free guidance contrasts the conditional one with."""
    seed: int = 0
    """Base of :meth:`Masker.sample_rng`: the mask of a sample depends on (seed, epoch, index) only,
    not on which worker drew it."""

    def __post_init__(self) -> None:
        _check(self.input_budget >= 1, "input_budget", "must be >= 1")
        _check(self.target_budget >= 1, "target_budget", "must be >= 1")
        if isinstance(self.alphas, Mapping):
            object.__setattr__(self, "alphas", dict(self.alphas))  # a plain dict pickles into workers
            for name, alpha in self.alphas.items():
                _check(float(alpha) > 0, f"alphas.{name}", "must be > 0")
        else:
            _check(float(self.alphas) > 0, "alphas", "must be > 0 (or a mapping modality -> alpha)")
        object.__setattr__(self, "mixtures", tuple(self.mixtures))
        _check(len(self.mixtures) > 0, "mixtures", f"needs at least one of {MIXTURES}")
        for mixture in self.mixtures:
            _check(mixture in MIXTURES, "mixtures", f"unknown mixture {mixture!r}; known: {MIXTURES}")
        if self.max_tokens_per_modality is not None:
            object.__setattr__(self, "max_tokens_per_modality", dict(self.max_tokens_per_modality))
            for name, cap in self.max_tokens_per_modality.items():
                _check(int(cap) >= 1, f"max_tokens_per_modality.{name}", "must be >= 1")
        _check(self.span_mean >= 1, "span_mean", "must be >= 1")
        _check(0.0 <= self.unconditional_rate < 1.0, "unconditional_rate", "must be in [0, 1)")


_FIRST_SENTINEL = len(SPECIAL_TOKENS)  # the layout of tokenize.text: specials, then sentinels


@dataclass(frozen=True)
class ModalityInfo:
    """What the masker needs of one modality of the run's ordered modality list."""

    name: str
    kind: Literal["map", "sequence"]
    num_tokens: int
    """Maps: the grid's token count (every sample has exactly that many, row-major). Sequences: the
    cap of a stored sequence, EOS included. All input and target positions are below it."""
    pad_id: int = SPECIAL_TOKENS.index(PAD)
    sos_id: int = SPECIAL_TOKENS.index(SOS)
    eos_id: int = SPECIAL_TOKENS.index(EOS)
    first_sentinel_id: int = _FIRST_SENTINEL
    num_sentinels: int = TextTokenizerConfig.sentinels
    """Special ids of the shared text vocabulary; only sequences use them."""

    def __post_init__(self) -> None:
        if self.kind not in ("map", "sequence"):
            raise ValueError(f"{self.name}: kind must be 'map' or 'sequence', not {self.kind!r}")
        if self.num_tokens < 1 or self.num_sentinels < 1:
            raise ValueError(f"{self.name}: num_tokens and num_sentinels must be >= 1")

    @property
    def sentinel_ids(self) -> range:
        return range(self.first_sentinel_id, self.first_sentinel_id + self.num_sentinels)


def modality_infos(names: Sequence[str], text: TextTokenizerConfig | None = None) -> tuple[ModalityInfo, ...]:
    """The run's modalities, in the given order, from ``core.modalities`` and the text tokenizer's config."""
    text = text or TextTokenizerConfig()
    infos = []
    for name in names:
        if name not in MODALITIES:
            raise ValueError(f"unknown modality {name!r}; known: {tuple(MODALITIES)}")
        spec = MODALITIES[name]
        num_tokens = spec.max_tokens if spec.layout == "map" else text.max_tokens
        infos.append(ModalityInfo(name, spec.layout, num_tokens, num_sentinels=text.sentinels))
    return tuple(infos)


@dataclass
class MaskedSample:
    """One sample's tokens before padding; all int64, the inputs at most ``input_budget`` long and
    the targets at most ``target_budget`` (fields as in :class:`~four_m.train.batch.MaskedBatch`)."""

    input_ids: np.ndarray
    input_modality: np.ndarray
    input_position: np.ndarray
    target_ids: np.ndarray
    target_modality: np.ndarray
    target_position: np.ndarray
    decoder_input_ids: np.ndarray


def split_budget(budget: int, shares: np.ndarray, available: np.ndarray) -> np.ndarray:
    """Integer token counts, one per modality, following ``shares`` and never above ``available``.

    They sum to ``min(budget, available.sum())``: largest-remainder rounding of the shares, then
    what a full modality could not take goes to those that still have tokens, again by share
    (evenly among them if their shares are all zero).
    """
    shares = np.asarray(shares, dtype=np.float64)
    available = np.asarray(available, dtype=np.int64)
    counts = np.zeros_like(available)
    total = min(int(budget), int(available.sum()))
    # Every round hands out at least one token (or fills a modality), so this ends quickly.
    while (left := total - int(counts.sum())) > 0:
        room = available - counts
        weights = np.where(room > 0, shares, 0.0)
        if not weights.sum() > 0:
            weights = (room > 0).astype(np.float64)
        ideal = weights / weights.sum() * left
        add = np.minimum(np.floor(ideal).astype(np.int64), room)
        rest = left - int(add.sum())
        if rest > 0:
            fraction = np.where(add < room, ideal - np.floor(ideal), -1.0)
            for i in np.argsort(-fraction, kind="stable")[:rest]:
                if fraction[i] < 0:
                    break
                add[i] += 1
        counts += add
    return counts


def _composition(total: int, parts: int, minimum: int, rng: np.random.Generator) -> np.ndarray:
    """``total`` split into ``parts`` integers >= ``minimum``, uniformly over such splits."""
    free = total - parts * minimum
    bars = np.sort(rng.choice(free + parts - 1, size=parts - 1, replace=False))
    return np.diff(np.concatenate([[-1], bars, [free + parts - 1]])) - 1 + minimum


def span_mask(
    content: np.ndarray, input_tokens: int, info: ModalityInfo, span_mean: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """T5 span masking of ``content`` (a sequence without its EOS) into exactly
    ``min(input_tokens, len(content))`` input tokens; returns (input, whole target).

    The target is ``S_0 span0 S_1 span1 ... EOS``; it is empty when the input shows everything.
    """
    n = len(content)
    s0, eos = info.first_sentinel_id, info.eos_id
    if input_tokens <= 0:
        return np.empty(0, np.int64), np.concatenate([[s0], content, [eos]]).astype(np.int64)
    if input_tokens >= n:
        return content.astype(np.int64), np.empty(0, np.int64)
    # input = visible + k sentinels; hidden = n - visible; hidden / k ~ span_mean gives k below.
    most = min((input_tokens + 1) // 2, info.num_sentinels)  # k spans need k - 1 visible separators
    spans = round((n - input_tokens) / (span_mean - 1)) if span_mean > 1 else most
    spans = int(np.clip(spans, 1, most))
    visible = input_tokens - spans
    hidden_lengths = _composition(n - visible, spans, 1, rng)
    gaps = _composition(visible - (spans - 1), spans + 1, 0, rng)
    gaps[1:spans] += 1
    inputs: list[int] = []
    target: list[int] = []
    at = 0
    for j in range(spans):
        inputs.extend(content[at : at + gaps[j]])
        at += gaps[j]
        inputs.append(s0 + j)
        target.append(s0 + j)
        target.extend(content[at : at + hidden_lengths[j]])
        at += hidden_lengths[j]
    inputs.extend(content[at:])
    target.append(eos)
    return np.asarray(inputs, np.int64), np.asarray(target, np.int64)


def unmask_spans(
    input_ids: Sequence[int] | np.ndarray, target_ids: Sequence[int] | np.ndarray, info: ModalityInfo
) -> np.ndarray:
    """The original sequence (ending with EOS) from a span-masked input and its target.

    Each sentinel of the input is replaced by the target's tokens after that sentinel; the target is
    read up to its EOS. An empty input stands for ``[S_0]`` (the whole sequence hidden). A sentinel
    without a span in the target (a truncated or unfinished target) becomes nothing.
    """
    sentinels = info.sentinel_ids
    spans: dict[int, list[int]] = {}
    current: list[int] | None = None
    for token in map(int, target_ids):
        if token == info.eos_id:
            break
        if token in sentinels:
            current = spans.setdefault(token, [])
        elif current is not None:
            current.append(token)
    out: list[int] = []
    for token in [int(t) for t in input_ids] or [info.first_sentinel_id]:
        out.extend(spans.get(token, ()) if token in sentinels else (token,))
    out.append(info.eos_id)
    return np.asarray(out, np.int64)


class Masker:
    """Masks one sample at a time; picklable, so DataLoader workers can each hold one.

    ``masker(sample, rng)`` takes ``{modality: uint16 ids or None}`` (None or missing: absent; keys
    outside the run's modalities are ignored) and returns a :class:`MaskedSample`;
    ``masker.collate(samples)`` pads them into a :class:`MaskedBatch`.
    """

    def __init__(self, modalities: Sequence[ModalityInfo], cfg: MaskingConfig | None = None) -> None:
        self.modalities = tuple(modalities)
        self.cfg = cfg = cfg or MaskingConfig()
        names = [m.name for m in self.modalities]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"the run needs distinct modalities, got {names}")
        alphas = cfg.alphas if isinstance(cfg.alphas, Mapping) else {}
        caps = cfg.max_tokens_per_modality or {}
        for field_name, per_modality in (("alphas", alphas), ("max_tokens_per_modality", caps)):
            unknown = sorted(set(per_modality) - set(names))
            _check(not unknown, field_name, f"modalities {unknown} are not among the run's {names}")
        image = of_kind("image", tuple(names))
        _check("rgb2all" not in cfg.mixtures or bool(image), "mixtures", "rgb2all needs rgb among the modalities")
        default_alpha = 1.0 if isinstance(cfg.alphas, Mapping) else float(cfg.alphas)
        self._alphas = np.array([float(alphas.get(n, default_alpha)) for n in names])
        self._caps = np.array([min(m.num_tokens, int(caps.get(m.name, m.num_tokens))) for m in self.modalities])
        self._rgb = names.index(image[0]) if image else None

    def sample_rng(self, index: int, epoch: int = 0) -> np.random.Generator:
        """The generator for sample ``index`` of ``epoch``: same mask wherever and whenever it is drawn."""
        return np.random.default_rng((self.cfg.seed, epoch, index))

    def __call__(self, sample: Mapping[str, np.ndarray | None], rng: np.random.Generator) -> MaskedSample:
        cfg = self.cfg
        tokens = {
            i: self._read(info, sample[info.name])
            for i, info in enumerate(self.modalities)
            if sample.get(info.name) is not None
        }
        present = list(tokens)
        mixture = cfg.mixtures[int(rng.integers(len(cfg.mixtures)))]
        if mixture == "rgb2all" and self._rgb in tokens:
            input_from, target_from = [self._rgb], [i for i in present if i != self._rgb]
        else:
            input_from, target_from = present, present
        input_shares, target_shares = self._dirichlet(input_from, rng), self._dirichlet(target_from, rng)

        input_available = np.zeros(len(self.modalities), np.int64)
        for i in input_from:
            input_available[i] = min(len(tokens[i]), self._caps[i])
        # Drawn only when enabled, so a run without it keeps the random stream (and masks) it always had.
        unconditional = cfg.unconditional_rate > 0 and rng.random() < cfg.unconditional_rate
        input_counts = split_budget(0 if unconditional else cfg.input_budget, input_shares, input_available)

        inputs: list[tuple[int, np.ndarray, np.ndarray]] = []  # (modality, ids, positions)
        rest: dict[int, np.ndarray] = {}  # maps: unused positions in random order; sequences: the target
        for i in present:
            info, ids, count = self.modalities[i], tokens[i], int(input_counts[i])
            if info.kind == "map":
                order = rng.permutation(info.num_tokens)
                positions = np.sort(order[:count])
                inputs.append((i, ids[positions], positions))
                rest[i] = order[count:]
            else:
                masked, rest[i] = span_mask(ids, count, info, cfg.span_mean, rng)
                inputs.append((i, masked, np.arange(len(masked))))

        target_available = np.zeros(len(self.modalities), np.int64)
        for i in target_from:
            target_available[i] = min(len(rest[i]), self._caps[i])
        target_counts = split_budget(cfg.target_budget, target_shares, target_available)

        targets: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # (modality, ids, positions, decoder in)
        for i in target_from:
            info, count = self.modalities[i], int(target_counts[i])
            if info.kind == "map":
                positions = np.sort(rest[i][:count])
                targets.append((i, tokens[i][positions], positions, np.zeros(count, np.int64)))
            else:
                target = rest[i][:count]  # a prefix: teacher forcing stays exact when truncated
                decoder_in = np.concatenate([[info.sos_id], target[:-1]]) if count else target
                targets.append((i, target, np.arange(count), decoder_in))
        return MaskedSample(
            input_ids=_cat([ids for _, ids, _ in inputs]),
            input_modality=_cat([np.full(len(ids), i) for i, ids, _ in inputs]),
            input_position=_cat([positions for _, _, positions in inputs]),
            target_ids=_cat([ids for _, ids, _, _ in targets]),
            target_modality=_cat([np.full(len(ids), i) for i, ids, _, _ in targets]),
            target_position=_cat([positions for _, _, positions, _ in targets]),
            decoder_input_ids=_cat([decoder_in for *_, decoder_in in targets]),
        )

    def collate(self, samples: Sequence[MaskedSample]) -> MaskedBatch:
        return collate(samples, self.cfg.input_budget, self.cfg.target_budget)

    def _dirichlet(self, candidates: list[int], rng: np.random.Generator) -> np.ndarray:
        shares = np.zeros(len(self.modalities))
        if candidates:
            shares[candidates] = np.nan_to_num(rng.dirichlet(self._alphas[candidates]))
        return shares

    @staticmethod
    def _read(info: ModalityInfo, ids: np.ndarray) -> np.ndarray:
        """Maps: the flat grid. Sequences: the tokens before EOS (trailing padding dropped)."""
        ids = np.asarray(ids).reshape(-1).astype(np.int64)
        if info.kind == "map":
            if len(ids) != info.num_tokens:
                raise ValueError(f"{info.name}: {len(ids)} tokens, expected the grid's {info.num_tokens}")
            return ids
        if len(ids) > info.num_tokens:
            raise ValueError(f"{info.name}: {len(ids)} tokens, more than the cap of {info.num_tokens}")
        ends = np.flatnonzero((ids == info.eos_id) | (ids == info.pad_id))
        return ids[: ends[0]] if len(ends) else ids


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


def collate(samples: Sequence[MaskedSample], input_budget: int, target_budget: int) -> MaskedBatch:
    """Pads masked samples to exactly ``input_budget`` inputs and ``target_budget`` targets."""

    def pad(rows: list[np.ndarray], width: int, what: str) -> torch.Tensor:
        out = np.zeros((len(rows), width), np.int64)
        for b, row in enumerate(rows):
            if len(row) > width:
                raise ValueError(f"sample {b} has {len(row)} {what} tokens, more than the budget of {width}")
            out[b, : len(row)] = row
        return torch.from_numpy(out)

    input_lengths = torch.tensor([len(s.input_ids) for s in samples]).reshape(-1, 1)
    target_lengths = torch.tensor([len(s.target_ids) for s in samples]).reshape(-1, 1)
    return MaskedBatch(
        input_ids=pad([s.input_ids for s in samples], input_budget, "input"),
        input_modality=pad([s.input_modality for s in samples], input_budget, "input"),
        input_position=pad([s.input_position for s in samples], input_budget, "input"),
        input_mask=torch.arange(input_budget) < input_lengths,
        target_ids=pad([s.target_ids for s in samples], target_budget, "target"),
        target_modality=pad([s.target_modality for s in samples], target_budget, "target"),
        target_position=pad([s.target_position for s in samples], target_budget, "target"),
        target_mask=torch.arange(target_budget) < target_lengths,
        decoder_input_ids=pad([s.decoder_input_ids for s in samples], target_budget, "target"),
    )
