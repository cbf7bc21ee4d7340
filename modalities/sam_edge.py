"""sam_edge: the boundaries of the SAM instances as an edge map (4M-21's SAM edges), tokenized by the
Canny edge tokenizer as in 4M-21 (``tokenize.sam_edge.share: canny_edge``)."""

from four_m.core.config import AlgorithmConfig, VQConfig
from four_m.core.modalities import ModalitySpec

MODALITY = ModalitySpec(
    name="sam_edge",
    reference="tok_sam_edge@224",
    kind="edge_map",
    folder="labels/sam_edge",
    column="sam_edge",
    max_tokens=14 * 14,
    labeler="four_m.labelers.sam_edge:SamEdgeLabeler",
    labeler_config=AlgorithmConfig(input_size=224),
    tokenizer_config=VQConfig(share="canny_edge"),
    requires=("sam_instance",),
    card_tasks=("image-to-image",),
    order=81,
)
