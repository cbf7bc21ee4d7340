"""What the masking produces and the model consumes: one padded batch of input and target tokens.

Every token carries its modality (an index into the run's modality list) and its position inside
that modality (row-major grid index for maps, index for sequences), so the model can add the
right embeddings whatever mix of modalities a sample drew. Sizes are the masking budgets, not the
number of modalities: that is why a step costs the same with 7 or 14 modalities.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class MaskedBatch:
    input_ids: torch.Tensor
    """(B, N_in) long: token ids, each in its own modality's vocabulary; 0 where padding."""
    input_modality: torch.Tensor
    """(B, N_in) long: modality index of each input token."""
    input_position: torch.Tensor
    """(B, N_in) long: position of each input token inside its modality."""
    input_mask: torch.Tensor
    """(B, N_in) bool: True for real tokens, False for padding."""
    target_ids: torch.Tensor
    """(B, N_tgt) long: the ids to predict."""
    target_modality: torch.Tensor
    """(B, N_tgt) long."""
    target_position: torch.Tensor
    """(B, N_tgt) long: maps: grid index of the masked token; sequences: index in the target sequence."""
    target_mask: torch.Tensor
    """(B, N_tgt) bool: True where a target counts in the loss."""
    decoder_input_ids: torch.Tensor
    """(B, N_tgt) long: sequences are teacher-forced (the previous target token, SOS first);
    map targets are predicted from a mask token, so their entries are ignored (0)."""
    pixels: dict[str, torch.Tensor] = field(default_factory=dict)
    """Pixel input name -> (B, S, S, 3) uint8 images: the input tokens of that modality are their
    patches at ``input_position`` (their ``input_ids`` are 0). Kept as bytes until the model
    standardises them, a quarter of float32's size on the way to the device."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by name, each pixel input's images as ``pixels.<name>``: to compare two batches."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "pixels"}
        return out | {f"pixels.{name}": images for name, images in self.pixels.items()}

    def to(self, device: torch.device | str) -> MaskedBatch:
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "pixels"}
        return MaskedBatch(**moved, pixels={name: images.to(device) for name, images in self.pixels.items()})
