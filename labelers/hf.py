"""Loading transformers models the production way, shared by every transformers-based labeler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoImageProcessor, PreTrainedModel

# One progress bar per model load in every actor drowns the stage's own output.
transformers.utils.logging.disable_progress_bar()


def load_model(model_cls: type[PreTrainedModel], source: str, revision: str | None, device: torch.device):
    """``from_pretrained`` from a hub id (the local cache first) or a local directory, in eval mode.

    A local directory is read from safetensors only: it may be the tiny variant's folder in the
    dataset root or scratch space, which others can write, and a ``.bin`` there would be unpickled
    (transformers restricts that unpickling with ``weights_only``; safetensors needs no such trust).
    ``save_pretrained`` writes safetensors. A hub id keeps transformers' choice.
    """
    local = Path(source).is_dir()
    model = model_cls.from_pretrained(source, revision=revision, use_safetensors=True if local else None)
    return model.eval().to(device)


def normalisation(source: str, revision: str | None) -> tuple[list[float], list[float]]:
    """The model's own mean/std from its saved image processor: the stage has already resized."""
    processor = AutoImageProcessor.from_pretrained(source, revision=revision)
    return list(processor.image_mean), list(processor.image_std)


def normalised(pixels: np.ndarray, mean: list[float], std: list[float], device: torch.device) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float, scaled to [0, 1] and standardised per channel."""
    tensor = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (tensor - mean_t) / std_t
