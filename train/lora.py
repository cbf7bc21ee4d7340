"""LoRA adapters on the 4M model's attention and MLP projections, and their merged export.

LoRA (Hu et al., 2021; ml-4m's ``fourm/utils/lora_utils.py`` offers the same for fine-tuning) keeps
a pretrained linear map ``W`` frozen and learns a low-rank change: ``y = W x + (alpha / r) B A x``
with ``A`` (r x in) and ``B`` (out x r). ``B`` starts at zero, so an adapted model starts as the
pretrained one; only ``A`` and ``B`` train, a few per cent of the parameters. Merging writes
``W + (alpha / r) B A`` back into a plain ``nn.Linear``: the exported model has the original layout
(its weights load as any run's) and computes what the adapted one did.

Targets are module names inside the blocks: ``query``, ``key_value``, ``out`` (attention) and
``gate_up``, ``down`` (SwiGLU), in the encoder and the decoder alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from four_m.core.errors import UserError

TARGETS = ("query", "key_value", "out", "gate_up", "down")
"""Every linear map of the attention and MLP layers (``train.model.Attention``, ``SwiGLU``)."""


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``rank`` update scaled by ``alpha / rank``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise UserError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing what this module computes."""
        merged = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        merged.to(self.base.weight.device, self.base.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(self.base.weight + (self.lora_b @ self.lora_a) * self.scale)
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged


def add_lora(model: nn.Module, rank: int, alpha: float, targets: Iterable[str] = TARGETS) -> list[str]:
    """Wrap every ``nn.Linear`` of ``model`` whose attribute name is in ``targets``; freeze the rest of
    the model. Returns the wrapped modules' names. Raises ``UserError`` if none matched."""
    wanted = set(targets)
    unknown = sorted(wanted - set(TARGETS))
    if unknown:
        raise UserError(f"unknown LoRA targets {unknown}; known: {', '.join(TARGETS)}")
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in wanted and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise UserError(f"no linear layer named {sorted(wanted)} in the model: nothing to adapt")
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear`` of ``model`` (in place) by its merged ``nn.Linear``; returns ``model``."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    return model
