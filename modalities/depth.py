"""depth: normalised relative depth from a DPT model: inverse depth from MiDaS's DPT or Depth
Anything V2 (``architecture: depth_anything``), or depth itself from Omnidata's DPT-B-Hybrid (4M's
choice; ``make models OMNIDATA_DEPTH=<ckpt>``). Label files say which (``depth_quantity``)."""

from dataclasses import dataclass, field

from four_m.core.config import SHAPING_IF_SET, LabelerConfig, VQConfig, check
from four_m.core.modalities import ModalitySpec

ARCHITECTURES = {"dpt": "dpt", "depth_anything": "depth_anything"}
"""``label.depth.architecture`` -> the transformers ``model_type`` a loaded checkpoint must have."""
INVERSE_DEPTH, DEPTH = "inverse_depth", "depth"
QUANTITY_KEY = "depth_quantity"
"""Provenance (and so label-file metadata, ``four_m.depth_quantity``) key: which of the two a
depth label is, each scaled to [0, 1] per image. A file without it holds inverse depth."""


@dataclass(frozen=True)
class DepthConfig(LabelerConfig):
    input_size: int = 384
    architecture: str = field(default="dpt", metadata=SHAPING_IF_SET)
    """dpt (DPT-Hybrid, 4M's choice) or depth_anything (Depth Anything V2, transformers'
    ``DepthAnythingForDepthEstimation``: better and faster, e.g. ``depth-anything/Depth-Anything-V2-Base-hf``
    at input_size 518). Both predict relative inverse depth, stored alike. It picks the tiny variant's
    architecture offline and is checked against a loaded checkpoint's own."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.architecture in ARCHITECTURES, "label.depth.architecture", f"one of {', '.join(ARCHITECTURES)}")


MODALITY = ModalitySpec(
    name="depth",
    reference="tok_depth@224",
    kind="continuous_map",
    folder="labels/depth",
    column="depth",
    max_tokens=14 * 14,
    labeler="four_m.labelers.depth:DepthLabeler",
    labeler_config=DepthConfig(),
    tokenizer_config=VQConfig(),
    card_tasks=("depth-estimation",),
    order=10,
)
