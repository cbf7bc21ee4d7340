"""The VQ tokenizer of every map modality: one conv autoencoder family around ``VectorQuantizer``.

    value (B, *value shape)
      -> adapter input layer                  (B, width, S, S)
      -> per stage: residual block (from stage ``blocks_from_stage`` on), stride-2 conv,
         channels doubling up to 4 x width
                                              (B, C, G, G)   G = grid, stages = log2(S / G)
      -> 1x1 conv to code_dim, quantizer      (B, code_dim, G, G), ids (B, G, G)
      -> 1x1 conv, residual block, then per stage: 2x nearest upsample, conv, residual block
                                              (B, width, S, S)
      -> adapter head                         (B, outputs, S, S)

At 224 px and a 14 x 14 grid that is 4 stages, as 4M's tokenizers; CLIP features already sit on
the token grid, so their model has none. A saved tokenizer is ``config.json`` plus
``model.safetensors``: loading runs no pickle.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from four_m.core.config import VQConfig
from four_m.core.crops import Crop
from four_m.core.dataset_root import atomic_path, write_text_atomic
from four_m.core.errors import UserError
from four_m.core.precision import autocast_dtype
from four_m.tokenize.base import TOKEN_DTYPE, Tokenizer, TokenizerInputError
from four_m.tokenize.maps import MapAdapter, configured
from four_m.tokenize.quantizer import Quantized, VectorQuantizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INFERENCE_BATCH = 32
"""Values per forward pass in encode/decode: bounds activation memory (about 1 GiB at 224 px, width 64)."""


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)  # 32 groups where the width allows


def _block(channels: int, wanted: bool) -> nn.Module:
    """A residual block, or nothing at resolutions ``VQConfig.blocks_from_stage`` leaves out."""
    return ResidualBlock(channels) if wanted else nn.Identity()


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            _norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            _norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def downsampling_stages(image_size: int, grid: int) -> int:
    """log2(image_size / grid); a ratio that is not a power of two has no stride-2 encoder."""
    ratio = image_size // grid
    if image_size % grid or ratio & (ratio - 1):
        raise UserError(f"VQ image size {image_size} is not the token grid {grid} times a power of two")
    return ratio.bit_length() - 1


class VQModel(nn.Module):
    def __init__(self, adapter: MapAdapter, cfg: VQConfig):
        super().__init__()
        self.adapter = adapter
        stages = downsampling_stages(adapter.size, cfg.grid)
        widths = [min(cfg.width * 2**i, 4 * cfg.width) for i in range(stages + 1)]  # per resolution
        blocks = [_block(widths[i], i >= cfg.blocks_from_stage) for i in range(stages + 1)]
        encoder: list[nn.Module] = [adapter.input_layer(cfg.width)]
        for i in range(stages):
            encoder += [blocks[i], nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1)]
        encoder += [ResidualBlock(widths[-1]), _norm(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], cfg.code_dim, 1)]
        self.encoder = nn.Sequential(*encoder)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.commitment, cfg.ema_decay, cfg.dead_after)
        decoder: list[nn.Module] = [nn.Conv2d(cfg.code_dim, widths[-1], 1), ResidualBlock(widths[-1])]
        for i in reversed(range(stages)):
            decoder += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(widths[i + 1], widths[i], 3, padding=1),
                _block(widths[i], i >= cfg.blocks_from_stage),
            ]
        decoder += [_norm(cfg.width), nn.SiLU(), adapter.head(cfg.width)]
        self.decoder = nn.Sequential(*decoder)

    def forward(self, values: torch.Tensor) -> tuple[torch.Tensor, Quantized]:
        """(B, *value shape) -> raw outputs (B, outputs, S, S) and the quantization of the batch."""
        quantized = self.encode(values)
        return self.decoder(quantized.codes), quantized

    def encode(self, values: torch.Tensor) -> Quantized:
        return self.quantizer(self.encoder(values))  # codes (B, code_dim, G, G), ids (B, G, G)

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, G, G) ids -> (B, outputs, S, S) raw outputs."""
        return self.decoder(self.quantizer.lookup(ids))


class VQTokenizer(Tokenizer):
    """Map values <-> ``grid * grid`` uint16 ids, row-major over the token grid."""

    fixed_length = True

    def __init__(self, modality: str, cfg: VQConfig, image_size: int, adapter_params: Mapping[str, Any] | None = None):
        """``image_size`` is the values' side (the label view; for clip, its grid); ``adapter_params``
        the adapter's settings other than size, such as ``{"classes": 133}`` (see ``MapAdapter.params_of``)."""
        self.modality = modality
        self.cfg = cfg
        self.adapter = configured(modality, image_size, adapter_params or {})
        self.model = VQModel(self.adapter, cfg).eval()
        self.autocast: torch.dtype | None = None
        """Encoding's autocast dtype (:meth:`run_on`); None: fp32."""

    @property
    def vocab_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def max_tokens(self) -> int:
        return self.cfg.grid**2

    @property
    def device(self) -> torch.device:
        return self.model.quantizer.codebook.device

    def to(self, device: str | torch.device) -> VQTokenizer:
        self.model.to(device)
        return self

    def run_on(self, device_type: str, precision: str) -> None:
        device = "cuda" if device_type == "cuda" and torch.cuda.is_available() else "cpu"
        self.to(device)
        self.autocast = autocast_dtype(precision, device)

    @torch.inference_mode()
    def encode(self, values: Sequence[np.ndarray]) -> list[np.ndarray]:
        for value in values:
            self.adapter.check(value)
        ids: list[np.ndarray] = []
        for start in range(0, len(values), INFERENCE_BATCH):
            batch = torch.from_numpy(np.stack(values[start : start + INFERENCE_BATCH])).to(self.device)
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                codes = self.model.encode(batch).ids.flatten(1)  # (B, G*G), row-major
            ids += list(codes.cpu().numpy().astype(TOKEN_DTYPE))
        return ids

    def crop(self, value: np.ndarray, crop: Crop) -> np.ndarray:
        return self.adapter.crop(value, crop)

    @torch.inference_mode()
    def decode(self, ids: Sequence[np.ndarray]) -> list[np.ndarray]:
        ids = [np.asarray(sequence) for sequence in ids]
        for sequence in ids:
            if np.shape(sequence) != (self.max_tokens,):
                raise TokenizerInputError(
                    f"{self.modality}: expected {self.max_tokens} ids per value, got shape {np.shape(sequence)}"
                )
            self.check_ids(sequence, "decode")
        values: list[np.ndarray] = []
        grid = self.cfg.grid
        for start in range(0, len(ids), INFERENCE_BATCH):
            chunk = np.stack(ids[start : start + INFERENCE_BATCH]).astype(np.int64).reshape(-1, grid, grid)
            output = self.model.decode_ids(torch.from_numpy(chunk).to(self.device))
            values += list(self.adapter.to_values(output).cpu().numpy())
        return values

    def reconstruct(self, values: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Values as the tokens keep them (encode then decode): for previews and metrics."""
        return self.decode(self.encode(values))

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        config = {
            "modality": self.modality,
            "image_size": self.adapter.size,
            "adapter_params": self.adapter.params(),
            "vq": dataclasses.asdict(self.cfg),
        }
        with atomic_path(directory / WEIGHTS_FILE) as temp:
            save_model(self.model, str(temp))
        write_text_atomic(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> VQTokenizer:
        config = json.loads((Path(directory) / CONFIG_FILE).read_text())
        tokenizer = cls(config["modality"], VQConfig(**config["vq"]), config["image_size"], config["adapter_params"])
        load_model(tokenizer.model, str(Path(directory) / WEIGHTS_FILE))
        return tokenizer
