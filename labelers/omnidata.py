"""Omnidata's released surface-normal and depth models (DPT-Hybrid) as folders the normal and
depth labelers load.

4M labels normals and depth with Omnidata's DPT-Hybrid (EPFL-VILAB/omnidata,
``omnidata_dpt_normal_v2.ckpt`` and ``omnidata_dpt_depth_v2.ckpt``): a timm ViT-B with a ResNet-50
(BiT) stem, MiDaS's reassemble and fusion neck, and MiDaS's depth head, ending in 3 channels for
normals (its output clamped to [0, 1] is the colour (n + 1) / 2) and in 1 for depth (z-buffer
depth, not MiDaS's inverse depth, clamped to [0, 1] as Omnidata does). transformers' DPT has the
same backbone and neck and the same depth head, so depth converts into ``DPTForDepthEstimation`` as
it is and :class:`DPTForOmnidataNormals` swaps the head's last 1x1 convolution for a 3-channel one;
:func:`convert_state_dict` renames Omnidata's (MiDaS and timm) weight names to transformers' and
splits each fused query-key-value matrix into three. A converted folder's config says what it is
(``normal_head: omnidata`` or ``depth_head: omnidata``, :func:`is_converted`); it is safetensors
plus JSON, loaded without unpickling; only the conversion reads the checkpoint, with torch's
``weights_only`` loader (tensors and plain containers only).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, DPTConfig, DPTForDepthEstimation

from four_m.core.errors import UserError
from four_m.labelers.dpt import dpt_hybrid_config, save_processor

OMNIDATA_HEAD = "omnidata"
"""``config.<task>_head`` of a converted folder: the labeler reads its output as Omnidata's."""


class DPTForOmnidataNormals(DPTForDepthEstimation):
    """DPT with Omnidata's normal head: the depth head's layout, its last 1x1 convolution to 3 channels.

    ``predicted_depth`` is then (B, 3, H, W): the normal's colour (n + 1) / 2 (after the head's ReLU;
    Omnidata clamps it to [0, 1]).
    """

    def __init__(self, config: DPTConfig):
        super().__init__(config)
        last = self.head.head[4]
        self.head.head[4] = nn.Conv2d(last.in_channels, 3, kernel_size=1)


TASKS: Mapping[str, type[DPTForDepthEstimation]] = {"normal": DPTForOmnidataNormals, "depth": DPTForDepthEstimation}
"""Omnidata task -> the transformers class its checkpoint converts into."""


def omnidata_config(
    overrides: Mapping[str, Any] | None = None, backbone: Mapping[str, Any] | None = None, task: str = "normal"
) -> DPTConfig:
    """Omnidata's ``task`` model: DPT-Hybrid at 384 px (or another size, for tests), marked as Omnidata's."""
    return dpt_hybrid_config(overrides, backbone, **{f"{task}_head": OMNIDATA_HEAD})


def is_converted(source: str, task: str, revision: str | None = None) -> bool:
    """Whether the model folder or hub id ``source`` is an Omnidata ``task`` model converted here."""
    return getattr(AutoConfig.from_pretrained(source, revision=revision), f"{task}_head", None) == OMNIDATA_HEAD


def _fusion(n: str) -> str:
    return str(4 - int(n))  # MiDaS's refinenet4 (the coarsest) is transformers' first fusion layer


RENAMES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = tuple(
    (re.compile(pattern), target)
    for pattern, target in (
        (r"^pretrained\.model\.cls_token$", lambda m: "dpt.embeddings.cls_token"),
        (r"^pretrained\.model\.pos_embed$", lambda m: "dpt.embeddings.position_embeddings"),
        (r"^pretrained\.model\.patch_embed\.proj\.(\w+)$", lambda m: f"dpt.embeddings.projection.{m[1]}"),
        (
            r"^pretrained\.model\.patch_embed\.backbone\.stem\.conv\.weight$",
            lambda m: "dpt.embeddings.backbone.bit.embedder.convolution.weight",
        ),
        (
            r"^pretrained\.model\.patch_embed\.backbone\.stem\.norm\.(\w+)$",
            lambda m: f"dpt.embeddings.backbone.bit.embedder.norm.{m[1]}",
        ),
        (
            r"^pretrained\.model\.patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.(.+)$",
            lambda m: f"dpt.embeddings.backbone.bit.encoder.stages.{m[1]}.layers.{m[2]}.{m[3]}",
        ),
        (
            r"^pretrained\.model\.blocks\.(\d+)\.norm1\.(\w+)$",
            lambda m: f"dpt.encoder.layer.{m[1]}.layernorm_before.{m[2]}",
        ),
        (
            r"^pretrained\.model\.blocks\.(\d+)\.norm2\.(\w+)$",
            lambda m: f"dpt.encoder.layer.{m[1]}.layernorm_after.{m[2]}",
        ),
        (
            r"^pretrained\.model\.blocks\.(\d+)\.attn\.proj\.(\w+)$",
            lambda m: f"dpt.encoder.layer.{m[1]}.attention.output.dense.{m[2]}",
        ),
        (
            r"^pretrained\.model\.blocks\.(\d+)\.mlp\.fc1\.(\w+)$",
            lambda m: f"dpt.encoder.layer.{m[1]}.intermediate.dense.{m[2]}",
        ),
        (
            r"^pretrained\.model\.blocks\.(\d+)\.mlp\.fc2\.(\w+)$",
            lambda m: f"dpt.encoder.layer.{m[1]}.output.dense.{m[2]}",
        ),
        (r"^pretrained\.model\.norm\.(\w+)$", lambda m: f"dpt.layernorm.{m[1]}"),
        (
            r"^pretrained\.act_postprocess(\d)\.0\.project\.0\.(\w+)$",
            lambda m: f"neck.reassemble_stage.readout_projects.{int(m[1]) - 1}.0.{m[2]}",
        ),
        (
            r"^pretrained\.act_postprocess(\d)\.3\.(\w+)$",
            lambda m: f"neck.reassemble_stage.layers.{int(m[1]) - 1}.projection.{m[2]}",
        ),
        (
            r"^pretrained\.act_postprocess(\d)\.4\.(\w+)$",
            lambda m: f"neck.reassemble_stage.layers.{int(m[1]) - 1}.resize.{m[2]}",
        ),
        (r"^scratch\.layer(\d)_rn\.weight$", lambda m: f"neck.convs.{int(m[1]) - 1}.weight"),
        (
            r"^scratch\.refinenet(\d)\.out_conv\.(\w+)$",
            lambda m: f"neck.fusion_stage.layers.{_fusion(m[1])}.projection.{m[2]}",
        ),
        (
            r"^scratch\.refinenet(\d)\.resConfUnit(\d)\.conv(\d)\.(\w+)$",
            lambda m: f"neck.fusion_stage.layers.{_fusion(m[1])}.residual_layer{m[2]}.convolution{m[3]}.{m[4]}",
        ),
        (r"^scratch\.output_conv\.(\d)\.(\w+)$", lambda m: f"head.head.{m[1]}.{m[2]}"),
    )
)
"""Omnidata (MiDaS, timm) weight name -> transformers' DPT name; the fused qkv is split apart."""
QKV = re.compile(r"^pretrained\.model\.blocks\.(\d+)\.attn\.qkv\.(\w+)$")
DROPPED = re.compile(r"^pretrained\.model\.head\.")
"""timm's classifier head: the ViT's, unused by DPT."""
WRAPPERS = ("model.", "module.")
"""Prefixes a training wrapper adds (Lightning's ``model.``, DataParallel's ``module.``)."""


class OmnidataConversionError(UserError):
    """A checkpoint that is not the Omnidata DPT-Hybrid model asked for, named by its first odd key."""


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Omnidata's weight names and layout -> transformers' DPT's; an unknown name stops naming it."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        for prefix in WRAPPERS:
            name = name.removeprefix(prefix)
        if DROPPED.match(name):
            continue
        qkv = QKV.match(name)
        if qkv:
            query, key, value = tensor.chunk(3, dim=0)
            layer = f"dpt.encoder.layer.{qkv[1]}.attention.attention"
            out |= {f"{layer}.query.{qkv[2]}": query, f"{layer}.key.{qkv[2]}": key, f"{layer}.value.{qkv[2]}": value}
            continue
        target = next((rename(match) for pattern, rename in RENAMES if (match := pattern.match(name))), None)
        if target is None:
            raise OmnidataConversionError(f"weight {name!r} is not part of Omnidata's DPT-Hybrid models")
        out[target] = tensor
    return out


def load_converted(state: Mapping[str, torch.Tensor], config: DPTConfig, task: str) -> DPTForDepthEstimation:
    """The ``task`` model with the converted weights; every weight must be there, none extra, each of its shape."""
    model = TASKS[task](config)
    converted = convert_state_dict(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = sorted(k for k in set(expected) & set(converted) if expected[k].shape != converted[k].shape)
    for what, names in (("lacks", missing), ("has unknown", unexpected), ("has another shape for", wrong)):
        if names:
            raise OmnidataConversionError(f"the checkpoint {what} {names[0]!r} ({len(names)} such weights)")
    model.load_state_dict(converted, strict=True)
    return model.eval()


def convert_checkpoint(checkpoint: Path, out: Path, task: str = "normal", config: DPTConfig | None = None) -> Path:
    """Omnidata's ``task`` ``.ckpt`` (a Lightning checkpoint or a bare state dict) -> ``out``, loadable
    by that labeler (``label.<task>.model: <out>``); ``config`` defaults to Omnidata's 384 px model."""
    config = config or omnidata_config(task=task)
    try:
        raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read is one message
        raise OmnidataConversionError(
            f"cannot read {checkpoint} as tensors only: {type(err).__name__}: {err}"
        ) from None
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    model = load_converted(state, config, task)
    model.save_pretrained(out)
    save_processor(out, config.image_size)
    return out
