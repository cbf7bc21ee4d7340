"""The frozen registry of modalities: one declaration per modality drives every stage.

A modality is one ``ModalitySpec``: its name, its *kind*, where its data is stored, its labeler
(an import path, resolved only where labelling happens), the defaults of its config sections, and
what the dataset card and the evaluation say about it. Everything that lists modalities (config
sections, tokenizers, adapters, preview renderers, metrics, baselines, card tasks, test fixtures)
is derived from this registry; behaviour shared by a kind (an adapter, a renderer, a metric) is
written once for the kind, in the layer that owns it.

Where specs come from, once per process, on first use (then the registry is frozen):
- the built-in modules of the ``four_m.modalities`` package, one module per modality;
- the entry-point group ``four_m.modalities`` of installed distributions: an entry point names a
  module with a ``MODALITY`` (or a package of such modules), so a user's own package adds a
  modality with no edit here. Ray workers import the same installed packages, so they see the
  same registry.

This module imports nothing of the stages and no heavy library: ``make card`` reads it too.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

from four_m.core.errors import UserError

ENTRY_POINTS = "four_m.modalities"
BUILT_IN = "four_m.modalities"

MAP_KINDS = ("image", "continuous_map", "direction_map", "class_map", "feature_map", "edge_map")
"""Kinds stored as a per-pixel map of the label view and tokenized by a VQ tokenizer into a grid:
``image`` (the RGB view itself), ``continuous_map`` (one value in [0, 1] per pixel, 16-bit PNG),
``direction_map`` (unit vectors, 8-bit RGB PNG), ``class_map`` (class ids, 8-bit PNG),
``feature_map`` (a grid of feature vectors), ``edge_map`` (a binary map of edge pixels, 8-bit PNG of
0 / 255)."""
SEQUENCE_KINDS = ("text", "boxes", "palette", "metadata")
"""Kinds tokenized by the shared WordPiece vocabulary: free text, 4M's box sequences, and 4M-21's
colour palettes and image metadata (coordinate-style ``v1=`` / ``v0=`` tokens)."""
LABEL_ONLY_KINDS = ("instances",)
"""Kinds that are labelled and stored but not tokenized (yet): ``instances``, a list of RLE masks.
They feed other labelers (``requires`` / ``uses``), previews and the card, never training."""
KINDS = MAP_KINDS + SEQUENCE_KINDS + LABEL_ONLY_KINDS
CROPPED_KINDS = (*MAP_KINDS, "boxes")
"""Kinds whose tokens depend on the crop (``core.crops``): tokenized once per crop, as 4M does for
maps and re-cropped boxes. Captions, palettes and metadata describe the image, not a region, and
are tokenized once (4M keeps captions, and 4M-21 palettes and metadata, whole under every crop)."""
NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
"""A modality's name: it becomes folder names under the root (``labels/<name>``, ``tokens/<name>``)."""


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PixelInput:
    """An image modality's pixels as an encoder input of their own (4M's ``rgb@224``): the label view
    at ``grid * patch_size`` pixels, standardised per channel, cut into ``patch_size`` squares that
    the model embeds linearly, one per grid position (the image's token grid).

    It is input only (nothing predicts pixels) and has no tokenizer: the loader reads it from
    ``images/`` beside the tokens. The image's VQ tokens stay a modality of their own, so a model can
    be given the photo itself and still be asked for its tokens.
    """

    name: str
    """How runs, mixtures and ``make sample FROM=`` name it; must not be a registered modality's name."""
    patch_size: int = 16
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean and std of [0, 1] pixels; 4M's defaults (ImageNet's) unless a model needs others."""
    std: tuple[float, float, float] = IMAGENET_STD
    reference: str | None = None
    """Its name in apple/ml-4m's checkpoints (``rgb@224``), for ``make import-4m``."""

    def __post_init__(self) -> None:
        if not NAME.fullmatch(self.name):
            raise ModalityError(f"pixel input {self.name!r}: a name is lower-case letters, digits, '_'")
        if self.patch_size < 1 or len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ModalityError(f"pixel input {self.name!r}: needs patch_size >= 1 and three means and stds > 0")


class ModalityError(UserError, KeyError):
    """A modality declaration is invalid, or a name is not a registered modality (a ``KeyError`` too,
    so the registry is a plain ``Mapping``: ``.get`` and ``in`` work)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ModalitySpec:
    name: str
    kind: str
    """One of ``KINDS``: decides the tokenizer family, adapter, renderer, metric and baseline."""
    folder: str
    """Where the stages read it, relative to the dataset root: ``images`` or ``labels/<name>``."""
    column: str
    """The payload column of the stored table (``jpg`` in ``images/``, else usually the name)."""
    max_tokens: int = 256
    """Tokens per sample: exactly that many for maps (a square grid), at most for sequences."""
    labeler: str | None = None
    """``module:Class`` of the labeler that writes ``folder`` (None: the download stage does)."""
    labeler_config: Any = None
    """Defaults of ``label.<name>``: a ``LabelerConfig`` (or subclass) instance."""
    tokenizer_config: Any = None
    """Defaults of ``tokenize.<name>`` for maps: a ``VQConfig`` instance."""
    alt_text: bool = False
    """Text whose url-list alt-text may stand in for the labeler's output (``tokenize.caption_source``)."""
    card_tasks: tuple[str, ...] = ()
    """Hugging Face task categories that this modality's labels serve (the dataset card's header)."""
    no_metric: str | None = None
    """Why ``make eval`` has no metric for it (e.g. an input-only modality); None: it has one."""
    order: int = 100
    """Position among the modalities (ties by name): the order of tokenizing, training and display."""
    vocab_size: int | None = None
    """Known once the tokenizer is trained (a VQ codebook, the shared WordPiece vocabulary)."""
    pixel_input: PixelInput | None = None
    """An ``image`` may also be fed to the encoder as pixels (see :class:`PixelInput`)."""
    requires: tuple[str, ...] = ()
    """Modalities whose labels this labeler reads and cannot do without (``sam_edge`` needs
    ``sam_instance``): the label stage runs them first and refuses to run it where they are missing."""
    uses: tuple[str, ...] = ()
    """Modalities whose labels this labeler reads where they exist (``metadata`` counts boxes if
    ``det`` ran); what a missing one would give is left out, never guessed."""
    reference: str | None = None
    """Its name in apple/ml-4m's checkpoints (``tok_depth@224``, ``caption``), for ``make import-4m``;
    None: no released 4M model has it."""

    def __post_init__(self) -> None:
        if not NAME.fullmatch(self.name):
            raise ModalityError(f"modality {self.name!r}: a name is lower-case letters, digits, '_' (it names folders)")
        if self.folder not in ("images", f"labels/{self.name}"):
            wanted = f"images or labels/{self.name}"
            raise ModalityError(f"modality {self.name!r}: folder must be {wanted}, not {self.folder!r}")
        if self.kind not in KINDS:
            raise ModalityError(f"modality {self.name!r}: unknown kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.layout == "map" and self.tokenizer_config is None:
            raise ModalityError(f"modality {self.name!r}: a map needs tokenizer_config (a VQConfig)")
        if self.labeler is not None and (":" not in self.labeler or self.labeler_config is None):
            raise ModalityError(f"modality {self.name!r}: labeler must be 'module:Class' with a labeler_config")
        if self.pixel_input is not None and (self.kind != "image" or self.pixel_input.name == self.name):
            raise ModalityError(f"modality {self.name!r}: only an image has a pixel input, under a name of its own")
        if (self.requires or self.uses) and self.labeler is None or self.name in self.requires + self.uses:
            raise ModalityError(f"modality {self.name!r}: only a labeler reads other labels, and never its own")

    @property
    def layout(self) -> str:
        """``map`` (a fixed grid of tokens), ``sequence`` (a variable run of text tokens up to a cap) or
        ``labels`` (stored, not tokenized)."""
        if self.kind in LABEL_ONLY_KINDS:
            return "labels"
        return "map" if self.kind in MAP_KINDS else "sequence"

    @property
    def tokenized(self) -> bool:
        return self.layout != "labels"

    @property
    def cropped(self) -> bool:
        """Whether its tokens are stored per crop (see :data:`CROPPED_KINDS`)."""
        return self.kind in CROPPED_KINDS

    @property
    def label_inputs(self) -> tuple[str, ...]:
        """Every modality whose labels the labeler reads, required first."""
        return self.requires + self.uses

    @property
    def tokenizer(self) -> str:
        """The tokenizer family: a VQ tokenizer per map, the shared WordPiece vocabulary for sequences."""
        return "vq" if self.layout == "map" else "text"

    @property
    def pixel_side(self) -> int:
        """The side of the pixel input's image: the token grid's side times the patch size (0: none)."""
        return math.isqrt(self.max_tokens) * self.pixel_input.patch_size if self.pixel_input else 0

    @property
    def vocabulary(self) -> str:
        """Which id space the tokens live in: every text-family modality shares the one WordPiece
        vocabulary (``text``); each map has its own VQ codebook, named after the map."""
        return "text" if self.tokenizer == "text" else self.name


class _Registry(Mapping[str, ModalitySpec]):
    """Read-only, filled once per process on first use (see the module docstring)."""

    def __init__(self) -> None:
        self._specs: dict[str, ModalitySpec] | None = None

    def _loaded(self) -> dict[str, ModalitySpec]:
        if self._specs is None:
            specs = sorted(_discover(), key=lambda s: (s.order, s.name))
            clash = sorted({s.pixel_input.name for s in specs if s.pixel_input} & {s.name for s in specs})
            if clash:
                raise ModalityError(f"{clash}: declared both as a modality and as an image's pixel input")
            names = {s.name for s in specs}
            for spec in specs:
                unknown = sorted(set(spec.label_inputs) - names)
                if unknown:
                    raise ModalityError(f"modality {spec.name!r} reads the labels of unknown modalities {unknown}")
            self._specs = {s.name: s for s in specs}
        return self._specs

    def __getitem__(self, name: str) -> ModalitySpec:
        try:
            return self._loaded()[name]
        except KeyError:
            raise ModalityError(f"unknown modality {name!r}; known: {', '.join(self)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded())

    def __len__(self) -> int:
        return len(self._loaded())


MODALITIES: Mapping[str, ModalitySpec] = _Registry()
"""Every registered modality, by name, in order."""


def map_modalities() -> tuple[str, ...]:
    return tuple(n for n, s in MODALITIES.items() if s.layout == "map")


def sequence_modalities() -> tuple[str, ...]:
    return tuple(n for n, s in MODALITIES.items() if s.layout == "sequence")


def token_modalities() -> tuple[str, ...]:
    """Modalities that become tokens (every map and sequence; not the label-only kinds)."""
    return tuple(n for n, s in MODALITIES.items() if s.tokenized)


def labelled_modalities() -> tuple[str, ...]:
    """Modalities that a labeler writes (``label.labelers`` chooses among them)."""
    return tuple(n for n, s in MODALITIES.items() if s.labeler is not None)


def of_kind(kind: str, among: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The registered modalities of ``kind`` (only those in ``among``, if given), in registry order."""
    return tuple(n for n, s in MODALITIES.items() if s.kind == kind and (among is None or n in among))


def pixel_inputs(among: tuple[str, ...] | None = None) -> dict[str, ModalitySpec]:
    """Pixel input name -> the image modality it belongs to (only names in ``among``, if given)."""
    found = {s.pixel_input.name: s for s in MODALITIES.values() if s.pixel_input is not None}
    return {n: s for n, s in found.items() if among is None or n in among}


def pixel_input_of(image: str, among: tuple[str, ...]) -> str | None:
    """The pixel input of modality ``image`` when ``among`` (a run's modalities) has it, else None."""
    return next((n for n, s in pixel_inputs(among).items() if s.name == image), None)


def input_modalities() -> tuple[str, ...]:
    """What a run can be given, in order: every tokenized modality, each image's pixel input right after it."""
    names: list[str] = []
    for name, spec in ((n, s) for n, s in MODALITIES.items() if s.tokenized):
        names += [name, spec.pixel_input.name] if spec.pixel_input else [name]
    return tuple(names)


def _discover() -> list[ModalitySpec]:
    found: dict[str, tuple[ModalitySpec, str]] = {}
    sources = [(f"built-in {BUILT_IN}", importlib.import_module(BUILT_IN))]
    for point in entry_points(group=ENTRY_POINTS):
        if point.value != BUILT_IN:
            sources.append((f"entry point {point.name} = {point.value}", point.load()))
    for origin, target in sources:
        for spec in _specs_of(target, origin):
            if spec.name in found:
                raise ModalityError(f"modality {spec.name!r} is declared twice: by {found[spec.name][1]} and {origin}")
            found[spec.name] = (spec, origin)
    return [spec for spec, _ in found.values()]


def _specs_of(target: Any, origin: str) -> list[ModalitySpec]:
    """A ``ModalitySpec``, a module with ``MODALITY``, or a package whose modules have one."""
    if isinstance(target, ModalitySpec):
        return [target]
    if not isinstance(target, ModuleType):
        raise ModalityError(f"{origin}: expected a ModalitySpec or a module, got {type(target).__name__}")
    if hasattr(target, "__path__"):  # a package: one modality per module
        modules = pkgutil.iter_modules(target.__path__, prefix=f"{target.__name__}.")
        return [spec for info in modules for spec in _specs_of(importlib.import_module(info.name), origin)]
    spec = getattr(target, "MODALITY", None)
    if not isinstance(spec, ModalitySpec):
        raise ModalityError(f"{origin}: module {target.__name__} has no MODALITY = ModalitySpec(...)")
    return [spec]
