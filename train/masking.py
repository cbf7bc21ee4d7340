"""4M's multimodal masking: one sample's tokens -> the input tokens the encoder sees and the target
tokens the decoder predicts.

Per sample, over the modalities present in it only (an absent one is never drawn):

1. a mixture is drawn by ``MaskingConfig.mixture_weights``. Each mixture is a pair of Dirichlet
   concentrations per modality, one for the input split and one for the target split (4M's
   ``alphas_mixture`` files); a zero or unlisted concentration keeps a modality off that side.
   ``all2all`` (every modality both sides, concentration ``alpha``) and ``rgb2all`` (the input on
   the image only, as pixels where the run has its pixel input, else as tokens; targets among all
   the others, the image's tokens included when the pixels are the input) are presets; a sample
   without any input candidate of its mixture falls back to ``all2all``. A *task* (``task``: inputs
   -> targets, 4M's task fine-tunes) is the one mixture ``task``: its inputs shown whole
   (sequences with keep scheme ``all``), its targets asked whole, and no fallback: a sample without
   its inputs is shown nothing;
2. each sample's budgets are drawn uniformly from [``min_input_budget``, ``input_budget``] and
   [``min_target_budget``, ``target_budget``] where a minimum is set (4M's token-count ranges,
   ``min_input_tokens`` to ``num_input_tokens``); the two Dirichlet draws split them into
   per-modality allotments (:func:`split_budget`), after each candidate got its ``min_*_tokens``
   and never above its ``max_*_tokens``;
3. a map gives a random subset of its grid as input and a random subset of the *remaining*
   positions as target, so inputs and targets never overlap. A pixel input (4M's ``rgb@224``) is
   masked like a map's input, by patch; it is never a target;
4. a sequence is masked as in 4M: EOS is appended first (so it can be hidden and predicted), a keep
   probability is drawn by the modality's scheme (``random``: uniform in [0, 1]; ``all``: 1;
   ``binary``: 0 or 1), every token is kept with it and each run of hidden tokens becomes one
   sentinel; while the input is longer than the allotment the probability is lowered by a factor
   0.9 and the draw repeated. The target is ``S_0 span0 S_1 span1 ... S_k``: the decoder reads it
   from ``S_0`` on and predicts from ``span0`` on, so ``S_0`` costs no target slot and is never
   predicted; the closing sentinel ``S_k`` says that no span follows. A target longer than the
   allotment starts at a random sentinel (never the closing one) and is cut to the allotment; when
   what follows that sentinel is shorter, at the earliest sentinel whose rest fits.

Where this differs from 4M, and why:

- What a sequence leaves of its allotment (the keep draw seldom fills it exactly, a target cut at a
  sentinel seldom either) goes to the sample's maps, so a batch is always ``input_budget`` and
  ``target_budget`` tokens wherever the sample has them (4M leaves those slots empty).
- A target allotment counts predicted tokens: 4M also counts the leading sentinel, which is only
  the decoder's first input here.
- Minimum counts are handed out before the split instead of redrawing the Dirichlet until they hold.
- 4M-21's chunked sequences (:data:`CHUNKED_KINDS`) are first cut into chunks at their chunk-opening
  tokens (``v1=``): a palette sample shows *one* of its seven stored palettes, drawn uniformly
  (ml-4m's ColorPaletteTransform draws the length per example); metadata shows its key/value pairs
  in a fresh random order, and span masking hides or keeps whole pairs, EOS being a chunk of its
  own (ml-4m's chunked span masking). Given as a generation input, a palette is the seven-colour
  one and metadata keeps its stored order.
- A sequence never needs more sentinels than the vocabulary has: if a draw makes more spans, the
  shortest visible gaps between spans are hidden too (100 sentinels and 256-token captions would
  otherwise fail now and then).

Everything here is numpy on one sample, so it runs in DataLoader workers; :func:`collate` pads to
exactly the budgets, so a step's tensor shapes never depend on how many modalities a run has.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from four_m.core.config import KEEP_SCHEMES, MaskingConfig, TextTokenizerConfig, check
from four_m.core.modalities import MODALITIES, input_modalities, of_kind, pixel_input_of, pixel_inputs
from four_m.tokenize.metadata import KEY_AXIS
from four_m.tokenize.palette import LENGTH_AXIS
from four_m.tokenize.text import EOS, PAD, SOS, SPECIAL_TOKENS, coordinate_block
from four_m.train.batch import MaskedBatch

TASK = "task"
"""The mixture a fixed task (``MaskingConfig.task``) becomes."""
KEEP_DECAY = 0.9
"""4M lowers a sequence's keep probability by this factor until its input fits the allotment."""
CHUNKED_KINDS: Mapping[str, tuple[str, int]] = {"palette": ("one_of", LENGTH_AXIS), "metadata": ("shuffled", KEY_AXIS)}
"""Sequence kind -> (how a training sample views its chunks, the coordinate axis whose tokens open a
chunk): ``one_of`` shows one chunk, drawn uniformly; ``shuffled`` shows all in random order, masked
chunk by chunk."""
_PER_MIXTURE = ("input_alphas", "target_alphas", "keep")
_PER_MODALITY = ("min_input_tokens", "max_input_tokens", "min_target_tokens", "max_target_tokens")


def _check(ok: bool, name: str, requirement: str) -> None:
    """What only the run's modalities show wrong, named by its key in the ``train`` section."""
    check(ok, f"train.{name}", requirement)


@dataclass(frozen=True)
class Mixtures:
    """The mixtures a masker draws from, by name: the configured ones, or a task's one."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    """Sampling weight per name; empty: equal."""
    input_alphas: Mapping[str, Mapping[str, float]]
    target_alphas: Mapping[str, Mapping[str, float]]
    keep: Mapping[str, Mapping[str, str]]

    @classmethod
    def of(cls, cfg: MaskingConfig) -> Mixtures:
        """A task is the one mixture ``TASK``, in place of the configured mixtures (a fine-tune recipe
        inherits its pre-training's): concentration 1 on each input and each target (one modality a
        side takes the whole budget), every sequence input kept whole."""
        if not cfg.task.inputs:
            return cls(cfg.mixtures, cfg.mixture_weights, cfg.input_alphas, cfg.target_alphas, cfg.keep)
        inputs, targets = cfg.task.inputs, cfg.task.targets
        return cls(
            names=(TASK,),
            weights=(),
            input_alphas={TASK: dict.fromkeys(inputs, 1.0)},
            target_alphas={TASK: dict.fromkeys(targets, 1.0)},
            keep={TASK: dict.fromkeys(inputs, "all")},
        )


_FIRST_SENTINEL = len(SPECIAL_TOKENS)  # the layout of tokenize.text: specials, then sentinels


@dataclass(frozen=True)
class ModalityInfo:
    """What the masker needs of one modality of the run's ordered modality list."""

    name: str
    layout: Literal["map", "sequence", "pixels"]
    num_tokens: int
    """Maps and pixels: the grid's token count (every sample has exactly that many, row-major; a pixel
    input's patches). Sequences: the cap of a stored sequence, EOS included. All input and target
    positions are below it."""
    pad_id: int = SPECIAL_TOKENS.index(PAD)
    sos_id: int = SPECIAL_TOKENS.index(SOS)
    eos_id: int = SPECIAL_TOKENS.index(EOS)
    first_sentinel_id: int = _FIRST_SENTINEL
    num_sentinels: int = TextTokenizerConfig.sentinels
    """Special ids of the shared text vocabulary; only sequences use them."""
    image_size: int = 0
    """Pixels: the side of the square image a sample carries (grid side times the patch size)."""
    chunks: str = ""
    """Sequences of a :data:`CHUNKED_KINDS` kind: ``one_of`` or ``shuffled``; else empty."""
    chunk_openers: range = range(0)
    """The ids that open a chunk (``v1=0`` .. of the shared vocabulary)."""

    def __post_init__(self) -> None:
        if self.layout not in ("map", "sequence", "pixels"):
            raise ValueError(f"{self.name}: layout must be 'map', 'sequence' or 'pixels', not {self.layout!r}")
        if (self.layout == "pixels") != (self.image_size > 0):
            raise ValueError(f"{self.name}: image_size is for pixel inputs only, and they need one")
        if self.num_tokens < 1 or self.num_sentinels < 2:
            raise ValueError(f"{self.name}: needs num_tokens >= 1 and num_sentinels >= 2 (a span and the closing one)")

    @property
    def sentinel_ids(self) -> range:
        return range(self.first_sentinel_id, self.first_sentinel_id + self.num_sentinels)


def modality_infos(names: Sequence[str], text: TextTokenizerConfig | None = None) -> tuple[ModalityInfo, ...]:
    """The run's modalities, in the given order, from ``core.modalities`` and the text tokenizer's config."""
    text = text or TextTokenizerConfig()
    infos = []
    pixels = pixel_inputs()
    for name in names:
        if name in pixels:
            infos.append(ModalityInfo(name, "pixels", pixels[name].max_tokens, image_size=pixels[name].pixel_side))
            continue
        if name not in MODALITIES:
            raise ValueError(f"unknown modality {name!r}; known: {tuple(MODALITIES)} and pixel inputs {tuple(pixels)}")
        spec = MODALITIES[name]
        num_tokens = spec.max_tokens if spec.layout == "map" else text.max_tokens
        chunks, axis = CHUNKED_KINDS.get(spec.kind, ("", 0))
        openers = coordinate_block(text, axis) if chunks else range(0)
        infos.append(
            ModalityInfo(
                name, spec.layout, num_tokens, num_sentinels=text.sentinels, chunks=chunks, chunk_openers=openers
            )
        )
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
    pixels: dict[str, np.ndarray] = field(default_factory=dict)
    """Pixel input name -> the sample's (S, S, 3) uint8 image, where some of its patches are inputs."""


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


def draw_keep_probability(scheme: str, rng: np.random.Generator) -> float:
    """4M's keep schemes: ``random`` uniform in [0, 1], ``all`` 1 (shown whole if it fits),
    ``binary`` 0 or 1 (wholly hidden or wholly shown)."""
    if scheme == "random":
        return float(rng.random())
    if scheme == "all":
        return 1.0
    if scheme == "binary":
        return float(rng.integers(2))
    raise ValueError(f"unknown keep scheme {scheme!r}; known: {KEEP_SCHEMES}")


def _run_starts(hidden: np.ndarray) -> np.ndarray:
    return hidden & ~np.concatenate([[False], hidden[:-1]])


def _limit_spans(hidden: np.ndarray, most: int) -> np.ndarray:
    """``hidden`` with at most ``most`` runs: the shortest visible gaps between runs are hidden too."""
    starts = np.flatnonzero(_run_starts(hidden))
    if len(starts) <= most:
        return hidden
    ends = np.flatnonzero(hidden & ~np.concatenate([hidden[1:], [False]])) + 1  # one past each run
    hidden = hidden.copy()
    for j in np.argsort(starts[1:] - ends[:-1], kind="stable")[: len(starts) - most]:
        hidden[ends[j] : starts[j + 1]] = True
    return hidden


def chunk_view(
    info: ModalityInfo, sequence: np.ndarray, rng: np.random.Generator | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(the sequence a sample shows, each token's chunk index or None) of a read sequence (EOS last).

    Unchunked kinds pass through. A chunked one is cut before each chunk opener; ``one_of`` keeps one
    chunk (drawn with ``rng``; without, the last and longest: a palette's seven colours), ``shuffled``
    keeps all in a random order (without ``rng``, as stored); EOS ends either as a chunk of its own.
    """
    if not info.chunks:
        return sequence, None
    content = sequence[:-1]
    starts = np.flatnonzero(np.isin(content, info.chunk_openers))
    pieces = [piece for piece in np.split(content, starts) if len(piece)]
    if not pieces:
        return sequence, np.zeros(len(sequence), np.int64)
    if info.chunks == "one_of":
        pieces = [pieces[int(rng.integers(len(pieces))) if rng is not None else -1]]
    elif rng is not None:
        pieces = [pieces[i] for i in rng.permutation(len(pieces))]
    pieces.append(sequence[-1:])
    chunk = np.repeat(np.arange(len(pieces)), [len(p) for p in pieces])
    return np.concatenate(pieces), chunk


def span_mask(
    sequence: np.ndarray,
    keep_probability: float,
    info: ModalityInfo,
    rng: np.random.Generator,
    chunks: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """4M's span masking of ``sequence`` (EOS included): each token (or, given each token's chunk
    index, each chunk) is kept with ``keep_probability``; returns (input, target) with every run of
    hidden tokens one sentinel ``S_j`` in the input and ``S_j run_j`` in the target, which ends with
    the closing sentinel ``S_k``."""
    kept = rng.random(len(sequence)) if chunks is None else rng.random(int(chunks[-1]) + 1)[chunks]
    hidden = _limit_spans(kept >= keep_probability, info.num_sentinels - 1)
    starts = _run_starts(hidden)
    sentinel = info.first_sentinel_id + np.cumsum(starts) - 1
    inputs = np.where(hidden, sentinel, sequence)[~hidden | starts]
    spans = int(starts.sum())
    target = np.insert(sequence[hidden], np.flatnonzero(starts[hidden]), info.first_sentinel_id + np.arange(spans))
    return inputs.astype(np.int64), np.append(target, info.first_sentinel_id + spans).astype(np.int64)


def mask_sequence(
    sequence: np.ndarray,
    allotment: int,
    scheme: str,
    info: ModalityInfo,
    rng: np.random.Generator,
    chunks: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(input of at most ``allotment`` tokens, whole target) of ``sequence`` (EOS included).

    No allotment hides it whole; else the scheme's keep probability is lowered by ``KEEP_DECAY``
    until the input fits (it always does in the end: everything hidden is one sentinel).
    """
    if allotment <= 0:
        _, target = span_mask(sequence, 0.0, info, rng, chunks)
        return np.empty(0, np.int64), target
    keep = draw_keep_probability(scheme, rng)
    inputs, target = span_mask(sequence, keep, info, rng, chunks)
    while len(inputs) > allotment:
        keep *= KEEP_DECAY
        inputs, target = span_mask(sequence, keep, info, rng, chunks)
    return inputs, target


def fit_target(target: np.ndarray, allotment: int, info: ModalityInfo, rng: np.random.Generator) -> np.ndarray:
    """The part of a sequence's whole target (``S_0 ... S_k``) to train on: its tokens after the first
    one are predicted, so at most ``allotment + 1`` tokens, always starting at a sentinel.

    Over the allotment, 4M's rule: start at a random sentinel other than the closing one and cut to
    the allotment; if the rest from there is shorter, start at the earliest sentinel whose rest fits.
    """
    if allotment <= 0:
        return target[:0]
    size = allotment + 1
    if len(target) <= size:
        return target
    sentinels = np.flatnonzero((target >= info.first_sentinel_id) & (target < info.sentinel_ids.stop))
    start = sentinels[rng.integers(max(1, len(sentinels) - 1))]
    if len(target) - start >= size:
        return target[start : start + size]
    return target[sentinels[np.argmax(len(target) - sentinels <= size)] :]


def unmask_spans(
    input_ids: Sequence[int] | np.ndarray, target_ids: Sequence[int] | np.ndarray, info: ModalityInfo
) -> np.ndarray:
    """The original sequence (up to its EOS) from a span-masked input and its target (``S_0 ...``).

    Each sentinel of the input is replaced by the target's tokens after that sentinel. An empty input
    stands for ``[S_0]`` (the whole sequence hidden). A sentinel without a span in the target (a cut
    or unfinished target) becomes nothing.
    """
    sentinels = info.sentinel_ids
    spans: dict[int, list[int]] = {}
    current: list[int] | None = None
    for token in map(int, target_ids):
        if token in sentinels:
            current = spans.setdefault(token, [])
        elif current is not None:
            current.append(token)
    out: list[int] = []
    for token in [int(t) for t in input_ids] or [info.first_sentinel_id]:
        out.extend(spans.get(token, ()) if token in sentinels else (token,))
    ends = [i for i, token in enumerate(out) if token == info.eos_id]
    return np.asarray(out[: ends[0] + 1] if ends else out, np.int64)


@dataclass(frozen=True)
class _Mixture:
    """One mixture over the run's modalities, in their order."""

    input_alphas: np.ndarray
    target_alphas: np.ndarray
    keep: tuple[str, ...]
    falls_back: bool = True
    """A sample without any of its inputs takes ``all2all`` instead; a task's shows nothing."""


class Masker:
    """Masks one sample at a time; picklable, so DataLoader workers can each hold one.

    ``masker(sample, rng)`` takes ``{modality: uint16 ids or None}`` (None or missing: absent; keys
    outside the run's modalities are ignored) and returns a :class:`MaskedSample`;
    ``masker.collate(samples)`` pads them into a :class:`MaskedBatch`. ``seed`` is the base of
    :meth:`sample_rng`: the mask of a sample depends on (seed, epoch, index) only, not on which worker
    drew it.
    """

    def __init__(self, modalities: Sequence[ModalityInfo], cfg: MaskingConfig | None = None, seed: int = 0) -> None:
        self.modalities = tuple(modalities)
        self.cfg = cfg = cfg or MaskingConfig()
        self.seed = seed
        self.mixtures = mixtures = Mixtures.of(cfg)
        names = [m.name for m in self.modalities]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"the run needs distinct modalities, got {names}")
        self._check_names(names)
        self._pixels = np.array([m.layout == "pixels" for m in self.modalities])
        self._check_input_only()
        image = of_kind("image", tuple(names))
        _check("rgb2all" not in mixtures.names or bool(image), "mixtures", "rgb2all needs rgb among the modalities")
        if image:
            self._image = names.index(image[0])
            pixels = pixel_input_of(image[0], tuple(names))
            self._image_input = names.index(pixels) if pixels else self._image
        self._alphas = np.full(len(names), float(cfg.alpha))
        self._resolved = [self._resolve(name) for name in mixtures.names]
        self._all2all = self._resolve("all2all")
        weights = np.array(mixtures.weights or [1.0] * len(mixtures.names), np.float64)
        self._weights = weights / weights.sum()
        self._is_map = np.array([m.layout in ("map", "pixels") for m in self.modalities])  # grids
        if cfg.task.inputs:
            self._check_task_budgets()
        self._limits = {
            name: np.array([int(getattr(cfg, name).get(m.name, default)) for m in self.modalities])
            for name, default in (
                ("min_input_tokens", 0),
                ("max_input_tokens", np.iinfo(np.int64).max),
                ("min_target_tokens", 0),
                ("max_target_tokens", np.iinfo(np.int64).max),
            )
        }

    def _check_names(self, names: list[str]) -> None:
        """Every modality a mixture or a limit names must be one of the run's: else stop naming it.
        A keep scheme only says how a modality is masked where it is present, so it may name any
        registered modality (a config's palette scheme stays valid in a run without palettes)."""
        named: list[tuple[str, Mapping, Sequence[str]]] = [
            (f"{key}.{mixture}", per, input_modalities() if key == "keep" else names)
            for key in _PER_MIXTURE
            for mixture, per in getattr(self.mixtures, key).items()
        ]
        named += [(key, getattr(self.cfg, key), names) for key in _PER_MODALITY]
        for key, per_modality, allowed in named:
            unknown = sorted(set(per_modality) - set(allowed))
            _check(not unknown, key, f"modalities {unknown} are not among the run's {names}")

    def _check_input_only(self) -> None:
        """A pixel input is never a target: a mixture or limit that makes it one stops the run."""
        inputs_only = {m.name for m in self.modalities if m.layout == "pixels"}
        for mixture, alphas in self.mixtures.target_alphas.items():
            targets = sorted(n for n, alpha in alphas.items() if n in inputs_only and float(alpha) > 0)
            _check(not targets, f"target_alphas.{mixture}", f"{targets} are pixel inputs: nothing predicts pixels")
        for key in ("min_target_tokens", "max_target_tokens"):
            named = sorted(set(getattr(self.cfg, key)) & inputs_only)
            _check(not named, key, f"{named} are pixel inputs, never targets")

    def _check_task_budgets(self) -> None:
        """A task shows its inputs and asks its targets whole: the budgets must hold the grids (a
        sequence is whole when it fits what the grids leave)."""
        sizes = {m.name: m.num_tokens for m in self.modalities if m.layout in ("map", "pixels")}
        for side in ("input", "target"):
            named = getattr(self.cfg.task, f"{side}s")
            whole = sum(sizes.get(name, 0) for name in named)
            budget = getattr(self.cfg, f"{side}_budget")
            _check(budget >= whole, f"{side}_budget", f"{budget} cannot hold the task's {list(named)} whole: {whole}")

    def _resolve(self, name: str) -> _Mixture:
        """A mixture's concentrations over the run's modalities: its own, else the preset's."""
        cfg, count = self.cfg, len(self.modalities)
        preset_input, preset_target = self._alphas.copy(), np.where(self._pixels, 0.0, self._alphas)
        if name == "rgb2all":  # 4M: the image in, everything else out (its tokens too, when pixels are in)
            preset_input = np.zeros(count)
            preset_input[self._image_input] = 1.0
            preset_target[self._image_input] = 0.0

        def own(side: str, preset: np.ndarray | None) -> np.ndarray:
            given = getattr(self.mixtures, side).get(name)
            if given is None:
                return preset
            return np.array([float(given.get(m.name, 0.0)) for m in self.modalities])

        keep = self.mixtures.keep.get(name, {})
        return _Mixture(
            input_alphas=own("input_alphas", preset_input),
            target_alphas=own("target_alphas", preset_target),
            keep=tuple(keep.get(m.name, "random") for m in self.modalities),
            falls_back=name != TASK or not cfg.task.inputs,
        )

    def sample_rng(self, index: int, epoch: int = 0) -> np.random.Generator:
        """The generator for sample ``index`` of ``epoch``: same mask wherever and whenever it is drawn."""
        return np.random.default_rng((self.seed, epoch, index))

    def __call__(self, sample: Mapping[str, np.ndarray | None], rng: np.random.Generator) -> MaskedSample:
        cfg, infos = self.cfg, self.modalities
        tokens, chunks = {}, {}
        for i, info in enumerate(infos):
            if sample.get(info.name) is not None:
                tokens[i], chunks[i] = chunk_view(info, self._read(info, sample[info.name]), rng)
        present = np.zeros(len(infos), bool)
        present[list(tokens)] = True
        mixture = self._resolved[int(rng.choice(len(self._resolved), p=self._weights))]
        if mixture.falls_back and not (present & (mixture.input_alphas > 0)).any():
            mixture = self._all2all
        input_from = present & (mixture.input_alphas > 0)
        target_from = present & (mixture.target_alphas > 0)
        input_shares = self._dirichlet(mixture.input_alphas, input_from, rng)
        target_shares = self._dirichlet(mixture.target_alphas, target_from, rng)
        lengths = np.array([len(tokens.get(i, ())) for i in range(len(infos))])

        # Drawn only when enabled, so a run without it keeps the random stream (and masks) it always had.
        unconditional = cfg.unconditional_rate > 0 and rng.random() < cfg.unconditional_rate
        input_budget = 0 if unconditional else self._budget(cfg.min_input_budget, cfg.input_budget, rng)
        target_budget = self._budget(cfg.min_target_budget, cfg.target_budget, rng)
        input_available = np.where(input_from, np.minimum(lengths, self._limits["max_input_tokens"]), 0)
        input_counts = self._allot(input_budget, input_shares, input_available, "min_input_tokens")
        rest: dict[int, np.ndarray] = {}  # maps: unused positions in random order; sequences: the whole target
        sequence_inputs: dict[int, np.ndarray] = {}
        for i in tokens:
            if not self._is_map[i]:
                sequence_inputs[i], rest[i] = mask_sequence(
                    tokens[i], int(input_counts[i]), mixture.keep[i], infos[i], rng, chunks[i]
                )
                input_counts[i] = len(sequence_inputs[i])
        input_counts += self._top_up_maps(input_budget, input_counts, input_shares, input_available)

        inputs: list[tuple[int, np.ndarray, np.ndarray]] = []  # (modality, ids, positions)
        for i in tokens:
            if self._is_map[i]:
                order = rng.permutation(infos[i].num_tokens)
                positions = np.sort(order[: input_counts[i]])
                inputs.append((i, tokens[i][positions], positions))
                rest[i] = order[input_counts[i] :]
            else:
                inputs.append((i, sequence_inputs[i], np.arange(len(sequence_inputs[i]))))

        predictable = np.array([len(rest[i]) - (not self._is_map[i]) if i in rest else 0 for i in range(len(infos))])
        target_from &= ~self._pixels
        target_available = np.where(target_from, np.minimum(predictable, self._limits["max_target_tokens"]), 0)
        target_counts = self._allot(target_budget, target_shares, target_available, "min_target_tokens")
        pieces = {}
        for i in np.flatnonzero(target_from & ~self._is_map):
            pieces[i] = fit_target(rest[i], int(target_counts[i]), infos[i], rng)
            target_counts[i] = max(len(pieces[i]) - 1, 0)
        target_counts += self._top_up_maps(target_budget, target_counts, target_shares, target_available)

        targets: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # (modality, ids, positions, decoder in)
        for i in np.flatnonzero(target_from):
            count = int(target_counts[i])
            if self._is_map[i]:
                positions = np.sort(rest[i][:count])
                targets.append((i, tokens[i][positions], positions, np.zeros(count, np.int64)))
            else:  # teacher forcing: the decoder reads the piece from its sentinel on, one step behind
                targets.append((i, pieces[i][1:], np.arange(count), pieces[i][:-1]))
        return MaskedSample(
            input_ids=_cat([ids for _, ids, _ in inputs]),
            input_modality=_cat([np.full(len(ids), i) for i, ids, _ in inputs]),
            input_position=_cat([positions for _, _, positions in inputs]),
            target_ids=_cat([ids for _, ids, _, _ in targets]),
            target_modality=_cat([np.full(len(ids), i) for i, ids, _, _ in targets]),
            target_position=_cat([positions for _, _, positions, _ in targets]),
            decoder_input_ids=_cat([decoder_in for *_, decoder_in in targets]),
            pixels={infos[i].name: sample[infos[i].name] for i in tokens if self._pixels[i] and input_counts[i]},
        )

    def collate(self, samples: Sequence[MaskedSample]) -> MaskedBatch:
        sizes = {m.name: m.image_size for m in self.modalities if m.layout == "pixels"}
        return collate(samples, self.cfg.input_budget, self.cfg.target_budget, sizes)

    @staticmethod
    def _budget(low: int | None, high: int, rng: np.random.Generator) -> int:
        """4M's token-count range: uniform in [low, high], drawn only when there is a range (so a
        run without one keeps the random stream, and masks, it always had)."""
        return high if low is None or low >= high else int(rng.integers(low, high + 1))

    def _allot(self, budget: int, shares: np.ndarray, available: np.ndarray, minimum: str) -> np.ndarray:
        """Per-modality counts: each candidate's minimum first (as far as it has tokens), the rest by share."""
        floor = np.minimum(self._limits[minimum], available)
        return floor + split_budget(budget - int(floor.sum()), shares, available - floor)

    def _top_up_maps(self, budget: int, counts: np.ndarray, shares: np.ndarray, available: np.ndarray) -> np.ndarray:
        """What the sequences left of ``budget`` goes to the candidate maps with room, by share."""
        room = np.where(self._is_map, available - counts, 0)
        return split_budget(budget - int(counts.sum()), np.where(self._is_map, shares, 0.0), room)

    def _dirichlet(self, alphas: np.ndarray, candidates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        shares = np.zeros(len(self.modalities))
        if candidates.any():
            shares[candidates] = np.nan_to_num(rng.dirichlet(alphas[candidates]))
        return shares

    @staticmethod
    def _read(info: ModalityInfo, ids: np.ndarray) -> np.ndarray:
        """Maps: the flat grid. Sequences: the tokens up to EOS (trailing padding dropped), EOS appended
        if the stored row lacks it, since 4M masks EOS like any token. Pixels: the (S, S, 3) image,
        whose patches stand as the grid's ids (0: the model embeds the pixels, not an id)."""
        if info.layout == "pixels":
            shape = (info.image_size, info.image_size, 3)
            if np.shape(ids) != shape or np.asarray(ids).dtype != np.uint8:
                raise ValueError(f"{info.name}: expected a uint8 image of shape {shape}, got {np.shape(ids)}")
            return np.zeros(info.num_tokens, np.int64)
        ids = np.asarray(ids).reshape(-1).astype(np.int64)
        if info.layout == "map":
            if len(ids) != info.num_tokens:
                raise ValueError(f"{info.name}: {len(ids)} tokens, expected the grid's {info.num_tokens}")
            return ids
        if len(ids) > info.num_tokens:
            raise ValueError(f"{info.name}: {len(ids)} tokens, more than the cap of {info.num_tokens}")
        ends = np.flatnonzero((ids == info.eos_id) | (ids == info.pad_id))
        content = ids[: ends[0]] if len(ends) else ids[: info.num_tokens - 1]
        return np.append(content, info.eos_id)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


def collate(
    samples: Sequence[MaskedSample], input_budget: int, target_budget: int, pixel_sizes: Mapping[str, int] | None = None
) -> MaskedBatch:
    """Pads masked samples to exactly ``input_budget`` inputs and ``target_budget`` targets; stacks each
    pixel input's images (``pixel_sizes``: name -> side) as (B, S, S, 3) uint8, zeros where a sample has
    none among its inputs."""

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
        pixels={n: _stack([s.pixels.get(n) for s in samples], side) for n, side in (pixel_sizes or {}).items()},
    )


def _stack(images: list[np.ndarray | None], side: int) -> torch.Tensor:
    out = np.zeros((len(images), side, side, 3), np.uint8)
    for b, image in enumerate(images):
        if image is not None:
            out[b] = image
    return torch.from_numpy(out)
