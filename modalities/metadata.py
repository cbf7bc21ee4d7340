"""metadata: 4M-21's image metadata, one value per key (its key ids 0..20), computed from the image,
its url-list row and this run's other labels; keys whose source did not run are left out."""

from dataclasses import dataclass

from four_m.core.config import AlgorithmConfig, check
from four_m.core.modalities import ModalitySpec

KEYS = (
    "original_width",
    "original_height",
    "caption_n_chars",
    "caption_n_words",
    "caption_n_sentences",
    "n_humans",
    "n_sam_instances",
    "n_coco_instances",
    "coco_instance_diversity",
    "colorfulness",
    "brightness",
    "contrast",
    "saturation",
    "entropy",
    "walkability",
    "objectness",
    "semantic_diversity",
    "geometric_complexity",
    "occlusion_score",
    "watermark_score",
    "aesthetic_score",
)
"""4M-21's metadata keys; a key's index is its id, the ``v1=<id>`` token (ml-4m's fixed map, so that
adding keys never renumbers the others)."""


@dataclass(frozen=True)
class MetadataConfig(AlgorithmConfig):
    input_size: int = 224
    caption_source: str = "alt_text"
    """Whose caption the caption_* keys count: the url list's (``alt_text``, 4M's CC12M captions) or
    the captioner's (``generated``, read from the caption labels)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        sources = ("alt_text", "generated")
        check(self.caption_source in sources, "label.metadata.caption_source", f"one of {sources}")


MODALITY = ModalitySpec(
    name="metadata",
    reference="metadata",
    kind="metadata",
    folder="labels/metadata",
    column="metadata",
    labeler="four_m.labelers.metadata:MetadataLabeler",
    labeler_config=MetadataConfig(),
    uses=("caption", "det", "semseg", "normal", "sam_instance"),
    card_tasks=("image-to-text",),
    order=90,
)
