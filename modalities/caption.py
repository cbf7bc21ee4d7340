"""caption: the url list's alt-text (4M's CC12M captions) and a captioner's (BLIP family)."""

from dataclasses import dataclass

from four_m.core.config import LabelerConfig, check
from four_m.core.modalities import ModalitySpec


@dataclass(frozen=True)
class CaptionConfig(LabelerConfig):
    input_size: int = 384
    max_new_tokens: int = 30
    num_beams: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.max_new_tokens >= 1, "label.caption.max_new_tokens", "must be >= 1")
        check(self.num_beams >= 1, "label.caption.num_beams", "must be >= 1")


MODALITY = ModalitySpec(
    name="caption",
    reference="caption",
    kind="text",
    folder="labels/caption",
    column="caption",
    labeler="four_m.labelers.caption:CaptionLabeler",
    labeler_config=CaptionConfig(),
    alt_text=True,
    card_tasks=("image-to-text", "text-to-image"),
    order=50,
)
