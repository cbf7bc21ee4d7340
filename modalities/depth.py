"""depth: normalised inverse depth from a DPT model (4M used Omnidata's DPT-B-Hybrid)."""

from four_m.core.config import LabelerConfig, VQConfig
from four_m.core.modalities import ModalitySpec

MODALITY = ModalitySpec(
    name="depth",
    kind="continuous_map",
    folder="labels/depth",
    column="depth",
    max_tokens=14 * 14,
    labeler="four_m.labelers.depth:DepthLabeler",
    labeler_config=LabelerConfig(input_size=384),
    tokenizer_config=VQConfig(),
    card_tasks=("depth-estimation",),
    order=10,
)
