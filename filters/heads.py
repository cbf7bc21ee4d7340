"""The small heads on CLIP image embeddings that score photos (aesthetic, NSFW, watermark).

A head is a stack of linear layers (with an activation between them, or none: LAION's improved
aesthetic predictor is purely linear) run in numpy on the stored ``clip_embedding``. Production
weights come from a safetensors file (``curate.<filter>.model``: a local file, or a hub id with its
pinned ``revision``) holding ``<i>.weight`` and ``<i>.bias`` per layer; with no model the same head
is built with seeded random weights and every summary says its scores mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from four_m.filters.base import Rows, Scorer


@dataclass(frozen=True)
class Head:
    hidden: tuple[int, ...]
    """Widths of the hidden layers (the input is the embedding's width, the output one number)."""
    activation: str
    """``none``, ``relu`` or ``sigmoid_out`` (ReLU between layers, a probability out)."""
    weights_file: str = "model.safetensors"


class HeadScorer(Scorer):
    """Scores rows with :attr:`head` on their CLIP image embeddings."""

    head: Head

    def values(self, rows: Rows) -> list[float | None]:
        column = rows.labels["clip"]["clip_embedding"]
        present = [i for i, v in enumerate(column.to_pylist()) if v is not None]
        scores: list[float | None] = [None] * len(rows)
        if not present:
            return scores
        inputs = np.asarray([column[i].as_py() for i in present], np.float32)
        inputs /= np.maximum(np.linalg.norm(inputs, axis=1, keepdims=True), 1e-12)
        out = self._forward(inputs)
        for i, value in zip(present, out, strict=True):
            scores[i] = float(value)
        return scores

    def _forward(self, x: np.ndarray) -> np.ndarray:
        layers = self._layers(x.shape[1])
        for index, (weight, bias) in enumerate(layers):
            x = x @ weight.T + bias
            if self.head.activation != "none" and index < len(layers) - 1:
                x = np.maximum(x, 0.0)
        if self.head.activation == "sigmoid_out":
            x = 1.0 / (1.0 + np.exp(-x))
        return x[:, 0]

    def _layers(self, width: int) -> list[tuple[np.ndarray, np.ndarray]]:
        if not hasattr(self, "_weights"):
            self._weights = self._loaded() if self.cfg.model else self._random(width)
        return self._weights

    def _loaded(self) -> list[tuple[np.ndarray, np.ndarray]]:
        from safetensors.numpy import load_file

        tensors = load_file(self._weights_path())
        count = len([k for k in tensors if k.endswith(".weight")])
        return [
            (tensors[f"{i}.weight"].astype(np.float32), tensors[f"{i}.bias"].astype(np.float32)) for i in range(count)
        ]

    def _weights_path(self) -> str:
        """A local safetensors file or folder, else a hub id fetched at its pinned revision."""
        local = Path(self.cfg.model)
        if local.exists():
            return str(local / self.head.weights_file if local.is_dir() else local)
        from huggingface_hub import hf_hub_download

        return hf_hub_download(self.cfg.model, self.head.weights_file, revision=self.cfg.revision)

    def _random(self, width: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The head's architecture with seeded weights (PyTorch's default uniform init)."""
        self.random_init = True
        rng = np.random.default_rng(0)
        sizes = (width, *self.head.hidden, 1)
        layers = []
        for fan_in, fan_out in zip(sizes, sizes[1:], strict=False):
            bound = 1.0 / np.sqrt(fan_in)
            layers.append(
                (rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32), rng.uniform(-bound, bound, fan_out))
            )
        return layers
