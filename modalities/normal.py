"""normal: surface normals from a DPT model with a 3-channel head (4M used Omnidata's)."""

from four_m.core.config import LabelerConfig, VQConfig
from four_m.core.modalities import ModalitySpec

MODALITY = ModalitySpec(
    name="normal",
    reference="tok_normal@224",
    kind="direction_map",
    folder="labels/normal",
    column="normal",
    max_tokens=14 * 14,
    labeler="four_m.labelers.normal:NormalLabeler",
    labeler_config=LabelerConfig(input_size=384),
    tokenizer_config=VQConfig(),
    card_tasks=("image-to-image",),
    order=20,
)
