"""SAM instance pseudo-labels: masks from SAM's automatic mask generation, run-length encoded.

4M-21 labels instances with SAM-H (``facebook/sam-vit-huge``) prompted by a regular point grid, as
SAM's automatic generator does. Per batch of label views:

1. the image encoder runs once per image (``get_image_embeddings``);
2. the mask decoder is prompted with ``points_per_side²`` single points at the grid's cell centres
   (in the ``input_size`` pixel frame), ``points_per_batch`` points per image per pass, three masks
   per point (``multimask_output``), of which the one of highest predicted IoU is kept;
3. masks below ``pred_iou_thresh`` (predicted IoU) or ``stability_score_thresh`` are dropped. The
   stability score is SAM's: the IoU of the mask thresholded at logit +1 with the mask thresholded
   at -1, here on the decoder's own logits (a quarter of the input side: 256² for SAM-H), where SAM
   computes it after upscaling to the photo; the survivors' logits are then resized bilinearly to
   the label view and binarised at 0;
4. masks smaller than ``min_area`` pixels (and empty ones) are dropped, and a greedy mask NMS by
   predicted IoU drops any mask whose IoU with a kept one exceeds ``mask_nms_thresh``, keeping at
   most ``max_instances``, best first.

Where this differs from SAM's generator: SAM keeps all three masks of a point and suppresses by box
IoU (``box_nms_thresh``); one mask per point and mask IoU keep the list short and the suppression
exact. No crops (``crop_n_layers = 0``, SAM's default) and no small-region clean-up (SAM's default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import torch
from transformers import SamConfig, SamImageProcessor, SamModel

from four_m.core.config import LabelerConfig
from four_m.core.errors import UserError
from four_m.core.label_codec import encode_rle
from four_m.labelers.base import LabelBatch
from four_m.labelers.hf import load_model, normalisation, normalised
from four_m.labelers.pretrained import CostPart, PretrainedLabeler
from four_m.labelers.resize import resize_maps
from four_m.modalities.sam_instance import SamInstanceConfig

INSTANCES = pa.list_(pa.struct([("counts", pa.list_(pa.int32())), ("score", pa.float32()), ("area", pa.int32())]))
"""One image's instances: RLE counts at the label view (``decode_rle``), predicted IoU, pixel count."""

TINY_SAM: dict[str, Any] = {
    "vision_config": {
        "hidden_size": 32,
        "output_channels": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "mlp_dim": 64,
        "window_size": 2,
        "global_attn_indexes": [1],
        # The sine/cosine point encoding is 2 * num_pos_feats wide: the decoder's width.
        "num_pos_feats": 16,
        # SAM's default 1e-10 (harmless under real weights) makes a random encoder's output the same
        # for every image; 0.02 lets the tiny model's masks depend on the image.
        "initializer_range": 0.02,
    },
    "prompt_encoder_config": {"hidden_size": 32},
    "mask_decoder_config": {
        "hidden_size": 32,
        "mlp_dim": 64,
        "num_attention_heads": 2,
        "iou_head_hidden_dim": 32,
    },
    # The decoder's init: at 0.02 its logits stay within 1e-4 of 0 (every stability score 0); at 0.4
    # they spread over a few units, so stability and predicted IoU vary as with real weights.
    "initializer_range": 0.4,
}
"""About 0.1 M parameters; SAM-H is ~7000x that (641 M)."""
PRODUCTION_SAM: dict[str, Any] = {
    # facebook/sam-vit-huge: ViT-H image encoder; transformers' defaults are its prompt encoder and decoder.
    "vision_config": {
        "hidden_size": 1280,
        "output_channels": 256,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "global_attn_indexes": [7, 15, 23, 31],
        "window_size": 14,
        "num_pos_feats": 128,
    },
    "prompt_encoder_config": {"hidden_size": 256},
    "mask_decoder_config": {"hidden_size": 256},
}
PATCH = 16
"""SAM's patch size; its masks come out at 4x the embedding grid, a quarter of the input side."""
NMS_BLOCK = 128
"""Candidate masks compared per matrix product in ``mask_nms``."""


class SamInstanceLabeler(PretrainedLabeler):
    """Instance masks of ``SamModel`` prompted by a point grid (production: SAM-H)."""

    name = "sam_instance"
    cfg: SamInstanceConfig

    def schema(self) -> pa.Schema:
        return pa.schema([pa.field("sam_instance", INSTANCES)])

    def provenance(self) -> dict[str, str]:
        side = self.cfg.points_per_side
        return {
            **super().provenance(),
            "mask_size": f"{self.view_size}x{self.view_size}",
            "mask_encoding": "rle-row-major",
            "point_grid": f"{side}x{side}",
        }

    def build_tiny(self, directory: Path) -> None:
        self._build(directory, TINY_SAM)

    def build_production(self, directory: Path) -> None:
        self._build(directory, PRODUCTION_SAM)

    def _build(self, directory: Path, sizes: dict[str, Any]) -> None:
        """Save SAM of ``sizes`` (``SamConfig`` keyword arguments) at ``input_size``: the image frame
        is set in both sub-configs that must agree on it (the encoder's, the prompt encoder's)."""
        size = self.cfg.input_size
        frame = {"image_size": size, "patch_size": PATCH}
        config = SamConfig(
            **{
                **sizes,
                "vision_config": {**sizes["vision_config"], **frame},
                "prompt_encoder_config": {**sizes["prompt_encoder_config"], **frame},
            }
        )
        SamModel(config).save_pretrained(directory)
        # ImageNet mean/std as SAM's processor; its resizing and padding are moot on a square view.
        mask = size // 4
        SamImageProcessor(
            size={"longest_edge": size},
            pad_size={"height": size, "width": size},
            mask_size={"longest_edge": mask},
            mask_pad_size={"height": mask, "width": mask},
        ).save_pretrained(directory)

    def load(self, source: str, revision: str | None) -> None:
        self.model = load_model(SamModel, source, revision, self.device)
        self.mean, self.std = normalisation(source, revision)
        expected = self.model.config.vision_config.image_size
        if expected != self.cfg.input_size:
            # Not a ValueError on purpose: ``setup`` would report it as missing weights.
            raise UserError(f"{self.name}: the checkpoint takes {expected} px images; set input_size: {expected}")
        self.grid = point_grid(self.cfg.points_per_side, self.cfg.input_size).to(self.device)

    @torch.inference_mode()
    def label(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        embeddings = self.model.get_image_embeddings(normalised(pixels, self.mean, self.std, self.device))
        found = [self._candidates(embeddings, chunk) for chunk in self.grid.split(self.cfg.points_per_batch)]
        images, scores, masks = (torch.cat(parts) for parts in zip(*found, strict=True))
        return [{"sam_instance": self._instances(scores[images == b], masks[images == b])} for b in range(len(pixels))]

    def cost_parts(self, batch: LabelBatch, production: LabelerConfig) -> list[CostPart]:
        """The image encoder once, then one decoder pass over this grid's first ``points_per_batch``
        prompts, scaled to production's grid: every prompt is decoded on its own, so the decoder's
        FLOPs grow linearly with the prompts, and its memory with the prompts of one pass. The
        encoder's run keeps its embeddings for the decoder's (the parts run in order). Left out: the
        mask NMS, whose size depends on how many masks pass the filters, which random weights say
        nothing about."""
        wanted = cast(SamInstanceConfig, production)
        pixels = normalised(batch.pixels, self.mean, self.std, self.device)
        prompts = self.grid[: self.cfg.points_per_batch]
        grid = wanted.points_per_side**2
        embedded: list[torch.Tensor] = []

        @torch.inference_mode()
        def encode() -> None:
            embedded[:] = [self.model.get_image_embeddings(pixels)]

        @torch.inference_mode()
        def decode() -> None:
            self._candidates(embedded[0], prompts)

        side = wanted.points_per_side
        return [
            CostPart("image encoder", encode),
            CostPart(
                f"mask decoder: {len(prompts)} prompts measured, x{grid / len(prompts):g} for {side}x{side}",
                decode,
                flops_times=grid / len(prompts),
                memory_times=min(wanted.points_per_batch, grid) / len(prompts),
            ),
        ]

    def _candidates(self, embeddings: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One decoder pass over ``points`` (P, 2) for every image -> the masks that pass the
        per-mask filters: (N,) image index, (N,) predicted IoU, (N, V, V) bool masks."""
        prompts = points[None, :, None, :].expand(len(embeddings), -1, -1, -1)  # (B, P, 1, 2)
        out = self.model(image_embeddings=embeddings, input_points=prompts, multimask_output=True)
        # Thresholds and pixel counts in fp32 whatever autocast computed the decoder in.
        with torch.autocast(self.device.type, enabled=False):
            ious = out.iou_scores.float()  # (B, P, 3)
            best = ious.argmax(dim=-1, keepdim=True)
            scores = ious.gather(-1, best).squeeze(-1)  # (B, P)
            low = out.pred_masks  # (B, P, 3, h, w)
            logits = low.gather(2, best[..., None, None].expand(-1, -1, -1, *low.shape[-2:])).squeeze(2)
            confident = scores >= self.cfg.pred_iou_thresh
            images, scores, logits = confident.nonzero()[:, 0], scores[confident], logits[confident].float()
            stable = stability_scores(logits) >= self.cfg.stability_score_thresh
            images, scores = images[stable], scores[stable]
            masks = resize_maps(logits[stable][:, None], self.view_size)[:, 0] > 0.0  # (N, V, V)
            large = torch.count_nonzero(masks, dim=(1, 2)) >= max(1, self.cfg.min_area)
            return images[large], scores[large], masks[large]

    def _instances(self, scores: torch.Tensor, masks: torch.Tensor) -> list[dict[str, Any]]:
        """One image's candidates -> its stored instances, best predicted IoU first."""
        order = torch.sort(scores, descending=True, stable=True).indices  # ties: grid order
        kept = mask_nms(masks[order], self.cfg.mask_nms_thresh, self.cfg.max_instances)
        chosen = order[kept]
        return [
            {"counts": encode_rle(mask), "score": float(score), "area": int(mask.sum())}
            for mask, score in zip(masks[chosen].cpu().numpy(), scores[chosen].cpu().numpy(), strict=True)
        ]


def point_grid(points_per_side: int, size: int) -> torch.Tensor:
    """(n², 2) (x, y) points at the cell centres of an n x n grid over a ``size`` px image, rows of
    points top to bottom: SAM's ``build_point_grid`` scaled to the input frame."""
    centres = (torch.arange(points_per_side, dtype=torch.float32) + 0.5) * (size / points_per_side)
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)


def stability_scores(logits: torch.Tensor, offset: float = 1.0) -> torch.Tensor:
    """SAM's stability score of (N, H, W) mask logits: IoU of the masks at +offset and -offset (the
    first lies inside the second, so it is a ratio of counts); 0 where even the loose mask is empty."""
    inner = torch.count_nonzero(logits > offset, dim=(1, 2))
    outer = torch.count_nonzero(logits > -offset, dim=(1, 2))
    return inner / outer.clamp(min=1)


def mask_nms(masks: torch.Tensor, threshold: float, limit: int) -> torch.Tensor:
    """Greedy NMS over (N, H, W) bool masks sorted best first -> indices of at most ``limit`` kept:
    a mask is kept unless its IoU with a mask kept before it exceeds ``threshold``.

    Candidates are taken ``NMS_BLOCK`` at a time: one matrix product gives a block's overlaps with
    itself and with the masks kept so far, and a short loop on the host decides the block. Products
    of whole blocks run ~15x faster than a matrix-vector product per kept mask, and the walk stops
    once ``limit`` masks are kept, so most candidates of a crowded image are never compared.
    """
    flat = masks.flatten(1)
    kept: list[int] = []
    for start in range(0, len(flat), NMS_BLOCK):
        if len(kept) == limit:
            break
        before = len(kept)
        rows = torch.cat([flat[kept], flat[start : start + NMS_BLOCK]]).float()  # 0/1: exact counts in fp32
        areas = rows.sum(dim=1)
        overlap = rows[before:] @ rows.T  # the block against the kept masks and itself
        over = (overlap / (areas[before:, None] + areas[None, :] - overlap) > threshold).cpu().numpy()
        columns = list(range(before))
        for index in range(len(rows) - before):
            if len(kept) == limit:
                break
            if not over[index, columns].any():
                columns.append(before + index)
                kept.append(start + index)
    return torch.tensor(kept, dtype=torch.long, device=masks.device)
