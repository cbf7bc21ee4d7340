"""Loading transformers models the production way, shared by every transformers-based labeler."""

from __future__ import annotations

import torch
import transformers
from transformers import AutoImageProcessor, PreTrainedModel

# One progress bar per model load in every actor drowns the stage's own output.
transformers.utils.logging.disable_progress_bar()


def load_model(model_cls: type[PreTrainedModel], source: str, revision: str | None, device: torch.device):
    """``from_pretrained`` from a hub id (the local cache first) or a local directory, in eval mode."""
    model = model_cls.from_pretrained(source, revision=revision)
    return model.eval().to(device)


def normalisation(source: str, revision: str | None) -> tuple[list[float], list[float]]:
    """The model's own mean/std from its saved image processor: the stage has already resized."""
    processor = AutoImageProcessor.from_pretrained(source, revision=revision)
    return list(processor.image_mean), list(processor.image_std)
