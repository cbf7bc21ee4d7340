"""Any-to-any generation with a 4M model: given some modalities of a batch, generate others in turn.

Reads top to bottom: how one target is decoded (:class:`Decoding`), the schedules, the sampling
(guidance, temperature, top-k, top-p), then :class:`Generator`, which checks the inputs and decodes
each target the way the model was trained to predict it:

- **Maps** (MaskGIT, or ROAR as in 4M): every grid position to generate starts masked (in-painting
  keeps some given). At each of ``steps`` steps the encoder sees the conditioning plus the map's
  already-decoded tokens (as inputs of that modality at their grid positions). ``maskgit`` asks the
  decoder for every still-masked position at once (map queries attend to each other, as in
  training), samples a token at each and commits the ``n_t`` most confident; ``roar`` draws ``n_t``
  random masked positions first and asks the decoder for those alone. ``n_t`` follows
  :func:`commit_schedule` (4M's symmetric cosine by default), so every position is filled once in
  ``steps`` steps. Every sample decodes as many tokens per step, so a step's tensors are unpadded
  and one encoder and one decoder pass per guidance pass serve the batch.
- **Sequences** (autoregressive): training shows a sequence hidden whole, as 4M does, with decoder
  input ``S_0 content EOS`` and target ``content EOS S_1``, so the generator starts the decoder at
  ``S_0`` (never sampled) and samples ``content`` token by token, encoding the conditioning once and
  re-running the decoder on the prefix (no cache: sequences are short next to the encoder's work).
  PAD, SOS, UNK and every sentinel are masked out of the logits: PAD and SOS never appear inside
  stored content, UNK does but decodes to nothing (sampling it only wastes a token), and a
  sentinel would start another span that no input refers to. A sample stops at EOS or at
  ``max_tokens`` (EOS appended); the batch stops when all samples have.
- **Classifier-free guidance** (:func:`guided`): ``uncond + sum_i w_i (cond_i - uncond)``, 4M's
  multi-condition form. A scale guides by all inputs together (one condition); a mapping by each
  named input modality on its own, the unnamed ones conditioning every pass. The unconditional
  pass drops the guided inputs (the target's own decoded tokens stay; the model's context token
  keeps an empty input valid). Scale 1 runs no extra pass. It helps only as far as the model saw
  inputs dropped in training.
- **Chaining**: targets are generated in the given order and each result joins the conditioning
  of the next one whole (a map's full grid, a sequence's content), as if it had been given.

Choices: one ``torch.Generator`` on the model's device, seeded per call, drives every random draw
(no global RNG), so a call is reproducible on one device (CPU and CUDA draw different numbers).
Temperature 0 is greedy; :func:`temperatures` decays the temperature with the share of tokens
decoded (4M's schedules). MaskGIT's confidence is the sampled token's probability under the
distribution it was drawn from, after temperature, top-k and top-p, as 4M ranks positions.

Shapes in comments: B batch, G a map's grid positions, K its decoded positions, V its vocabulary,
N_c conditioning tokens, L a sequence's decoder length so far.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from four_m.core.config import GenerateConfig, check
from four_m.core.errors import UserError
from four_m.tokenize.base import TOKEN_DTYPE
from four_m.tokenize.text import SPECIAL_TOKENS, UNK
from four_m.train.batch import MaskedBatch
from four_m.train.masking import Masker, ModalityInfo, chunk_view
from four_m.train.model import FourM

ORDERS = GenerateConfig.ORDERS
SCHEDULES = GenerateConfig.SCHEDULES
UNK_ID = SPECIAL_TOKENS.index(UNK)
TO_GENERATE = -1
"""In a partly given target grid (in-painting), the id of a position to generate."""


class GenerationError(UserError):
    """Inputs that do not fit the model: unknown or repeated modalities, wrong lengths, bad ids."""


@dataclass(frozen=True)
class Decoding:
    """How one target modality is generated."""

    steps: int = 8
    """Maps: decoding steps; every position to generate is filled exactly once over them."""
    order: Literal["maskgit", "roar"] = "maskgit"
    """Maps: most-confident-first (MaskGIT) or random order (4M's ROAR)."""
    schedule: Literal["cosine", "linear", "maskgit_cosine"] = "cosine"
    """Maps: tokens committed per step (:func:`commit_schedule`)."""
    temperature: float = 1.0
    """0 is greedy (argmax)."""
    temperature_schedule: str = "constant"
    """constant, linear or ``onex:{min_t}:{power}`` (:func:`temperatures`)."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 is off."""
    top_p: float = 1.0
    """Nucleus: sample among the most likely tokens holding this much probability; 1.0 is off."""
    guidance: float | Mapping[str, float] = 1.0
    """Classifier-free guidance: one scale for all the conditioning together (1.0: the conditional model
    alone, no extra pass; 0: unconditional), or a weight per conditioning modality (:func:`guided`)."""
    max_tokens: int | None = None
    """Sequences: cap on generated tokens, EOS included (default: the modality's stored cap)."""

    def __post_init__(self) -> None:
        check(self.steps >= 1, "decoding.steps", "must be >= 1")
        check(self.order in ORDERS, "decoding.order", f"unknown {self.order!r}; one of {', '.join(ORDERS)}")
        check(
            self.schedule in SCHEDULES, "decoding.schedule", f"unknown {self.schedule!r}; one of {', '.join(SCHEDULES)}"
        )
        check(self.temperature >= 0, "decoding.temperature", "must be >= 0 (0 is greedy)")
        GenerateConfig.onex(self.temperature_schedule, "decoding.temperature_schedule")
        check(self.top_k >= 0, "decoding.top_k", "must be >= 0 (0 is off)")
        check(0 < self.top_p <= 1, "decoding.top_p", "must be in (0, 1] (1 is off)")
        GenerateConfig.check_guidance(
            dict(self.guidance) if isinstance(self.guidance, Mapping) else self.guidance, "decoding.guidance"
        )
        check(self.max_tokens is None or self.max_tokens >= 1, "decoding.max_tokens", "must be >= 1 (EOS included)")


# ---------------------------------------------------------------------------------------------
# Schedules


def commit_schedule(positions: int, steps: int, schedule: str = "cosine") -> list[int]:
    """Tokens committed at each of ``steps`` steps, summing to ``positions``.

    ``cosine`` is 4M's (``cosine_schedule`` of ml-4m's ``fourm/utils/generation.py``): the masked
    share before step t of T is ``(1 + cos(pi t/T)) / 2``, so the counts rise and fall symmetrically
    (196 in 8: 7, 21, 32, 38, 38, 32, 21, 7); a step may commit 0 (small grids, many steps).
    ``linear`` is even, larger counts first (4M's ``linear_schedule``, its ROAR schedule).
    ``maskgit_cosine`` is MaskGIT's: the masked share after step t is ``cos(pi/2 t/T)``, few tokens
    first and most last, each step >= 1.
    """
    check(1 <= steps <= positions, "decoding.steps", f"must be in [1, {positions}] (the positions to generate)")
    return {"cosine": _symmetric_cosine, "linear": _even, "maskgit_cosine": _rising_cosine}[schedule](positions, steps)


def _symmetric_cosine(positions: int, steps: int) -> list[int]:
    """4M's rounding: each step's share rounded on its own, the last step takes the rest. For some
    pairs that rest is negative (6 in 5 steps: 1, 2, 2, 2, -1); there the cumulative share is rounded."""
    masked = [(1 + math.cos(math.pi * t / steps)) / 2 for t in range(steps)]  # before each step
    counts = [round(positions * (before - after)) for before, after in itertools.pairwise(masked)]
    counts.append(positions - sum(counts))
    if counts[-1] >= 0:
        return counts
    decoded = [round(positions * (1 - share)) for share in masked[1:]] + [positions]  # after each step
    return [now - before for before, now in itertools.pairwise([0, *decoded])]


def _even(positions: int, steps: int) -> list[int]:
    base, extra = divmod(positions, steps)
    return [base + 1] * extra + [base] * (steps - extra)


def _rising_cosine(positions: int, steps: int) -> list[int]:
    """Rounding is repaired so every step commits at least one token."""
    counts, done = [], 0
    for t in range(1, steps + 1):
        # At least one more than before, and leave at least one for each later step.
        decoded = round(positions * (1 - math.cos(math.pi / 2 * t / steps)))
        total = min(max(decoded, done + 1), positions - (steps - t))
        counts.append(total - done)
        done = total
    return counts


def temperatures(decoding: Decoding, counts: Sequence[int]) -> list[float]:
    """The temperature of each step committing ``counts`` tokens (a sequence: one token per step).

    As 4M (ml-4m ``fourm/utils/generation.py``), both decays follow the tokens decoded, not the
    step index, so a step committing many tokens cools the next one more:

    - ``linear`` (``linear_temp_schedule``): ``temperature`` times the share still masked before
      the step: the full temperature first, ``temperature * counts[-1] / total`` last.
    - ``onex:{min_t}:{power}`` (``onex_temp_schedule``): ``min_t + (temperature - min_t) * y_s *
      (1 - decoded_s / total)``, with ``decoded_s`` the tokens decoded after step s and ``y`` the
      curve ``x^-power`` over ``x = linspace(1, 100, total)``, scaled to [0, 1]; 4M reads it at the
      step index ``s`` (not at the tokens decoded), and so do we, to give its numbers. It ends at
      ``min_t``; 4M clips at 1e-9, where temperature 0 here is greedy, the same limit.
    """
    temperature, total = decoding.temperature, max(sum(counts), 1)  # no steps: a sequence capped at EOS
    decoded = np.cumsum(counts) / total  # (steps,) share decoded once each step is done
    if decoding.temperature_schedule == "constant":
        return [temperature] * len(counts)
    if decoding.temperature_schedule == "linear":
        return [float(temperature * (1 - before)) for before in decoded - np.asarray(counts) / total]
    min_t, power = GenerateConfig.onex(decoding.temperature_schedule, "decoding.temperature_schedule")
    y = np.linspace(1, 100, total) ** -power
    y = (y - y.min()) / (y.max() - y.min()) if total > 1 else np.ones(1)
    return [float(min_t + (temperature - min_t) * y[s] * (1 - decoded[s])) for s in range(len(counts))]


# ---------------------------------------------------------------------------------------------
# Sampling


def guided(uncond: Tensor, conds: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Classifier-free guidance over several conditions: ``uncond + sum_i w_i (cond_i - uncond)``.

    This is 4M's multi-condition form (``multi_guided_maskgit_step_batched`` in ml-4m's
    ``fourm/models/generate.py``, after Liu et al. 2022, arXiv 2206.01714): ``cond_i`` is the model
    given condition i, ``uncond`` given none of the guided ones. One condition of weight w is the
    usual ``uncond + w (cond - uncond)``.
    """
    return uncond + sum(w * (cond - uncond) for w, cond in zip(weights, conds, strict=True))


def sample(
    logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """(..., V) float logits -> (...) sampled ids and (...) each one's probability under the
    distribution drawn from: tempered, then top-k and top-p filtered, renormalised.

    That probability is MaskGIT's confidence, as in 4M (``sample_tokens``): a position whose draw
    the filters made certain ranks first. Greedy (temperature 0) uses the filtered distribution at
    temperature 1: its limit at 0 gives every argmax probability 1, which would rank nothing.
    """
    logits = logits / (temperature or 1.0)
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1:
        logits = _nucleus(logits, top_p)
    probs = logits.softmax(dim=-1)  # (..., V)
    if temperature == 0:
        ids = probs.argmax(dim=-1)  # (...)
    else:
        # Inverse CDF: one uniform per draw (torch.multinomial is several times slower on a CPU
        # over a 30k-word vocabulary). Tokens of probability 0 never match: their CDF step is flat.
        cdf = probs.cumsum(dim=-1)  # (..., V)
        u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device) * cdf[..., -1:]  # (..., 1)
        ids = torch.searchsorted(cdf, u, right=True)[..., 0].clamp_(max=cdf.shape[-1] - 1)  # (...)
    return ids, probs.gather(-1, ids[..., None])[..., 0]


def _nucleus(logits: Tensor, top_p: float) -> Tensor:
    """Masks the tokens outside the smallest most-likely set holding ``top_p`` of the probability."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (..., V)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens; 0 for the first, always kept
    drop_sorted = before >= top_p
    return logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -math.inf)


def keep_share(grids: Sequence[np.ndarray], share: float, seed: int) -> list[np.ndarray]:
    """In-painting inputs: each grid with ``round(share * G)`` positions, drawn with ``seed``, kept
    and the rest set to :data:`TO_GENERATE`. Every grid keeps as many, so the batch decodes in step."""
    rng = np.random.default_rng(seed)
    out = []
    for grid in grids:
        partial = np.full(len(grid), TO_GENERATE, np.int64)
        kept = rng.permutation(len(grid))[: round(share * len(grid))]
        partial[kept] = grid[kept]
        out.append(partial)
    return out


# ---------------------------------------------------------------------------------------------
# Encoder inputs of a batch


@dataclass(frozen=True)
class _Tokens:
    """Encoder input tokens, (B, N) each; padding has ``mask`` False."""

    ids: Tensor
    modality: Tensor
    position: Tensor
    mask: Tensor

    @classmethod
    def of_modality(cls, ids: Tensor, m: int, position: Tensor) -> _Tokens:
        """(B, N) ids of modality ``m`` at ``position``, all real."""
        return cls(ids, torch.full_like(ids, m), position, torch.ones_like(ids, dtype=torch.bool))

    @classmethod
    def padded(cls, rows: Sequence[Mapping[int, np.ndarray]], device: torch.device) -> _Tokens:
        """Per sample {modality index: its ids at positions 0..n-1} -> one padded batch (B, N_c)."""
        lengths = [sum(len(ids) for ids in row.values()) for row in rows]
        out = np.zeros((3, len(rows), max(lengths, default=0)), np.int64)  # ids, modality, position
        for b, row in enumerate(rows):
            at = 0
            for m, ids in row.items():
                span = slice(at, at + len(ids))
                out[0, b, span], out[1, b, span], out[2, b, span] = ids, m, np.arange(len(ids))
                at += len(ids)
        ids, modality, position = torch.from_numpy(out).to(device)
        mask = torch.arange(out.shape[2], device=device) < torch.tensor(lengths, device=device)[:, None]
        return cls(ids, modality, position, mask)

    def cat(self, other: _Tokens) -> _Tokens:
        return _Tokens(*(torch.cat([a, b], dim=1) for a, b in zip(self.parts(), other.parts(), strict=True)))

    def parts(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.ids, self.modality, self.position, self.mask


def _batch(
    inputs: _Tokens, m: int, position: Tensor, pixels: Mapping[str, Tensor], decoder_input: Tensor | None = None
) -> MaskedBatch:
    """A model batch: ``inputs`` to encode (pixel inputs' patches from ``pixels``), targets of
    modality ``m`` at ``position`` (B, N_tgt)."""
    return MaskedBatch(
        input_ids=inputs.ids,
        input_modality=inputs.modality,
        input_position=inputs.position,
        input_mask=inputs.mask,
        target_ids=torch.zeros_like(position),  # unknown: what is being generated
        target_modality=torch.full_like(position, m),
        target_position=position,
        target_mask=torch.ones_like(position, dtype=torch.bool),
        decoder_input_ids=decoder_input if decoder_input is not None else torch.zeros_like(position),
        pixels=dict(pixels),
    )


@dataclass(frozen=True)
class _Guidance:
    """The encoder inputs of a step's passes and the weights that combine their logits.

    Unguided: one pass, the whole conditioning. Guided: the unconditional pass first (the
    conditioning without any guided modality), then one per condition (those inputs plus it). A
    target's own decoded or kept tokens join every pass.
    """

    passes: tuple[_Tokens, ...]
    weights: tuple[float, ...]
    """One per condition; empty: unguided."""
    pixels: Mapping[str, Tensor]
    """Pixel input name -> (B, S, S, 3) images, for the passes whose inputs include its patches."""

    @classmethod
    def of(
        cls,
        rows: Sequence[Mapping[int, np.ndarray]],
        conditions: Sequence[tuple[frozenset[int], float]],
        pixels: Mapping[str, Tensor],
        device: torch.device,
    ) -> _Guidance:
        """``conditions``: (modality indices shown together, weight) each; none: unguided."""
        guided_ = frozenset().union(*(shown for shown, _ in conditions))  # left out of the unconditional pass

        def inputs(shown: frozenset[int]) -> _Tokens:
            return _Tokens.padded(
                [{k: v for k, v in r.items() if k in shown or k not in guided_} for r in rows], device
            )

        passes = (inputs(frozenset()), *(inputs(shown) for shown, _ in conditions))
        return cls(passes, tuple(w for _, w in conditions), pixels)

    def combine(self, logits: Sequence[Tensor]) -> Tensor:
        """Each pass's logits, in ``passes`` order -> the guided logits."""
        return guided(logits[0], logits[1:], self.weights) if self.weights else logits[0]


# ---------------------------------------------------------------------------------------------
# The generator


class Generator:
    """Generates target modalities from given ones with a trained :class:`FourM` (put in eval mode).

    ``infos`` carry each modality's special ids (SOS, EOS, sentinels) and stored-sequence cap, in
    the model's modality order; by default ``ModalityInfo(name, layout, positions)`` with the text
    tokenizer's layout.
    """

    def __init__(self, model: FourM, infos: Sequence[ModalityInfo] | None = None):
        self.model = model.eval()
        names = [m.name for m in model.modalities]
        default = (ModalityInfo(m.name, m.layout, m.positions, image_size=m.image_size) for m in model.modalities)
        self.infos = tuple(infos if infos is not None else default)
        check(
            [(i.name, i.layout) for i in self.infos] == [(m.name, m.layout) for m in model.modalities],
            "generate.infos",
            f"must describe the model's modalities in its order: {', '.join(names)}",
        )
        for info, modality in zip(self.infos, model.modalities, strict=True):
            if info.layout == "sequence":
                specials = {"SOS": info.sos_id, "EOS": info.eos_id, "S_0": info.first_sentinel_id}
                for what, id_ in specials.items():
                    check(
                        0 <= id_ < modality.vocab_size,
                        f"generate.infos.{info.name}",
                        f"{what} id {id_} is outside the vocabulary of {modality.vocab_size} ids",
                    )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def generate(
        self,
        given: Mapping[str, Sequence[np.ndarray | None]],
        targets: Sequence[tuple[str, Decoding]],
        seed: int = 0,
        partial: Mapping[str, Sequence[np.ndarray]] | None = None,
    ) -> dict[str, list[np.ndarray]]:
        """Generates ``targets`` in order, each conditioned on ``given`` and the targets before it.

        Args:
            given: modality -> one entry per sample: a map's full grid of ids, a sequence as the token
                store holds it (content, EOS, maybe PAD after), a pixel input's (S, S, 3) uint8 image
                (every patch shown); None where a sample lacks the modality.
                Unconditional generation: one modality with None for every sample.
            targets: (modality, how to decode it), generated in this order.
            seed: seeds the one random generator of the call.
            partial: in-painting: a target map -> per sample its grid with the given ids kept and
                :data:`TO_GENERATE` elsewhere (:func:`keep_share`); every sample keeps as many. Only
                the rest is generated; kept ids are never changed.

        Returns:
            modality -> one ``TOKEN_DTYPE`` array per sample: a map's full grid, a sequence's content
            then EOS (the store's layout, which the tokenizers decode).
        """
        rows, pixels = self._read_given(given)  # per sample: {modality index: ids at positions 0..n-1}
        plan = self._read_targets(targets, given, partial or {}, len(rows))
        generator = torch.Generator(device=self.device).manual_seed(seed)
        out: dict[str, list[np.ndarray]] = {}
        for m, decoding, kept in plan:
            guidance = _Guidance.of(rows, self._conditions(rows, decoding), pixels, self.device)
            if self.model.modalities[m].layout == "map":
                grids = self._decode_map(guidance, m, decoding, kept, generator).cpu().numpy()  # (B, G)
                results, contents = list(grids), list(grids)
            else:
                results = self._decode_sequence(guidance, m, decoding, generator)
                contents = results  # shown whole as an input: with its EOS, as training shows a visible one
            out[self.model.modalities[m].name] = [ids.astype(TOKEN_DTYPE) for ids in results]
            if self.model.modalities[m].as_input:  # a target-only modality has nothing to be read with
                for row, content in zip(rows, contents, strict=True):
                    row[m] = content  # chaining: the next target sees this one as if given
        return out

    # -- input checks -----------------------------------------------------------------------

    def _read_given(
        self, given: Mapping[str, Sequence[np.ndarray | None]]
    ) -> tuple[list[dict[int, np.ndarray]], dict[str, Tensor]]:
        """-> per sample {modality index: ids}, and per pixel input its (B, S, S, 3) images (zeros where
        a sample lacks it; its ids are placeholders for the patches)."""
        if not given:
            raise GenerationError(
                "given: needs at least one modality with one entry per sample (None entries for unconditional)"
            )
        lengths = {name: len(entries) for name, entries in given.items()}
        if len(set(lengths.values())) > 1:
            raise GenerationError(f"given: every modality needs one entry per sample; got lengths {lengths}")
        if not next(iter(lengths.values())):
            raise GenerationError("given: empty batch (no samples)")
        rows: list[dict[int, np.ndarray]] = [{} for _ in range(next(iter(lengths.values())))]
        pixels: dict[str, Tensor] = {}
        for name, entries in given.items():
            m = self.model.modality_index(name)
            info, vocab_size = self.infos[m], self.model.modalities[m].vocab_size
            if not self.model.modalities[m].as_input and any(ids is not None for ids in entries):
                raise GenerationError(f"given {name!r}: this model only predicts it (no input embedding to read it)")
            if info.layout == "pixels":
                side = info.image_size
                pixels[name] = torch.zeros(len(rows), side, side, 3, dtype=torch.uint8, device=self.device)
            for b, ids in enumerate(entries):
                if ids is None:
                    continue
                try:
                    # maps: the grid; sequences: ids up to EOS (a chunked one as a given input shows it)
                    content, _ = chunk_view(info, Masker._read(info, ids), None)
                except ValueError as error:
                    raise GenerationError(f"given {name!r}, sample {b}: {error}") from None
                if info.layout == "pixels":
                    pixels[name][b] = torch.from_numpy(np.ascontiguousarray(ids))
                elif content.size and not (0 <= content.min() and content.max() < vocab_size):
                    raise GenerationError(
                        f"given {name!r}, sample {b}: ids {content.min()}..{content.max()} are outside"
                        f" its vocabulary of {vocab_size} ids"
                    )
                rows[b][m] = content
        return rows, pixels

    def _read_targets(
        self,
        targets: Sequence[tuple[str, Decoding]],
        given: Mapping[str, object],
        partial: Mapping[str, Sequence[np.ndarray]],
        batch: int,
    ) -> list[tuple[int, Decoding, Tensor | None]]:
        """-> (modality index, decoding, (B, G) partial grid or None) per target, in order."""
        if not targets:
            raise GenerationError("targets: name at least one modality to generate")
        names = [name for name, _ in targets]
        if set(partial) - set(names):
            raise GenerationError(f"partial: {sorted(set(partial) - set(names))} are not targets")
        plan, seen = [], set()
        for name, decoding in targets:
            m = self.model.modality_index(name)
            if name in given:
                raise GenerationError(f"targets: {name!r} is also given; generate only what is missing")
            if name in seen:
                raise GenerationError(f"targets: {name!r} is repeated")
            if self.model.modalities[m].layout == "pixels":
                raise GenerationError(f"targets: {name!r} is a pixel input: nothing generates pixels")
            if not self.model.modalities[m].as_target:
                raise GenerationError(f"targets: {name!r} is only an input of this model: it has no head to predict it")
            if not isinstance(decoding, Decoding):
                raise GenerationError(f"targets: {name!r} needs a Decoding, got {type(decoding).__name__}")
            for condition in decoding.guidance if isinstance(decoding.guidance, Mapping) else ():
                self.model.modality_index(condition)
            kept = self._read_partial(name, m, partial[name], batch) if name in partial else None
            if self.model.modalities[m].layout == "map":
                left = self.model.modalities[m].positions - (0 if kept is None else int((kept[0] >= 0).sum()))
                commit_schedule(left, decoding.steps, decoding.schedule)  # checks steps
            seen.add(name)
            plan.append((m, decoding, kept))
        return plan

    def _read_partial(self, name: str, m: int, grids: Sequence[np.ndarray], batch: int) -> Tensor:
        """A target's partial grids -> (B, G) ids, :data:`TO_GENERATE` where to generate."""
        modality = self.model.modalities[m]
        if modality.layout != "map":
            raise GenerationError(f"partial {name!r}: only a map can be given in part")
        shapes = {np.shape(grid) for grid in grids}
        if len(grids) != batch or shapes != {(modality.positions,)}:
            raise GenerationError(f"partial {name!r}: needs {batch} grids of {modality.positions} ids; got {shapes}")
        ids = np.stack([np.asarray(grid, np.int64) for grid in grids])  # (B, G)
        if ((ids < TO_GENERATE) | (ids >= modality.vocab_size)).any():
            raise GenerationError(f"partial {name!r}: ids must be {TO_GENERATE} or in [0, {modality.vocab_size})")
        kept = set((ids >= 0).sum(axis=1).tolist())
        if len(kept) > 1:
            raise GenerationError(f"partial {name!r}: every sample must keep as many positions; got {sorted(kept)}")
        if kept == {modality.positions}:
            raise GenerationError(f"partial {name!r}: every position is kept, nothing to generate")
        return torch.from_numpy(ids).to(self.device)

    def _conditions(self, rows: Sequence[Mapping[int, np.ndarray]], d: Decoding) -> list[tuple[frozenset[int], float]]:
        """The guided conditions of a target: a scale guides by all inputs together, a mapping by each
        named modality present (one not there yet, such as a later target, is left out)."""
        present = frozenset(k for row in rows for k in row)
        if isinstance(d.guidance, Mapping):
            weights = {self.model.modality_index(name): float(w) for name, w in d.guidance.items()}
            return [(frozenset({k}), w) for k, w in weights.items() if k in present]
        return [] if d.guidance == 1 else [(present, float(d.guidance))]

    # -- maps: MaskGIT / ROAR ---------------------------------------------------------------

    def _decode_map(
        self, guidance: _Guidance, m: int, d: Decoding, kept: Tensor | None, generator: torch.Generator
    ) -> Tensor:
        """-> (B, G) ids: ``kept`` ones as given, every other position committed once over ``d.steps`` steps."""
        B, G = guidance.passes[0].ids.shape[0], self.model.modalities[m].positions
        head = self.model.head(m)

        def logits(own: _Tokens, where: Tensor) -> Tensor:
            """(B, n) grid positions -> (B, n, V) guided logits there, given the map's ``own`` tokens."""
            per_pass = []
            for inputs in guidance.passes:
                batch = _batch(inputs.cat(own), m, where, guidance.pixels)
                per_pass.append(head(self.model.decode(batch, *self.model.encode(batch))).float())
            return guidance.combine(per_pass)

        if kept is None:
            kept = torch.full((B, G), TO_GENERATE, dtype=torch.long, device=self.device)
        tokens, decoded = kept.clamp(min=0), kept != TO_GENERATE  # (B, G) each
        counts = commit_schedule(G - int(decoded[0].sum()), d.steps, d.schedule)
        for count, temperature in zip(counts, temperatures(d, counts), strict=True):
            if not count:
                continue  # 4M's cosine leaves some steps of a small grid empty: no pass for them
            # Every sample has decoded the same number K of positions, so both sets are rectangular.
            known = decoded.nonzero()[:, 1].view(B, -1)  # (B, K) grid positions, ascending
            masked = (~decoded).nonzero()[:, 1].view(B, -1)  # (B, G-K)
            own = _Tokens.of_modality(tokens.gather(1, known), m, known)
            if d.order == "roar":
                # Random order: draw this step's positions first, and ask the decoder for those alone.
                draw = torch.rand(masked.shape, generator=generator, device=self.device)  # (B, G-K)
                where = masked.gather(1, draw.argsort(dim=1)[:, :count])  # (B, n_t)
                ids, _ = sample(logits(own, where), temperature, d.top_k, d.top_p, generator)  # (B, n_t)
            else:
                ids, confidence = sample(logits(own, masked), temperature, d.top_k, d.top_p, generator)  # (B, G-K)
                pick = confidence.topk(count, dim=1).indices  # (B, n_t) indices into `masked`
                where, ids = masked.gather(1, pick), ids.gather(1, pick)  # (B, n_t) each
            tokens.scatter_(1, where, ids)
            decoded.scatter_(1, where, True)
        return tokens

    # -- sequences: autoregressive ----------------------------------------------------------

    def _decode_sequence(
        self, guidance: _Guidance, m: int, d: Decoding, generator: torch.Generator
    ) -> list[np.ndarray]:
        """-> per sample the generated content then EOS, at most ``max_tokens`` ids."""
        info, head = self.infos[m], self.model.head(m)
        B, device = guidance.passes[0].ids.shape[0], self.device
        cap = d.max_tokens or info.num_tokens
        no_targets = torch.zeros(B, 0, dtype=torch.long, device=device)
        memories = [self.model.encode(_batch(inputs, m, no_targets, guidance.pixels)) for inputs in guidance.passes]
        vocab_size = self.model.modalities[m].vocab_size
        forbidden = torch.tensor(
            [i for i in (info.pad_id, info.sos_id, UNK_ID, *info.sentinel_ids) if i < vocab_size], device=device
        )

        def logits(decoder_input: Tensor) -> Tensor:
            """(B, V) guided logits of the next token."""
            position = torch.arange(decoder_input.shape[1], device=device).expand(B, -1)  # (B, L)
            per_pass = []
            for inputs, memory in zip(guidance.passes, memories, strict=True):
                batch = _batch(inputs, m, position, guidance.pixels, decoder_input)
                per_pass.append(head(self.model.decode(batch, *memory)[:, -1]).float())
            return guidance.combine(per_pass)

        # Decoder input: S_0 (the hidden span's sentinel, as in training), then the sampled content.
        decoder_input = torch.tensor([info.first_sentinel_id], device=device).expand(B, -1)  # (B, 1)
        # EOS-filled, so a sample that reaches the cap ends with one; what a sample draws after its
        # first EOS (the batch runs on until all have one) is cut off below.
        generated = torch.full((B, cap), info.eos_id, dtype=torch.long, device=device)  # (B, cap)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        # One token a step; the last of `cap` tokens is always EOS.
        for j, temperature in enumerate(temperatures(d, [1] * (cap - 1))):
            scores = logits(decoder_input)
            scores[:, forbidden] = -math.inf
            ids, _ = sample(scores, temperature, d.top_k, d.top_p, generator)  # (B,)
            generated[:, j] = ids
            done |= ids == info.eos_id
            if bool(done.all()):
                break
            decoder_input = torch.cat([decoder_input, ids[:, None]], dim=1)  # (B, L + 1)
        ends = (generated == info.eos_id).int().argmax(dim=1).tolist()  # first EOS of each sample
        return [row[: end + 1] for row, end in zip(generated.cpu().numpy(), ends, strict=True)]
