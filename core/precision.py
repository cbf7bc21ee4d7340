"""Numeric precision on accelerators, one setting for every network the pipeline runs.

``auto`` is mixed precision where it pays and is safe: bf16 autocast on a GPU that has bf16, fp16
autocast on an older GPU, full fp32 on a CPU (where autocast is slower, not faster). ``32`` is always
fp32; ``bf16`` and ``fp16`` force autocast with that type, on a CPU too (for tests and for CPUs with
fast bf16). torch is imported inside the functions: ``core`` stays importable without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "32", "bf16", "fp16")


def autocast_dtype(setting: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype ``setting`` selects on a device of ``device_type``; None: full fp32."""
    import torch

    if setting == "auto":
        if device_type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[setting]


def lightning_precision(setting: str, device_type: str) -> str:
    """The same choice as Lightning's ``precision`` argument, for training on ``device_type``."""
    dtype = autocast_dtype(setting, device_type)
    if dtype is None:
        return "32-true"
    return "bf16-mixed" if str(dtype) == "torch.bfloat16" else "16-mixed"
