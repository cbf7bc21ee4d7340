"""An imported ml-4m image tokenizer (``tokenize.ml4m_vqvae``) as one modality's tokenizer, used by
``make tokenize``, ``make sample`` and ``make eval`` as the trained ones are.

``tokenize.<modality>.source`` names the released tokenizer's folder (``config.json`` +
``model.safetensors``, e.g. EPFL-VILAB/4M_tokenizers_semseg_4k_224-448); ``make tokenizers`` then
imports it instead of training one. Values stay this project's (the modality's adapter: crops,
checks, previews); each kind says how they become what ml-4m's tokenizer was trained on, and back:

- ``class_map`` (semseg): class ids shifted by one, "no class" (255) becoming 0, as ml-4m feeds
  its 134-label embedding; decoded, the argmax minus one (0, ml-4m's "no class", back to 255);
- ``feature_map`` (CLIP, DINOv2): the (D, G, G) features as they are; the widths must agree;
- ``image`` (RGB) and ``edge_map``: [0, 1] scaled to ml-4m's [-1, 1] (not ImageNet-standardised);
  ``direction_map`` (normals): [-1, 1] with x first, as ml-4m's. Their tokenizers (DiVAE) decode
  with a diffusion UNet (``DECODE_STEPS`` denoising steps, seeded, so a preview is reproducible):
  back to [0, 1], edges thresholded at the middle (this project's edge maps are binary), normals
  clipped to [-1, 1];
- ``continuous_map`` (depth): ml-4m's per-image truncated z-score (mean and variance of the values
  between the 10th and 90th percentile), exactly as ml-4m standardises its 16-bit depth; decoded,
  min-max scaled back to [0, 1]. The z-score does not see scale or shift, so a min-max normalised
  depth map gives ml-4m's input exactly, but only if it is depth: labels of inverse depth (MiDaS,
  Depth Anything) are refused, labels of Omnidata's depth (4M's own labeler) convert.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from four_m.core.coco import NO_CLASS
from four_m.core.modalities import MODALITIES
from four_m.core.precision import autocast_dtype
from four_m.core.storage import RootPath
from four_m.modalities.depth import DEPTH
from four_m.tokenize.base import TOKEN_DTYPE, Tokenizer, TokenizerInputError
from four_m.tokenize.maps import MapAdapter, configured
from four_m.tokenize.ml4m_vqvae import ML4MVQVAE, load_ml4m_vqvae

MARKER = "ml4m_tokenizer.json"
"""In a tokenizer folder: the tokenizer is an import of ml-4m's (its config and weights beside)."""
CONFIG, WEIGHTS = "config.json", "model.safetensors"
BATCH = 16


def _class_input(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.where(values == NO_CLASS, 0, values + 1)).long()


def _class_output(output: torch.Tensor) -> np.ndarray:
    ids = output.argmax(dim=1).numpy() - 1
    return np.where(ids < 0, NO_CLASS, ids).astype(np.int64)


def _feature_input(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(values).float()


def _feature_output(output: torch.Tensor) -> np.ndarray:
    return output.numpy().astype(np.float32)


def _unit_to_signed(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(values).float() * 2 - 1


def _signed_to_unit(output: torch.Tensor) -> np.ndarray:
    return ((output + 1) / 2).clamp(0, 1).numpy().astype(np.float32)


def _signed_to_edges(output: torch.Tensor) -> np.ndarray:
    return (output > 0).numpy().astype(np.float32)


def _directions(output: torch.Tensor) -> np.ndarray:
    return output.clamp(-1, 1).numpy().astype(np.float32)


def _standardised_depth(values: np.ndarray, trim: float = 0.1) -> torch.Tensor:
    """ml-4m's truncated depth standardisation, per image of a (B, 1, H, W) batch."""
    depth = torch.from_numpy(values).float()
    ordered = depth.flatten(1).sort(dim=1).values
    kept = ordered[:, int(trim * ordered.shape[1]) : int((1 - trim) * ordered.shape[1])]
    mean, variance = kept.mean(dim=1), kept.var(dim=1)
    return (depth - mean[:, None, None, None]) / torch.sqrt(variance + 1e-6)[:, None, None, None]


def _min_max(output: torch.Tensor) -> np.ndarray:
    low, high = output.amin(dim=(1, 2, 3), keepdim=True), output.amax(dim=(1, 2, 3), keepdim=True)
    span = torch.where(high > low, high - low, torch.ones_like(high))  # a constant map -> all 0
    return ((output - low) / span).numpy().astype(np.float32)


def _any_values(adapter: MapAdapter) -> str | None:
    return None


def _depth_not_inverse(adapter: MapAdapter) -> str | None:
    quantity = getattr(adapter, "quantity", None)  # the continuous_map adapter's
    if quantity == DEPTH:
        return None
    return (
        f"ml-4m's depth tokenizer takes depth (its per-image z-score), these labels are {quantity}"
        " (MiDaS, Depth Anything), whose z-score is another map: label with Omnidata's depth model"
        " (make models OMNIDATA_DEPTH=omnidata_dpt_depth_v2.ckpt, 4M's own labeler)"
    )


@dataclass(frozen=True)
class Conversion:
    to_input: Callable[[np.ndarray], torch.Tensor]
    """A batch of this project's values -> what ml-4m's tokenizer takes."""
    to_values: Callable[[torch.Tensor], np.ndarray]
    """ml-4m's decoded output -> a batch of this project's values."""
    refusal: Callable[[MapAdapter], str | None] = _any_values
    """Why the modality's labels cannot be converted faithfully (None: they can)."""


CONVERSIONS: Mapping[str, Conversion] = {
    "class_map": Conversion(_class_input, _class_output),
    "feature_map": Conversion(_feature_input, _feature_output),
    "image": Conversion(_unit_to_signed, _signed_to_unit),
    "edge_map": Conversion(_unit_to_signed, _signed_to_edges),
    "direction_map": Conversion(_feature_input, _directions),
    "continuous_map": Conversion(_standardised_depth, _min_max, _depth_not_inverse),
}
"""Map kind -> how its values become ml-4m's tokenizer input and come back."""


class ML4MTokenizer(Tokenizer):
    fixed_length = True

    def __init__(self, modality: str, adapter: MapAdapter, network: ML4MVQVAE, folder: Path):
        conversion = CONVERSIONS[MODALITIES[modality].kind]  # every map kind has one
        refusal = conversion.refusal(adapter)
        if refusal is not None:
            raise TokenizerInputError(f"{modality}: {refusal}")
        self.modality, self.adapter, self.network, self.folder = modality, adapter, network, folder
        self.conversion = conversion
        self.autocast: torch.dtype | None = None
        """Encoding's autocast dtype (:meth:`run_on`); None: fp32. Decoding is always fp32."""
        self._check_fit()

    @classmethod
    def from_source(cls, modality: str, source: str | Path, adapter: MapAdapter) -> ML4MTokenizer:
        folder = Path(source)
        for name in (CONFIG, WEIGHTS):
            if not (folder / name).is_file():
                raise TokenizerInputError(f"{modality}: {folder} has no {name} (an ml-4m tokenizer folder holds both)")
        config = json.loads((folder / CONFIG).read_text())
        return cls(modality, adapter, load_ml4m_vqvae(config, load_file(str(folder / WEIGHTS))), folder)

    def _check_fit(self) -> None:
        """The imported network must take this modality's values as they are here: else say what differs."""
        network, name = self.network, self.modality
        if network.labels is not None and network.labels != getattr(self.adapter, "classes", -1) + 1:
            raise TokenizerInputError(
                f"{name}: ml-4m's tokenizer has {network.labels} labels, this modality"
                f" {getattr(self.adapter, 'classes', None)} classes + 1 (no class)"
            )
        channels = self.network.proj.in_channels
        if network.labels is None and self.adapter.shape[0] != channels:
            raise TokenizerInputError(
                f"{name}: ml-4m's tokenizer takes {channels}-wide features, this modality's labels are"
                f" {self.adapter.shape[0]} wide (another layer or model of the teacher network)"
            )
        if self.adapter.size % network.patch:
            raise TokenizerInputError(
                f"{name}: a {self.adapter.size} px value does not split into {network.patch} px patches"
            )

    @property
    def vocab_size(self) -> int:
        return self.network.codebook_size

    @property
    def grid(self) -> int:
        return self.adapter.size // self.network.patch

    @property
    def max_tokens(self) -> int:
        return self.grid**2

    @property
    def device(self) -> torch.device:
        return self.network.codebook.device

    def run_on(self, device_type: str, precision: str) -> None:
        device = "cuda" if device_type == "cuda" and torch.cuda.is_available() else "cpu"
        self.network.to(device)
        self.autocast = autocast_dtype(precision, device)

    def encode(self, values: Sequence[np.ndarray]) -> list[np.ndarray]:
        for value in values:
            self.adapter.check(value)
        ids: list[np.ndarray] = []
        for start in range(0, len(values), BATCH):
            batch = self.conversion.to_input(np.stack(values[start : start + BATCH])).to(self.device)
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                ids += list(self.network.tokenize(batch).flatten(1).cpu().numpy().astype(TOKEN_DTYPE))
        return ids

    def decode(self, ids: Sequence[np.ndarray]) -> list[np.ndarray]:
        grids = []
        for sequence in ids:
            sequence = np.asarray(sequence)
            if sequence.shape != (self.max_tokens,):
                raise TokenizerInputError(f"{self.modality}: expected {self.max_tokens} ids, got {sequence.shape}")
            self.check_ids(sequence, "decode")
            grids.append(sequence.astype(np.int64).reshape(self.grid, self.grid))
        values: list[np.ndarray] = []
        for start in range(0, len(grids), BATCH):
            output = self.network.decode_tokens(
                torch.from_numpy(np.stack(grids[start : start + BATCH])).to(self.device)
            )
            values += list(self.conversion.to_values(output.cpu()))
        return values

    def crop(self, value: np.ndarray, crop) -> np.ndarray:
        return self.adapter.crop(value, crop)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in (CONFIG, WEIGHTS):
            shutil.copyfile(self.folder / name, directory / name)
        marker = {"modality": self.modality, "image_size": self.adapter.size, "adapter_params": self.adapter.params()}
        (directory / MARKER).write_text(json.dumps(marker, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> ML4MTokenizer:
        marker = json.loads((Path(directory) / MARKER).read_text())
        adapter = configured(marker["modality"], marker["image_size"], marker["adapter_params"])
        return cls.from_source(marker["modality"], directory, adapter)


def is_imported(directory: RootPath) -> bool:
    """Whether a tokenizer folder (local or on a remote root) holds an import of ml-4m's."""
    return (directory / MARKER).is_file()
