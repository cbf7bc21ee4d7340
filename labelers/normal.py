"""Surface-normal pseudo-labels: a learned DPT with a 3-channel dense head, one 8-bit RGB PNG per image.

4M labels normals with Omnidata's model, DPT-Hybrid with a 3-channel output head. Two heads load:

- Omnidata's own (``labelers.omnidata``: DPT's depth head layout, two 3x3 convolutions, then 1x1
  to 3 channels and a ReLU), converted from its released checkpoint by ``make models
  OMNIDATA=<ckpt>``. It emits the colour (n + 1) / 2, clamped to [0, 1] as Omnidata does, so
  n = 2 c - 1. A converted folder says so in its config (``normal_head: omnidata``).
- A dense head, ``DPTForSemanticSegmentation`` with ``num_labels=3``, whose "logits" are the vector
  itself (the tiny random-init variant, and any checkpoint trained that way).

Encoding: vectors are scaled to unit length, upsampled to the view (bilinear, then unit length
again: interpolating unit vectors shortens them) and stored per channel as

    stored v (uint8, 0..255)  ->  n = v / 255 * 2 - 1

so a decoded vector is unit length to within 8-bit rounding (|n| - 1 < 0.01). A pixel whose vector
is exactly zero has no direction and stays (0, 0, 0), stored as mid-grey.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch
from transformers import DPTConfig, DPTForSemanticSegmentation
from transformers.models.dpt.modeling_dpt import DPTPreTrainedModel

from four_m.core.errors import UserError
from four_m.core.label_codec import encode_png
from four_m.labelers.dpt import DPTLabeler
from four_m.labelers.omnidata import DPTForOmnidataNormals, is_converted, omnidata_config
from four_m.labelers.resize import resize_maps


class NormalLabeler(DPTLabeler):
    """Unit surface normals from a DPT dense head, at the label view's size."""

    name = "normal"
    model_cls = DPTForSemanticSegmentation
    tiny_head = {
        "num_labels": 3,
        "id2label": {0: "normal_x", 1: "normal_y", 2: "normal_z"},
        # The auxiliary head only serves a training loss; a converted checkpoint has none either.
        "use_auxiliary_head": False,
    }

    def schema(self) -> pa.Schema:
        return pa.schema([pa.field("normal", pa.binary())])

    def provenance(self) -> dict[str, str]:
        head = "Omnidata's head, colour (n + 1) / 2" if self._omnidata(self.source) else "DPT dense head"
        return {
            **super().provenance(),
            "normal_source": f"learned ({head})",
            "normal_encoding": "8-bit RGB PNG, n = v / 255 * 2 - 1 per channel, unit length",
        }

    def _omnidata(self, source: str, revision: str | None = None) -> bool:
        """Whether ``source`` is a converted Omnidata model (its config says so); the tiny variant is not."""
        if self.random_init:
            return self.dry_run  # the full-size random variant is built in Omnidata's layout
        return is_converted(source, self.name, revision)

    def production_model(self, config: DPTConfig) -> DPTPreTrainedModel:
        """Omnidata's layout: the production normal model is the converted one's architecture."""
        return DPTForOmnidataNormals(omnidata_config())

    def model_class(self, source: str, revision: str | None) -> type[DPTPreTrainedModel]:
        return DPTForOmnidataNormals if self._omnidata(source, revision) else DPTForSemanticSegmentation

    def load(self, source: str, revision: str | None) -> None:
        super().load(source, revision)
        self.emits_colour = isinstance(self.model, DPTForOmnidataNormals)
        if not self.emits_colour and self.model.config.num_labels != 3:
            raise UserError(
                f"normal: {source!r} has a {self.model.config.num_labels}-channel head; "
                "a normal model has exactly 3 (x, y, z)"
            )

    @torch.inference_mode()
    def label(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        output = self.forward(pixels)
        if self.emits_colour:  # Omnidata: the colour (n + 1) / 2, clamped to [0, 1] as Omnidata does
            vectors = unit_length(output.predicted_depth.float().clamp(0.0, 1.0) * 2 - 1)  # (B, 3, S, S)
        else:
            vectors = unit_length(output.logits.float())  # (B, 3, S, S)
        normals = unit_length(resize_maps(vectors, self.view_size))  # (B, 3, V, V)
        codes = ((normals.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
        return [{"normal": encode_png(code)} for code in codes.permute(0, 2, 3, 1).cpu().numpy()]


def unit_length(vectors: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> the same directions at unit length; exactly-zero vectors stay zero.

    The guard is the smallest positive float, not an epsilon like 1e-6: a random-init head emits
    vectors around 1e-8 long that still have a direction.
    """
    length = torch.linalg.vector_norm(vectors, dim=1, keepdim=True)  # (B, 1, H, W)
    return vectors / length.clamp_min(torch.finfo(vectors.dtype).tiny)
