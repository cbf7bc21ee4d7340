"""The 4M encoder-decoder: tokens of any modalities in, tokens of any modalities out.

Reads top to bottom: the config and its named sizes, what the model needs to know about each of the
run's modalities, the fixed positional embeddings, the transformer blocks, then the model itself
(embed -> encode -> decode -> one head per vocabulary) and 4M's loss.

A ``MaskedBatch`` is one flat, padded run of tokens per sample in which every token carries its
modality and its position inside that modality, so the model never cares which mix of modalities a
sample drew: a token's embedding is its id's (in its modality's table) + its modality's + its
position's. The decoder predicts every target token at once. Map targets start from a learned mask
token and attend to the other targets of their modality (MaskGIT-style); sequence targets are
teacher-forced and causal within their sequence. Both read the encoder through cross-attention, as
4M does: to a context made of the encoder's output, linearly projected, plus each input token's
modality and position embeddings added back, and layer-normed afresh in every decoder block.

Shapes in comments: B batch, N_in input tokens, N_tgt target tokens, S = 1 + N_in encoder tokens,
D width, H heads, M modalities, n_m the real target tokens of modality m in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from four_m.core.config import check
from four_m.core.errors import UserError
from four_m.core.modalities import ModalitySpec
from four_m.train.batch import MaskedBatch

# ---------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 384
    """Width of every token; a multiple of 4 (2D sin-cos: half for rows, half for columns, sin + cos)."""
    encoder_layers: int = 6
    decoder_layers: int = 6
    heads: int = 6
    """Attention heads; must divide ``dim``."""
    mlp_ratio: float = 4.0
    """MLP width over ``dim`` as for a GELU MLP; SwiGLU uses 2/3 of it, so its three matrices cost the same."""
    dropout: float = 0.0
    """On embeddings, attention weights and residual branches. 4M pre-trains without dropout."""
    norm_eps: float = 1e-5
    """Every layer norm's epsilon (PyTorch's default); ml-4m's released models use 1e-6."""
    context_token: bool = True
    """A learned token leads every sample's encoder tokens (see ``FourM.context_token``); ml-4m's
    models have none, and an imported one is built without it."""
    decoder_tables: bool = False
    """The decoder's teacher-forced sequence inputs read token tables of their own instead of the
    encoder's, as ml-4m's decoder embeddings do (an imported model is built with them)."""

    def __post_init__(self) -> None:
        check(self.dim >= 4 and self.dim % 4 == 0, "model.dim", "must be a positive multiple of 4")
        check(self.heads >= 1, "model.heads", "must be >= 1")
        check(self.dim % self.heads == 0, "model.heads", f"must divide model.dim ({self.dim})")
        check(self.encoder_layers >= 1, "model.encoder_layers", "must be >= 1")
        check(self.decoder_layers >= 1, "model.decoder_layers", "must be >= 1")
        check(self.mlp_ratio > 0, "model.mlp_ratio", "must be > 0")
        check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        check(0.0 < self.norm_eps < 1.0, "model.norm_eps", "must be in (0, 1)")

    @classmethod
    def named(cls, size: str) -> ModelConfig:
        """One of ``SIZES`` (tiny, small, base, large, xlarge)."""
        check(size in SIZES, "model.size", f"unknown {size!r}; one of {', '.join(SIZES)}")
        return SIZES[size]


SIZES = MappingProxyType(
    {
        # Not a 4M size: the smallest model that exercises every part, for tests and CPU smoke runs.
        "nano": ModelConfig(dim=64, encoder_layers=2, decoder_layers=2, heads=4),
        # 4M's sizes: encoder and decoder of equal depth, 64-wide heads.
        "tiny": ModelConfig(dim=384, encoder_layers=6, decoder_layers=6, heads=6),
        "small": ModelConfig(dim=512, encoder_layers=8, decoder_layers=8, heads=8),
        "base": ModelConfig(dim=768, encoder_layers=12, decoder_layers=12, heads=12),
        "large": ModelConfig(dim=1024, encoder_layers=24, decoder_layers=24, heads=16),
        "xlarge": ModelConfig(dim=2048, encoder_layers=24, decoder_layers=24, heads=32),
    }
)


# ---------------------------------------------------------------------------------------------
# The run's modalities, as the model sees them


@dataclass(frozen=True)
class ModelModality:
    """One modality of the run; the model's list of them is ordered, and a token's modality index
    (``MaskedBatch.input_modality``/``target_modality``) indexes that list."""

    name: str
    layout: Literal["map", "sequence", "pixels"]
    """How its tokens lie: a grid of ``positions`` (a map; a pixel input's patches), or a sequence
    (its spec's ``layout``, which a modality's *kind* decides)."""
    vocab_size: int
    """Size of the modality's token table and output head (0 for pixels: they have neither)."""
    positions: int
    """Maps and pixels: the grid's token count (side * side, row-major positions; a pixel input's
    patches). Sequences: the cap the masking truncates to; the 1D sin-cos is computed from the
    position itself, so it sets no hard limit."""
    vocabulary: str = ""
    """The id space the modality's tokens live in (default: its own, named after it). Modalities of
    one vocabulary (caption and det share the text tokenizer's) share one token table and one output
    head, as the issue's "one output head per vocabulary" asks: the modality embedding already tells
    a caption's word from a box list's, and a run with many text-like modalities (4M-21's metadata,
    palettes, ...) then costs no extra 30k-row tables to store, clip and update."""
    patch_size: int = 0
    """Pixels: the side of a patch, in pixels (0 for token modalities)."""
    mean: tuple[float, ...] = ()
    """Pixels: the per-channel mean and std that standardise [0, 1] pixels before the patch embedding."""
    std: tuple[float, ...] = ()
    as_input: bool = True
    """The encoder reads it: its vocabulary has a token table (a pixel input: its patches)."""
    as_target: bool = True
    """The decoder predicts it: its vocabulary has an output head. ml-4m's configs name a model's
    inputs and targets apart (``domains_in``, ``domains_out``): a modality only among the targets has
    no token table to read it with, and an imported model is built without one (False for pixels:
    nothing predicts them)."""

    def __post_init__(self) -> None:
        if not self.vocabulary:
            object.__setattr__(self, "vocabulary", self.name)
        if self.layout == "pixels":
            object.__setattr__(self, "as_target", False)
        for name in ("mean", "std"):  # JSON gives lists back
            object.__setattr__(self, name, tuple(getattr(self, name)))
        check(bool(self.name), "modality.name", "must not be empty")
        check(self.layout in ("map", "sequence", "pixels"), f"modality {self.name}.layout", "map|sequence|pixels")
        pixels = self.layout == "pixels"
        check(pixels or self.vocab_size >= 1, f"modality {self.name}.vocab_size", "must be >= 1")
        check(self.positions >= 1, f"modality {self.name}.positions", "must be >= 1")
        if self.layout != "sequence":
            check(math.isqrt(self.positions) ** 2 == self.positions, f"modality {self.name}.positions", "a square")
        shaped = self.patch_size >= 1 and len(self.mean) == len(self.std) == 3
        check(shaped == pixels, f"modality {self.name}.patch_size", "pixels need patch_size, mean, std; tokens none")
        check(self.as_input or self.as_target, f"modality {self.name}", "must be an input, a target or both")

    @property
    def grid(self) -> int:
        """Side of a map's token grid or a pixel input's patch grid (1 for sequences, where it is not used)."""
        return math.isqrt(self.positions) if self.layout != "sequence" else 1

    @property
    def image_size(self) -> int:
        """Pixels: the side of the image (0 for token modalities)."""
        return self.grid * self.patch_size

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelModality:
        """As ``asdict`` wrote it (a run's ``model.json``, a checkpoint's hyper-parameters); runs made
        before ``layout`` had its name call it ``kind``, and still load."""
        return cls(**cls.current_fields(data))

    @staticmethod
    def current_fields(data: Mapping[str, Any]) -> dict[str, Any]:
        """``data``'s fields under this version's names (``kind`` was ``layout``'s)."""
        fields = dict(data)
        if "kind" in fields:
            fields["layout"] = fields.pop("kind")
        return fields

    @classmethod
    def from_spec(cls, spec: ModalitySpec, vocab_size: int | None = None) -> ModelModality:
        """From the registry's spec; ``vocab_size`` overrides the spec's (known once tokenizers exist)."""
        vocab_size = vocab_size if vocab_size is not None else spec.vocab_size
        check(vocab_size is not None, f"modality {spec.name}.vocab_size", "unknown: train its tokenizer first")
        return cls(spec.name, spec.layout, vocab_size, spec.max_tokens, spec.vocabulary)

    @classmethod
    def pixels_of(cls, image: ModalitySpec) -> ModelModality:
        """The pixel input of an image modality's spec (on the image's token grid)."""
        pixels = image.pixel_input
        check(pixels is not None, f"modality {image.name}", "has no pixel input")
        return cls(pixels.name, "pixels", 0, image.max_tokens, "", pixels.patch_size, pixels.mean, pixels.std)


# ---------------------------------------------------------------------------------------------
# Fixed positional embeddings (not learned: the same for every modality of a layout, and they
# extend to positions never seen in training)


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, S, S, C) -> (B, (S/p)^2, p*p*C): every patch row-major, flattened rows, columns, channels
    (as ml-4m flattens ``rgb@224``)."""
    B, side, _, C = images.shape
    g = side // patch
    return images.reshape(B, g, patch, g, patch, C).transpose(2, 3).reshape(B, g * g, patch * patch * C)


def sincos_1d(position: Tensor, dim: int) -> Tensor:
    """(...) integer positions -> (..., dim): the Transformer's sinusoids, sines then cosines."""
    frequency = 10000.0 ** -(torch.arange(dim // 2, device=position.device, dtype=torch.float32) / (dim // 2))
    angle = position.float()[..., None] * frequency  # (..., dim/2)
    return torch.cat([angle.sin(), angle.cos()], dim=-1)  # (..., dim)


def sincos_2d(row: Tensor, col: Tensor, dim: int) -> Tensor:
    """(...) grid rows and columns -> (..., dim): half the width for the row, half for the column (as MAE)."""
    return torch.cat([sincos_1d(row, dim // 2), sincos_1d(col, dim // 2)], dim=-1)


# ---------------------------------------------------------------------------------------------
# Transformer blocks: pre-norm, bias-free layer norms and linears, SwiGLU


class Attention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (itself for self-attention).

    ``allowed`` is boolean, True where a query may look at a key: a boolean mask stays valid under
    bf16 autocast (an additive float mask would have to match the activations' dtype).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads = config.heads
        self.dropout = config.dropout
        self.query = nn.Linear(config.dim, config.dim, bias=False)
        self.key_value = nn.Linear(config.dim, 2 * config.dim, bias=False)
        self.out = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: Tensor, context: Tensor, allowed: Tensor) -> Tensor:
        B, L, D = x.shape
        S = context.shape[1]
        q = self.query(x).view(B, L, self.heads, D // self.heads).transpose(1, 2)  # (B, H, L, D/H)
        k, v = self.key_value(context).view(B, S, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        # k, v: (B, H, S, D/H); allowed: (B, L or 1, S) -> (B, 1, L or 1, S), the same for every head
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed[:, None], dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, L, D/H)
        return self.out(y.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = int(2 * config.mlp_ratio * config.dim / 3)
        self.gate_up = nn.Linear(config.dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # 2 x (B, L, hidden)
        return self.down(F.silu(gate) * up)  # (B, L, D)


class EncoderBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.dim, eps=config.norm_eps, bias=False)
        self.attention = Attention(config)
        self.mlp_norm = nn.LayerNorm(config.dim, eps=config.norm_eps, bias=False)
        self.mlp = SwiGLU(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        h = self.attention_norm(x)  # (B, S, D)
        x = x + self.dropout(self.attention(h, h, allowed))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class DecoderBlock(nn.Module):
    """Self-attention within the targets, cross-attention to the encoder's context, SwiGLU.

    The context gets its own norm in every block (4M's ``context_norm``): it is not on the decoder's
    residual stream, so the query's pre-norm does not cover it, and each block can scale its
    features for its own keys and values.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attention_norm = nn.LayerNorm(config.dim, eps=config.norm_eps, bias=False)
        self.self_attention = Attention(config)
        self.cross_attention_norm = nn.LayerNorm(config.dim, eps=config.norm_eps, bias=False)
        self.context_norm = nn.LayerNorm(config.dim, eps=config.norm_eps, bias=False)
        self.cross_attention = Attention(config)
        self.mlp_norm = nn.LayerNorm(config.dim, eps=config.norm_eps, bias=False)
        self.mlp = SwiGLU(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, self_allowed: Tensor, context: Tensor, cross_allowed: Tensor) -> Tensor:
        h = self.self_attention_norm(x)  # (B, N_tgt, D)
        x = x + self.dropout(self.self_attention(h, h, self_allowed))
        query, keys = self.cross_attention_norm(x), self.context_norm(context)  # (B, N_tgt, D), (B, S, D)
        x = x + self.dropout(self.cross_attention(query, keys, cross_allowed))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


def decoder_attention_mask(modality: Tensor, position: Tensor, is_map: Tensor, real: Tensor) -> Tensor:
    """(B, N_tgt) each -> (B, N_tgt, N_tgt) bool, True where target i may attend to target j.

    Only targets of the same modality: all of them for a map, the earlier ones (by position, so the
    flat order does not matter) and itself for a sequence; never padding. Every token may attend to
    itself, so a padding row is never fully masked (which would make attention NaN).
    """
    same = modality[:, :, None] == modality[:, None, :]  # (B, N_tgt, N_tgt)
    not_later = position[:, None, :] <= position[:, :, None]  # key position <= query position
    allowed = same & real[:, None, :] & (is_map[:, :, None] | not_later)
    itself = torch.eye(modality.shape[1], dtype=torch.bool, device=modality.device)
    return allowed | itself


def empty_sample_attention(x: Tensor, labels: Tensor, real: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Without a context token, what a sample with no inputs attends to: ml-4m's masking.

    ml-4m masks attention with the dtype's lowest value, not -inf, so a row whose every key is
    masked attends to all of them alike; its masked slots being all zeros, that sample's encoder
    stays at zero and its decoder reads the context projection's bias alone, however many slots
    there are. Here such a sample's (zeroed) padding becomes its keys, and a batch without any
    input slot gets one zero slot, so no attention row is empty (NaN).
    ``x``, ``labels``: (B, N_in, D) with padding already zero; ``real``: (B, N_in).
    """
    if real.shape[1] == 0:
        x, labels = x.new_zeros(x.shape[0], 1, x.shape[2]), labels.new_zeros(x.shape[0], 1, x.shape[2])
        real = real.new_zeros(real.shape[0], 1)
    return x, labels, real | ~real.any(dim=1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# The model


class FourM(nn.Module):
    """The 4M encoder-decoder over the run's ``modalities`` (their order defines modality indices).

    ``forward(batch)`` gives, per modality index present among the batch's real targets, the logits
    of those targets in ``batch.target_ids[(batch.target_modality == m) & batch.target_mask]``
    order. A batch lacking a modality leaves that modality's head without a gradient: under DDP use
    ``find_unused_parameters`` (Lightning: ``strategy="ddp_find_unused_parameters_true"``).
    """

    def __init__(self, config: ModelConfig, modalities: Sequence[ModelModality]):
        super().__init__()
        names = [m.name for m in modalities]
        check(len(names) >= 1, "model.modalities", "needs at least one modality")
        check(len(set(names)) == len(names), "model.modalities", f"names repeat: {names}")
        self.config = config
        self.modalities = tuple(modalities)
        tokens = [m for m in modalities if m.layout != "pixels"]
        pixels = [m for m in modalities if m.layout == "pixels"]
        vocab_sizes: dict[str, int] = {}  # ordered by first use, sized by the first user
        for m in tokens:
            vocab_sizes.setdefault(m.vocabulary, m.vocab_size)
        for m in tokens:
            check(
                m.vocab_size == vocab_sizes[m.vocabulary],
                f"modality {m.name}.vocab_size",
                f"{m.vocab_size}, but vocabulary {m.vocabulary!r} has {vocab_sizes[m.vocabulary]} ids elsewhere",
            )
        self._vocabularies = list(vocab_sizes)
        read = {m.vocabulary for m in tokens if m.as_input}
        predicted = {m.vocabulary for m in tokens if m.as_target}
        D = config.dim

        # Per-modality lookups by modality index: is it on a grid (maps, pixels), its grid side, its
        # vocabulary's index (-1: pixels have none).
        self.register_buffer("is_map", torch.tensor([m.layout != "sequence" for m in modalities]), persistent=False)
        self.register_buffer("grid", torch.tensor([m.grid for m in modalities]), persistent=False)
        self._vocabulary_of = [self._vocabularies.index(m.vocabulary) if m in tokens else -1 for m in modalities]
        self.register_buffer("vocabulary_of", torch.tensor(self._vocabulary_of), persistent=False)

        # Embeddings, one token table per vocabulary some modality is an input of (a teacher-forced
        # target sequence reads it too). Tables are shared by the encoder's inputs and the decoder's
        # teacher-forced sequence inputs (unless ``decoder_tables``); the modality embeddings are
        # not: "an input of m" and "predict m" differ.
        self.token_embeddings = nn.ModuleDict(
            {v: nn.Embedding(n, D) for v, n in vocab_sizes.items() if v in read or not config.decoder_tables}
        )
        if config.decoder_tables:  # map targets read the mask token
            sequences = {m.vocabulary for m in tokens if m.layout == "sequence" and m.as_target}
            self.decoder_token_embeddings = nn.ModuleDict(
                {v: nn.Embedding(n, D) for v, n in vocab_sizes.items() if v in sequences}
            )
        # 4M's rgb@224: a bias-free linear map of each flattened patch (rows, columns, channels), so
        # the modality embedding alone says "pixels".
        self.patch_embeddings = nn.ModuleDict({m.name: nn.Linear(m.patch_size**2 * 3, D, bias=False) for m in pixels})
        for m in pixels:
            self.register_buffer(f"_mean_{m.name}", torch.tensor(m.mean), persistent=False)
            self.register_buffer(f"_std_{m.name}", torch.tensor(m.std), persistent=False)
        self.input_modality_embedding = nn.Embedding(len(modalities), D)
        self.target_modality_embedding = nn.Embedding(len(modalities), D)
        self.mask_token = nn.Parameter(torch.zeros(D))
        """The decoder's query content for a map target: the token it has to predict is unknown."""
        if config.context_token:
            self.context_token = nn.Parameter(torch.zeros(D))
            """Leads every sample's encoder tokens, so a sample with no inputs (unconditional
            generation, classifier-free guidance) still has one key to cross-attend to instead of a
            NaN row. Without it, such a row attends to its zeroed padding, as ml-4m's masking does
            (``empty_sample_attention``)."""
        self.embedding_dropout = nn.Dropout(config.dropout)

        self.encoder = nn.ModuleList(EncoderBlock(config) for _ in range(config.encoder_layers))
        self.encoder_norm = nn.LayerNorm(D, eps=config.norm_eps, bias=False)
        # 4M's decoder_proj_context, with its bias (4M keeps this one even in its bias-free models).
        self.context_projection = nn.Linear(D, D)
        self.decoder = nn.ModuleList(DecoderBlock(config) for _ in range(config.decoder_layers))
        self.decoder_norm = nn.LayerNorm(D, eps=config.norm_eps, bias=False)
        self.heads = nn.ModuleDict({v: nn.Linear(D, n, bias=False) for v, n in vocab_sizes.items() if v in predicted})
        self._init_weights()

    def _init_weights(self) -> None:
        # As nanoGPT: N(0, 0.02) truncated at 2 std; the projections that write into the residual
        # stream scaled by 1/sqrt(their count), so the stream's variance does not grow with depth.
        def normal(t: Tensor, std: float = 0.02) -> None:
            nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std)

        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                normal(module.weight)
        residual_writes = 2 * self.config.encoder_layers + 3 * self.config.decoder_layers
        for name, parameter in self.named_parameters():
            if name.endswith(("attention.out.weight", "mlp.down.weight")):
                normal(parameter, 0.02 / math.sqrt(residual_writes))
        nn.init.zeros_(self.context_projection.bias)
        normal(self.mask_token)
        if self.config.context_token:
            normal(self.context_token)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def modality_index(self, name: str) -> int:
        """Index of modality ``name`` in the run's list (the ``*_modality`` entries of a batch)."""
        names = [m.name for m in self.modalities]
        check(name in names, "modality", f"unknown {name!r}; this model knows {', '.join(names)}")
        return names.index(name)

    def head(self, m: int) -> nn.Linear:
        """The output head of modality index ``m`` (its vocabulary's): (..., D) -> (..., V_m) logits."""
        return self.heads[self._vocabularies[self._vocabulary_of[m]]]

    def table(self, m: int) -> nn.Embedding:
        """The token table of modality index ``m`` (its vocabulary's)."""
        return self.token_embeddings[self._vocabularies[self._vocabulary_of[m]]]

    # -- embeddings ---------------------------------------------------------------------------

    def embed_tokens(self, ids: Tensor, modality: Tensor, decoder: bool = False) -> Tensor:
        """(B, N) ids and modality indices -> (B, N, D): each id looked up in its vocabulary's table
        (with ``decoder`` and ``decoder_tables``, the decoder's table of that vocabulary)."""
        x = self.mask_token.new_zeros(*ids.shape, self.config.dim)  # (B, N, D)
        vocabulary = self.vocabulary_of[modality]  # (B, N)
        tables = self.decoder_token_embeddings if decoder and self.config.decoder_tables else self.token_embeddings
        for v, name in enumerate(self._vocabularies):
            here = vocabulary == v  # (B, N)
            if name in tables:  # none: map targets ask with the mask token, target-only ones are never read
                x[here] = tables[name](ids[here])  # (tokens of vocabulary v, D)
        return x

    def embed_patches(self, name: str, images: Tensor) -> Tensor:
        """(B, S, S, 3) uint8 images of pixel input ``name`` -> (B, G, D): every patch, row-major,
        standardised and linearly embedded (the caller picks the patches that are inputs)."""
        m = self.modalities[self.modality_index(name)]
        p, dtype = m.patch_size, self.mask_token.dtype
        x = (images.to(dtype) / 255 - getattr(self, f"_mean_{name}")) / getattr(self, f"_std_{name}")  # (B, S, S, 3)
        return self.patch_embeddings[name](patchify(x, p))  # (B, G, D)

    def embed_inputs(self, batch: MaskedBatch, modality: Tensor, position: Tensor) -> Tensor:
        """(B, N_in) -> (B, N_in, D): token inputs from their tables, pixel inputs from their patches."""
        x = self.embed_tokens(batch.input_ids.where(batch.input_mask, 0), modality)  # (B, N_in, D)
        for name in self.patch_embeddings:
            here = (modality == self.modality_index(name)) & batch.input_mask  # (B, N_in)
            if here.any():
                patches = self.embed_patches(name, batch.pixels[name])  # (B, G, D)
                rows = here.nonzero(as_tuple=True)[0]
                x[here] = patches[rows, position[here]].to(x.dtype)
        return x

    def embed_positions(self, modality: Tensor, position: Tensor) -> Tensor:
        """(B, N) -> (B, N, D): 2D sin-cos of (row, column) for map tokens, 1D sin-cos for sequences."""
        grid = self.grid[modality]  # (B, N)
        maps = sincos_2d(position // grid, position % grid, self.config.dim)  # (B, N, D)
        sequences = sincos_1d(position, self.config.dim)  # (B, N, D)
        return torch.where(self.is_map[modality][..., None], maps, sequences)

    # -- encoder ------------------------------------------------------------------------------

    def encode(self, batch: MaskedBatch) -> tuple[Tensor, Tensor]:
        """-> the decoder's context (B, S, D), one row per encoder token with the context token
        first, and its real-token mask (B, S) for cross-attention."""
        real = batch.input_mask  # (B, N_in)
        # Padding may carry any ids/modality/position: make them valid indices, then zero what they embed.
        modality = batch.input_modality.where(real, 0)
        position = batch.input_position.where(real, 0)
        # Each token's modality + position embeddings: the decoder's context gets them again.
        labels = self.input_modality_embedding(modality) + self.embed_positions(modality, position)  # (B, N_in, D)
        x = self.embed_inputs(batch, modality, position) + labels  # (B, N_in, D)
        # As ml-4m, a padding slot is all zeros, token and embeddings alike: a sample with no inputs
        # attends to nothing but zeros (see ``empty_sample_attention``), never to an embedding of
        # modality 0 at position 0 that the padding would otherwise carry.
        padding = ~real[..., None]  # (B, N_in, 1)
        x, labels = x.masked_fill(padding, 0.0), labels.masked_fill(padding, 0.0)
        B = x.shape[0]
        if self.config.context_token:
            x = torch.cat([self.context_token.expand(B, 1, -1).to(x.dtype), x], dim=1)  # (B, S, D)
            # The context token has no modality or position (as 4M's register tokens): nothing to add back.
            labels = torch.cat([labels.new_zeros(B, 1, labels.shape[-1]), labels], dim=1)  # (B, S, D)
            real = torch.cat([real.new_ones(B, 1), real], dim=1)  # (B, S)
        else:
            x, labels, real = empty_sample_attention(x, labels, real)
        x = self.embedding_dropout(x)

        # Every token, padding included, sees the sample's real tokens (the context token at least),
        # so no row is fully masked (NaN).
        allowed = real[:, None, :]  # (B, 1, S), the same for every query
        for block in self.encoder:
            x = block(x, allowed)
        return self.context(self.encoder_norm(x), labels), real

    def context(self, encoded: Tensor, labels: Tensor) -> Tensor:
        """Encoder output (B, S, D) and its tokens' modality + position embeddings (B, S, D) -> the
        decoder's context (B, S, D), as 4M builds it: projected, then the embeddings added back after
        the projection, so every key and value says which modality and position it came from however
        deep the encoder has mixed its tokens."""
        return self.context_projection(encoded) + labels

    # -- decoder ------------------------------------------------------------------------------

    def decode(self, batch: MaskedBatch, context: Tensor, context_real: Tensor) -> Tensor:
        """-> (B, N_tgt, D): the decoder's output for every target slot (padding slots included)."""
        real = batch.target_mask  # (B, N_tgt)
        modality = batch.target_modality.where(real, 0)
        position = batch.target_position.where(real, 0)
        is_map = self.is_map[modality]  # (B, N_tgt)
        # Map targets ask with the mask token; sequence targets see the previous token (teacher forcing).
        teacher = self.embed_tokens(batch.decoder_input_ids.where(real & ~is_map, 0), modality, decoder=True)
        x = (
            torch.where(is_map[..., None], self.mask_token.to(teacher.dtype), teacher)
            + self.target_modality_embedding(modality)
            + self.embed_positions(modality, position)
        )  # (B, N_tgt, D)
        x = self.embedding_dropout(x)

        self_allowed = decoder_attention_mask(modality, position, is_map, real)  # (B, N_tgt, N_tgt)
        cross_allowed = context_real[:, None, :]  # (B, 1, S): the same real encoder tokens for every query
        for block in self.decoder:
            x = block(x, self_allowed, context, cross_allowed)
        return self.decoder_norm(x)

    # -- heads, forward, loss -----------------------------------------------------------------

    def logits(self, hidden: Tensor, batch: MaskedBatch) -> dict[int, Tensor]:
        """Decoder output (B, N_tgt, D) -> {modality index: (n_m, V_m)} for the modalities with real targets."""
        out = {}
        for m in range(len(self.modalities)):
            here = (batch.target_modality == m) & batch.target_mask  # (B, N_tgt)
            if here.any():
                out[m] = self.head(m)(hidden[here])  # (n_m, V_m)
        return out

    def forward(self, batch: MaskedBatch) -> dict[int, Tensor]:
        return self.logits(self.decode(batch, *self.encode(batch)), batch)

    def loss(self, batch: MaskedBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """4M's loss: each target modality's mean token cross-entropy, averaged over the modalities
        present in the batch, so a 196-token map does not outweigh a 10-token caption.

        Returns the total and detached metrics ``loss/<name>`` and ``accuracy/<name>`` (top-1); a
        batch without any target gives a zero loss and no metrics.
        """
        hidden = self.decode(batch, *self.encode(batch))  # (B, N_tgt, D)
        logits = self.logits(hidden, batch)
        if not logits:
            # Possible on tiny data (e.g. only captions, each shown whole). A zero loss still tied to
            # the graph keeps every DDP rank's backward and gradient all-reduce in step.
            return hidden.sum() * 0.0, {}
        losses, metrics = [], {}
        for m, modality_logits in logits.items():
            name = self.modalities[m].name
            target = batch.target_ids[(batch.target_modality == m) & batch.target_mask]  # (n_m,)
            loss = F.cross_entropy(modality_logits.float(), target)
            losses.append(loss)
            metrics[f"loss/{name}"] = loss.detach()
            metrics[f"accuracy/{name}"] = (modality_logits.argmax(dim=-1) == target).float().mean()
        return torch.stack(losses).mean(), metrics


# ---------------------------------------------------------------------------------------------
# Saved weights of another version of the model


class OutdatedWeightsError(UserError):
    """Saved weights whose names are not this model's: a run trained before an architecture change
    (such as the decoder's context projection). They cannot be converted, only retrained."""


def check_weight_names(model: FourM, saved: Iterable[str], run: str) -> None:
    """Stop in one line, naming ``run``, unless the saved weights are named exactly as ``model``'s.

    Called before loading: a missing or unexpected weight would otherwise surface as torch's key or
    shape error, a traceback that does not say the run is merely older than the code.
    """
    expected, saved = set(model.state_dict()), set(saved)
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if not (missing or unexpected):
        return
    differences = [f"{what} {_some(names)}" for what, names in (("lack", missing), ("add", unexpected)) if names]
    raise OutdatedWeightsError(
        f"run {run} was trained by an older version of the model (its weights {'; '.join(differences)}):"
        " it must be retrained (`make train` with a new train.run, or after deleting the run)"
    )


def _some(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
