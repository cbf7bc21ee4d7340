"""clip: CLIP ViT-B/16 patch features on a 14 x 14 grid, as 4M's CLIP modality."""

from four_m.core.config import LabelerConfig, VQConfig
from four_m.core.modalities import ModalitySpec

MODALITY = ModalitySpec(
    name="clip",
    reference="tok_clip@224",
    kind="feature_map",
    folder="labels/clip",
    column="clip",
    max_tokens=14 * 14,
    labeler="four_m.labelers.clip:ClipLabeler",
    labeler_config=LabelerConfig(),
    tokenizer_config=VQConfig(),
    card_tasks=("image-feature-extraction",),
    order=40,
)
