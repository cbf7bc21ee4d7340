"""sam_instance: 4M-21's SAM instances, masks from SAM's automatic generator on a regular point grid,
stored as run-length encoded masks of the label view (``core.label_codec.encode_rle``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from four_m.core.config import RUNTIME_ONLY, LabelerConfig, check
from four_m.core.modalities import ModalitySpec

DRY_RUN_POINTS_PER_SIDE = 4
"""The prompt grid's side in ``make dryrun`` (production: 32)."""


@dataclass(frozen=True)
class SamInstanceConfig(LabelerConfig):
    input_size: int = 1024
    """SAM's own input side: its image encoder is trained (and its position embeddings sized) for it."""
    points_per_side: int = 32
    """The prompt grid is points_per_side² points at cell centres: SAM's automatic generator default,
    which 4M-21 labels with (SAM-H)."""
    points_per_batch: int = field(default=64, metadata=RUNTIME_ONLY)
    """Points per image prompted in one mask-decoder pass; decoder memory grows with
    ``batch_size * points_per_batch``. Each point is decoded on its own, so it never shapes labels."""
    pred_iou_thresh: float = 0.88
    """Masks whose predicted IoU (SAM's own quality estimate) is below this are dropped (SAM's default)."""
    stability_score_thresh: float = 0.95
    """Masks whose stability (IoU of the mask at logit +1 vs -1) is below this are dropped (SAM's default)."""
    mask_nms_thresh: float = 0.7
    """A mask whose IoU with a better-scored kept mask exceeds this is dropped (1.0: none is)."""
    min_area: int = 0
    """Masks of fewer pixels (at the label view) are dropped; an empty mask always is."""
    max_instances: int = 64
    """The best-scored masks kept per image."""

    def __post_init__(self) -> None:
        super().__post_init__()
        key = "label.sam_instance"
        check(self.points_per_side >= 1, f"{key}.points_per_side", "must be >= 1")
        check(self.points_per_batch >= 1, f"{key}.points_per_batch", "must be >= 1")
        check(0.0 <= self.pred_iou_thresh <= 1.0, f"{key}.pred_iou_thresh", "must be in [0, 1]")
        check(0.0 <= self.stability_score_thresh <= 1.0, f"{key}.stability_score_thresh", "must be in [0, 1]")
        check(0.0 < self.mask_nms_thresh <= 1.0, f"{key}.mask_nms_thresh", "must be in (0, 1]")
        check(self.min_area >= 0, f"{key}.min_area", "must be >= 0")
        check(self.max_instances >= 1, f"{key}.max_instances", "must be >= 1")

    def at_dry_run_scale(self) -> SamInstanceConfig:
        """A grid of ``DRY_RUN_POINTS_PER_SIDE``² prompts, decoded in one pass: SAM-H's decoder costs the
        same for every prompt, so the dry run measures one pass and scales it to production's grid
        (``SamInstanceLabeler.cost_parts``); at 32 x 32 the decoder alone would keep a CPU busy for
        minutes per image."""
        side = min(self.points_per_side, DRY_RUN_POINTS_PER_SIDE)
        return replace(self, points_per_side=side, points_per_batch=side * side)


MODALITY = ModalitySpec(
    name="sam_instance",
    kind="instances",
    folder="labels/sam_instance",
    column="sam_instance",
    labeler="four_m.labelers.sam:SamInstanceLabeler",
    labeler_config=SamInstanceConfig(),
    card_tasks=("mask-generation",),
    no_metric=(
        "label-only: not tokenized yet (4M-21 rasterises up to 20 masks at 64x64 for a 1k-code tokenizer); "
        "read by sam_edge and metadata"
    ),
    order=80,
)
