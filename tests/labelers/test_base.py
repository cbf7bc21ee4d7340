"""The labeler protocol without a network: an algorithmic labeler needs no torch and makes real labels."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from four_m.core.config import LabelerConfig
from four_m.core.provenance import RANDOM_INIT
from four_m.labelers.base import AlgorithmicLabeler

VIEW = 24


class LuminanceLabeler(AlgorithmicLabeler):
    """Per-pixel luminance (ITU-R BT.601 weights) as an 8-bit PNG of the label view."""

    name = "luminance"
    version = "1"

    def schema(self) -> pa.Schema:
        return pa.schema([pa.field("luminance", pa.binary())])

    def label(self, pixels: np.ndarray) -> list[dict]:
        weights = np.array([0.299, 0.587, 0.114])
        maps = (pixels @ weights).round().astype(np.uint8)  # (B, S, S)
        return [{"luminance": _png(Image.fromarray(m).resize((self.view_size, self.view_size)))} for m in maps]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def labelled() -> tuple[LuminanceLabeler, pa.Table]:
    """The stage's calls in its order (``prepare``, ``setup``, ``label``) on two images."""
    labeler = LuminanceLabeler(LabelerConfig(input_size=32), VIEW)
    labeler.prepare()
    labeler.setup()
    pixels = np.zeros((2, 32, 32, 3), np.uint8)
    pixels[1] = 255
    return labeler, pa.Table.from_pylist(labeler.label(pixels), schema=labeler.schema())


def test_an_algorithmic_labeler_makes_real_labels_through_the_protocol():
    labeler, table = labelled()
    maps = [np.asarray(Image.open(io.BytesIO(data))) for data in table["luminance"].to_pylist()]
    assert [m.shape for m in maps] == [(VIEW, VIEW)] * 2
    assert maps[0].max() == 0 and maps[1].min() == 255
    assert not labeler.random_init
    provenance = labeler.provenance()
    assert provenance["method"] == "algorithmic (luminance 1)"
    assert RANDOM_INIT not in provenance.values()


def test_the_protocol_and_an_algorithmic_labeler_need_no_torch():
    """This file, run in a fresh interpreter: its imports and a labelled batch leave torch unimported."""
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('algorithmic', {str(Path(__file__))!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "module.labelled()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
