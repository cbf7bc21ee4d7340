"""Any-to-any generation with a 4M model: given some modalities of a batch, generate others in turn.

Reads top to bottom: how one target is decoded (:class:`Decoding`), the schedules, the sampling
(guidance, temperature, top-k, top-p), then :class:`Generator`, which checks the inputs and decodes
each target the way the model was trained to predict it:

- **Maps** (MaskGIT, or ROAR as in 4M): every grid position starts masked. At each of ``steps``
  steps the encoder sees the conditioning plus the map's already-decoded tokens (as inputs of that
  modality at their grid positions), the decoder asks for every still-masked position at once (map
  queries attend to each other, as in training), and a token is sampled at each of them. ``maskgit``
  commits the ``n_t`` whose sampled token is most probable, ``roar`` ``n_t`` random ones; the rest
  are masked again. ``n_t`` follows MaskGIT's cosine schedule (few tokens first, when the map is
  least constrained) or a linear one, rounded so the counts are >= 1 and sum to the grid exactly:
  every position is filled once, in exactly ``steps`` steps. Every sample decodes as many tokens
  per step, so a step's tensors are unpadded and one encoder and one decoder pass serve the batch.
- **Sequences** (autoregressive): training shows a sequence hidden whole as the target
  ``S_0 content EOS`` with decoder input ``SOS S_0 content``, so the generator forces ``S_0``
  (never sampled) and samples ``content`` token by token, encoding the conditioning once and
  re-running the decoder on the prefix (no cache: sequences are short next to the encoder's work).
  PAD, SOS, UNK and every sentinel are masked out of the logits: PAD and SOS never appear inside
  stored content, UNK does but decodes to nothing (sampling it only wastes a token), and a
  sentinel would start another span that no input refers to. A sample stops at EOS or at
  ``max_tokens`` (EOS appended); the batch stops when all samples have.
- **Classifier-free guidance**: ``uncond + scale * (cond - uncond)``, the unconditional logits
  coming from the same step with the conditioning's input tokens removed (the target map's own
  decoded tokens stay; the model's context token keeps an empty input valid). Scale 1 runs no
  unconditional pass. It helps only as far as the model saw inputs dropped in training.
- **Chaining**: targets are generated in the given order and each result joins the conditioning
  of the next one whole (a map's full grid, a sequence's content), as if it had been given.

Choices: one ``torch.Generator`` on the model's device, seeded per call, drives every random draw
(no global RNG), so a call is reproducible on one device (CPU and CUDA draw different numbers).
Temperature 0 is greedy; the temperature schedules decay from ``temperature`` towards 0 over the
steps of a map or the tokens of a sequence. MaskGIT's confidence is the sampled token's
probability under the model's (guided) distribution, before temperature, top-k and top-p: those
shape what is drawn, not how sure the model is of it, and so greedy and top-k 1 decode alike.

Shapes in comments: B batch, G a map's grid positions, K its decoded positions, V its vocabulary,
N_c conditioning tokens, L a sequence's decoder length so far.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from four_m.core.config import check
from four_m.core.errors import UserError
from four_m.tokenize.base import TOKEN_DTYPE
from four_m.tokenize.text import SPECIAL_TOKENS, UNK
from four_m.train.batch import MaskedBatch
from four_m.train.masking import Masker, ModalityInfo
from four_m.train.model import FourM

ORDERS = ("maskgit", "roar")
SCHEDULES = ("cosine", "linear")
TEMPERATURE_SCHEDULES = ("constant", "linear", "cosine")
UNK_ID = SPECIAL_TOKENS.index(UNK)


class GenerationError(UserError):
    """Inputs that do not fit the model: unknown or repeated modalities, wrong lengths, bad ids."""


@dataclass(frozen=True)
class Decoding:
    """How one target modality is generated."""

    steps: int = 8
    """Maps: decoding steps; every masked position is filled exactly once over them (at most the grid)."""
    order: Literal["maskgit", "roar"] = "maskgit"
    """Maps: most-confident-first (MaskGIT) or random order (4M's ROAR)."""
    schedule: Literal["cosine", "linear"] = "cosine"
    """Maps: tokens committed per step; cosine commits few early, when the map is least constrained."""
    temperature: float = 1.0
    """0 is greedy (argmax)."""
    temperature_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Decay from ``temperature`` towards 0 over the steps (maps) or tokens (sequences)."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 is off."""
    top_p: float = 1.0
    """Nucleus: sample among the most likely tokens holding this much probability; 1.0 is off."""
    guidance: float = 1.0
    """Classifier-free guidance scale; 1.0 is the conditional model alone (no extra pass), 0 unconditional."""
    max_tokens: int | None = None
    """Sequences: cap on generated tokens, EOS included (default: the modality's stored cap)."""

    def __post_init__(self) -> None:
        check(self.steps >= 1, "decoding.steps", "must be >= 1")
        check(self.order in ORDERS, "decoding.order", f"unknown {self.order!r}; one of {', '.join(ORDERS)}")
        check(
            self.schedule in SCHEDULES, "decoding.schedule", f"unknown {self.schedule!r}; one of {', '.join(SCHEDULES)}"
        )
        check(self.temperature >= 0, "decoding.temperature", "must be >= 0 (0 is greedy)")
        check(
            self.temperature_schedule in TEMPERATURE_SCHEDULES,
            "decoding.temperature_schedule",
            f"unknown {self.temperature_schedule!r}; one of {', '.join(TEMPERATURE_SCHEDULES)}",
        )
        check(self.top_k >= 0, "decoding.top_k", "must be >= 0 (0 is off)")
        check(0 < self.top_p <= 1, "decoding.top_p", "must be in (0, 1] (1 is off)")
        check(self.guidance >= 0, "decoding.guidance", "must be >= 0 (1 is no guidance)")
        check(self.max_tokens is None or self.max_tokens >= 1, "decoding.max_tokens", "must be >= 1 (EOS included)")


# ---------------------------------------------------------------------------------------------
# Schedules


def commit_schedule(positions: int, steps: int, schedule: str = "cosine") -> list[int]:
    """Tokens committed at each of ``steps`` steps: each >= 1, summing to ``positions``.

    The fraction decoded after step t of T is ``1 - cos(pi/2 * t/T)`` (MaskGIT's cosine: the masked
    fraction is cos) or ``t/T``; rounding is repaired so every step commits at least one token.
    """
    check(1 <= steps <= positions, "decoding.steps", f"must be in [1, {positions}] (the grid's positions)")
    decoded_fraction = {
        "cosine": lambda r: 1 - math.cos(math.pi / 2 * r),
        "linear": lambda r: r,
    }[schedule]
    counts, done = [], 0
    for t in range(1, steps + 1):
        # At least one more than before, and leave at least one for each later step.
        total = min(max(round(positions * decoded_fraction(t / steps)), done + 1), positions - (steps - t))
        counts.append(total - done)
        done = total
    return counts


def temperature_at(decoding: Decoding, step: int, steps: int) -> float:
    """The temperature of step ``step`` (0-based) of ``steps``: ``decoding.temperature`` at step 0."""
    progress = step / steps
    factor = {
        "constant": 1.0,
        "linear": 1 - progress,
        "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
    }[decoding.temperature_schedule]
    return decoding.temperature * factor


# ---------------------------------------------------------------------------------------------
# Sampling


def guided(cond: Tensor, uncond: Tensor | None, scale: float) -> Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``; ``cond`` itself at scale 1."""
    if scale == 1 or uncond is None:
        return cond
    return uncond + scale * (cond - uncond)


def sample(
    logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """(..., V) float logits -> (...) sampled ids and (...) each one's probability under ``logits``
    themselves (before temperature, top-k and top-p: the model's own confidence, so greedy decoding
    and top-k 1 rank positions alike)."""
    probs = logits.softmax(dim=-1)  # (..., V)
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if temperature == 0:
        ids = logits.argmax(dim=-1)  # (...)
    else:
        logits = logits / temperature
        if top_p < 1:
            logits = _nucleus(logits, top_p)
        # Inverse CDF: one uniform per draw (torch.multinomial is several times slower on a CPU
        # over a 30k-word vocabulary). Tokens of probability 0 never match: their CDF step is flat.
        cdf = logits.softmax(dim=-1).cumsum(dim=-1)  # (..., V)
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


def _batch(inputs: _Tokens, m: int, position: Tensor, decoder_input: Tensor | None = None) -> MaskedBatch:
    """A model batch: ``inputs`` to encode, targets of modality ``m`` at ``position`` (B, N_tgt)."""
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
    )


# ---------------------------------------------------------------------------------------------
# The generator


class Generator:
    """Generates target modalities from given ones with a trained :class:`FourM` (put in eval mode).

    ``infos`` carry each modality's special ids (SOS, EOS, sentinels) and stored-sequence cap, in
    the model's modality order; by default ``ModalityInfo(name, kind, positions)`` with the text
    tokenizer's layout.
    """

    def __init__(self, model: FourM, infos: Sequence[ModalityInfo] | None = None):
        self.model = model.eval()
        names = [m.name for m in model.modalities]
        default = (ModalityInfo(m.name, m.kind, m.positions) for m in model.modalities)
        self.infos = tuple(infos if infos is not None else default)
        check(
            [(i.name, i.kind) for i in self.infos] == [(m.name, m.kind) for m in model.modalities],
            "generate.infos",
            f"must describe the model's modalities in its order: {', '.join(names)}",
        )
        for info, modality in zip(self.infos, model.modalities, strict=True):
            if info.kind == "sequence":
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
    ) -> dict[str, list[np.ndarray]]:
        """Generates ``targets`` in order, each conditioned on ``given`` and the targets before it.

        Args:
            given: modality -> one entry per sample: a map's full grid of ids, a sequence as the token
                store holds it (content, EOS, maybe PAD after); None where a sample lacks the modality.
                Unconditional generation: one modality with None for every sample.
            targets: (modality, how to decode it), generated in this order.
            seed: seeds the one random generator of the call.

        Returns:
            modality -> one ``TOKEN_DTYPE`` array per sample: a map's full grid, a sequence's content
            then EOS (the store's layout, which the tokenizers decode).
        """
        rows = self._read_given(given)  # per sample: {modality index: ids at positions 0..n-1}
        plan = self._read_targets(targets, given)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        out: dict[str, list[np.ndarray]] = {}
        for m, decoding in plan:
            conditioning = _Tokens.padded(rows, self.device)  # (B, N_c)
            if self.model.modalities[m].kind == "map":
                grids = self._decode_map(conditioning, m, decoding, generator).cpu().numpy()  # (B, G)
                results, contents = list(grids), list(grids)
            else:
                results = self._decode_sequence(conditioning, m, decoding, generator)
                contents = [ids[:-1] for ids in results]  # shown whole as an input: without EOS
            out[self.model.modalities[m].name] = [ids.astype(TOKEN_DTYPE) for ids in results]
            for row, content in zip(rows, contents, strict=True):
                row[m] = content  # chaining: the next target sees this one as if given
        return out

    # -- input checks -----------------------------------------------------------------------

    def _read_given(self, given: Mapping[str, Sequence[np.ndarray | None]]) -> list[dict[int, np.ndarray]]:
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
        for name, entries in given.items():
            m = self.model.modality_index(name)
            info, vocab_size = self.infos[m], self.model.modalities[m].vocab_size
            for b, ids in enumerate(entries):
                if ids is None:
                    continue
                try:
                    content = Masker._read(info, ids)  # maps: the grid; sequences: ids before EOS/PAD
                except ValueError as error:
                    raise GenerationError(f"given {name!r}, sample {b}: {error}") from None
                if content.size and not (0 <= content.min() and content.max() < vocab_size):
                    raise GenerationError(
                        f"given {name!r}, sample {b}: ids {content.min()}..{content.max()} are outside"
                        f" its vocabulary of {vocab_size} ids"
                    )
                rows[b][m] = content
        return rows

    def _read_targets(
        self, targets: Sequence[tuple[str, Decoding]], given: Mapping[str, object]
    ) -> list[tuple[int, Decoding]]:
        if not targets:
            raise GenerationError("targets: name at least one modality to generate")
        plan, seen = [], set()
        for name, decoding in targets:
            m = self.model.modality_index(name)
            if name in given:
                raise GenerationError(f"targets: {name!r} is also given; generate only what is missing")
            if name in seen:
                raise GenerationError(f"targets: {name!r} is repeated")
            if not isinstance(decoding, Decoding):
                raise GenerationError(f"targets: {name!r} needs a Decoding, got {type(decoding).__name__}")
            if self.model.modalities[m].kind == "map":
                commit_schedule(self.model.modalities[m].positions, decoding.steps, decoding.schedule)  # checks steps
            seen.add(name)
            plan.append((m, decoding))
        return plan

    # -- maps: MaskGIT / ROAR ---------------------------------------------------------------

    def _decode_map(self, conditioning: _Tokens, m: int, d: Decoding, generator: torch.Generator) -> Tensor:
        """-> (B, G) ids: every position committed once over ``d.steps`` steps."""
        B, G = conditioning.ids.shape[0], self.model.modalities[m].positions
        head = self.model.head(m)

        def logits(inputs: _Tokens, masked: Tensor) -> Tensor:
            batch = _batch(inputs, m, masked)
            return head(self.model.decode(batch, *self.model.encode(batch))).float()  # (B, G-K, V)

        tokens = torch.zeros(B, G, dtype=torch.long, device=self.device)
        decoded = torch.zeros(B, G, dtype=torch.bool, device=self.device)
        for step, count in enumerate(commit_schedule(G, d.steps, d.schedule)):
            # Every sample has decoded the same number K of positions, so both sets are rectangular.
            known = decoded.nonzero()[:, 1].view(B, -1)  # (B, K) grid positions, ascending
            masked = (~decoded).nonzero()[:, 1].view(B, -1)  # (B, G-K)
            own = _Tokens.of_modality(tokens.gather(1, known), m, known)
            cond = logits(conditioning.cat(own), masked)
            uncond = logits(own, masked) if d.guidance != 1 else None
            ids, probability = sample(
                guided(cond, uncond, d.guidance), temperature_at(d, step, d.steps), d.top_k, d.top_p, generator
            )  # (B, G-K) each
            if d.order == "roar":
                score = torch.rand(probability.shape, generator=generator, device=self.device)
            else:
                score = probability
            pick = score.topk(count, dim=1).indices  # (B, n_t) indices into `masked`
            where = masked.gather(1, pick)  # (B, n_t) grid positions
            tokens.scatter_(1, where, ids.gather(1, pick))
            decoded.scatter_(1, where, True)
        return tokens

    # -- sequences: autoregressive ----------------------------------------------------------

    def _decode_sequence(
        self, conditioning: _Tokens, m: int, d: Decoding, generator: torch.Generator
    ) -> list[np.ndarray]:
        """-> per sample the generated content then EOS, at most ``max_tokens`` ids."""
        info, head = self.infos[m], self.model.head(m)
        B, device = conditioning.ids.shape[0], self.device
        cap = d.max_tokens or info.num_tokens
        nothing = _Tokens(*(t[:, :0] for t in conditioning.parts()))  # (B, 0): no inputs
        no_targets = torch.zeros(B, 0, dtype=torch.long, device=device)
        memory = self.model.encode(_batch(conditioning, m, no_targets))
        uncond_memory = self.model.encode(_batch(nothing, m, no_targets)) if d.guidance != 1 else None
        vocab_size = self.model.modalities[m].vocab_size
        forbidden = torch.tensor(
            [i for i in (info.pad_id, info.sos_id, UNK_ID, *info.sentinel_ids) if i < vocab_size], device=device
        )

        def logits(inputs: _Tokens, encoded: tuple[Tensor, Tensor], decoder_input: Tensor) -> Tensor:
            position = torch.arange(decoder_input.shape[1], device=device).expand(B, -1)  # (B, L)
            batch = _batch(inputs, m, position, decoder_input)
            return head(self.model.decode(batch, *encoded)[:, -1]).float()  # (B, V): the next token's

        # Target so far: S_0 (forced, as in training), then the sampled content; decoder input: SOS + it.
        decoder_input = torch.tensor([info.sos_id, info.first_sentinel_id], device=device).expand(B, -1)  # (B, 2)
        # EOS-filled, so a sample that reaches the cap ends with one; what a sample draws after its
        # first EOS (the batch runs on until all have one) is cut off below.
        generated = torch.full((B, cap), info.eos_id, dtype=torch.long, device=device)  # (B, cap)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for j in range(cap - 1):  # the last of `cap` tokens is always EOS
            cond = logits(conditioning, memory, decoder_input)
            uncond = logits(nothing, uncond_memory, decoder_input) if uncond_memory is not None else None
            scores = guided(cond, uncond, d.guidance)
            scores[:, forbidden] = -math.inf
            ids, _ = sample(scores, temperature_at(d, j, cap - 1), d.top_k, d.top_p, generator)  # (B,)
            generated[:, j] = ids
            done |= ids == info.eos_id
            if bool(done.all()):
                break
            decoder_input = torch.cat([decoder_input, ids[:, None]], dim=1)  # (B, L + 1)
        ends = (generated == info.eos_id).int().argmax(dim=1).tolist()  # first EOS of each sample
        return [row[: end + 1] for row, end in zip(generated.cpu().numpy(), ends, strict=True)]
