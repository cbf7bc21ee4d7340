"""depth: normalised inverse depth from a DPT model (4M used Omnidata's DPT-B-Hybrid), or from
Depth Anything V2 (``architecture: depth_anything``)."""

from dataclasses import dataclass, field

from four_m.core.config import SHAPING_IF_SET, LabelerConfig, VQConfig, check
from four_m.core.modalities import ModalitySpec

ARCHITECTURES = {"dpt": "dpt", "depth_anything": "depth_anything"}
"""``label.depth.architecture`` -> the transformers ``model_type`` a loaded checkpoint must have."""


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
