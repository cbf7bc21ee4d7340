"""dinov2: 4M-21's tok_dinov2@224, DINOv2-B/14 patch features at 224 px on a 16 x 16 grid.

ml-4m's modality_info gives it patch size 14 and 256 tokens (an 8192-code tokenizer at scale); the
production labeler is ``facebook/dinov2-base``. Everything else comes from the ``feature_map`` kind.
"""

from four_m.core.config import LabelerConfig, VQConfig
from four_m.core.modalities import ModalitySpec

MODALITY = ModalitySpec(
    name="dinov2",
    reference="tok_dinov2@224",
    kind="feature_map",
    folder="labels/dinov2",
    column="dinov2",
    max_tokens=16 * 16,
    labeler="four_m.labelers.dinov2:Dinov2Labeler",
    labeler_config=LabelerConfig(input_size=224),
    tokenizer_config=VQConfig(grid=16),
    card_tasks=("image-feature-extraction",),
    order=45,
)
