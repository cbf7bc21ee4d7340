"""semseg: COCO panoptic's 133 classes per pixel, from Mask2Former (4M's choice)."""

from four_m.core.config import LabelerConfig, VQConfig
from four_m.core.modalities import ModalitySpec

MODALITY = ModalitySpec(
    name="semseg",
    reference="tok_semseg@224",
    kind="class_map",
    folder="labels/semseg",
    column="semseg",
    max_tokens=14 * 14,
    labeler="four_m.labelers.semseg:SemsegLabeler",
    labeler_config=LabelerConfig(input_size=384),
    tokenizer_config=VQConfig(),
    card_tasks=("image-segmentation",),
    order=30,
)
