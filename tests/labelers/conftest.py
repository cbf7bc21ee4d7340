"""What every labeler test checks the same way: the random-init build, the production load path,
payloads that fit the schema, and a clear error for weights that are not there."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pytest

from four_m.core.config import LabelerConfig
from four_m.core.provenance import RANDOM_INIT
from four_m.labelers.base import Labeler
from four_m.labelers.pretrained import MissingWeightsError


def batch_of(size: int) -> np.ndarray:
    """(4, size, size, 3) uint8: three random images and an all-black one (a degenerate input)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(4, size, size, 3), dtype=np.uint8)
    pixels[3] = 0
    return pixels


def table_of(labeler: Labeler, payloads: list[dict]) -> pa.Table:
    """The payloads as the stage stores them: exactly the schema's keys, one dict per image."""
    assert all(set(p) == set(labeler.schema().names) for p in payloads)
    return pa.Table.from_pylist(payloads, schema=labeler.schema())


@pytest.fixture
def batch() -> Callable[[int], np.ndarray]:
    """``batch(size)``: the standard test batch of ``batch_of``, for tests that build labelers themselves."""
    return batch_of


class Built(NamedTuple):
    random_init: Labeler
    production: Labeler
    """The random-init folder loaded again as a configured model, through the production path."""
    pixels: np.ndarray
    payloads: list[dict[str, Any]]
    """``random_init.label(pixels)``, already checked against the schema."""


@pytest.fixture
def built(tmp_path) -> Callable[[type[Labeler], int, int], Built]:
    """``built(cls, input_size, view_size)``: a labeler built both ways and one labelled batch.

    Also checks what both must agree on: the same payloads for the same input, and provenance that
    names the weights (``random-init`` for the first, the folder's path for the second).
    """

    def build(cls: type[Labeler], input_size: int, view_size: int) -> Built:
        folder = tmp_path / f"tiny-{cls.name}"
        random_init = cls(LabelerConfig(model=None, input_size=input_size), view_size, folder)
        random_init.setup()
        assert (folder / cls.tiny_marker).exists() and (folder / "config.json").exists()
        production = cls(LabelerConfig(model=str(folder), input_size=input_size), view_size, None)
        production.setup()

        pixels = batch_of(input_size)
        payloads = random_init.label(pixels)
        first = table_of(random_init, payloads)
        assert first.num_rows == len(pixels)
        assert first.equals(table_of(production, production.label(pixels)))

        assert random_init.provenance()["model"] == RANDOM_INIT
        assert production.provenance()["model"] == str(folder)
        assert production.provenance()["input_size"] == str(input_size)
        return Built(random_init, production, pixels, payloads)

    return build


@pytest.fixture
def missing_weights(tmp_path) -> Callable[[type[Labeler]], None]:
    """``missing_weights(cls)``: a model path that does not exist fails setup with the path named."""

    def check(cls: type[Labeler]) -> None:
        absent = str(tmp_path / "no-such-model")
        labeler = cls(LabelerConfig(model=absent), 32, None)
        with pytest.raises(MissingWeightsError, match=re.escape(absent)):
            labeler.setup()

    return check
