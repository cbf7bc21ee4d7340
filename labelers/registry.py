"""Labelers by modality: each ``ModalitySpec`` names its labeler class by import path
(``module:Class``); the class is imported here on first use, where labelling happens, so that
reading the registry elsewhere (``make card``) never imports a network library."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from functools import cache

from four_m.core.modalities import MODALITIES, ModalityError, labelled_modalities


class _Labelers(Mapping[str, type]):
    def __getitem__(self, name: str) -> type:
        path = MODALITIES[name].labeler
        if path is None:
            raise ModalityError(f"modality {name!r} has no labeler (its folder is {MODALITIES[name].folder}/)")
        return _resolve(path)

    def __iter__(self) -> Iterator[str]:
        return iter(labelled_modalities())

    def __len__(self) -> int:
        return len(labelled_modalities())


@cache
def _resolve(path: str) -> type:
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ModalityError(f"labeler {path}: cannot import it ({type(err).__name__}: {err})") from err


LABELERS: Mapping[str, type] = _Labelers()
"""Modality -> its labeler class, for every modality that has one. Read-only."""
