"""canny_edge: OpenCV's Canny edges of the label view at 224 px, 4M-21's edge modality (real labels,
an algorithm, no weights)."""

from dataclasses import dataclass

from four_m.core.config import AlgorithmConfig, VQConfig, check
from four_m.core.modalities import ModalitySpec


@dataclass(frozen=True)
class CannyConfig(AlgorithmConfig):
    """4M-21 does not publish its Canny thresholds; the default derives them from each image's median
    grey level (low = (1 - sigma) * median, high = (1 + sigma) * median, the common "auto Canny"),
    so dark and bright photos get comparable edge densities. Fixed thresholds override it."""

    input_size: int = 224
    sigma: float = 0.33
    low_threshold: float | None = None
    high_threshold: float | None = None
    blur: int = 3
    """Side of the Gaussian blur before Canny (odd; 1: none): suppresses JPEG noise edges."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 < self.sigma < 1.0, "label.canny_edge.sigma", "must be in (0, 1)")
        fixed = (self.low_threshold, self.high_threshold)
        check(fixed.count(None) in (0, 2), "label.canny_edge", "set both low_threshold and high_threshold, or neither")
        if None not in fixed:
            check(0 <= self.low_threshold <= self.high_threshold, "label.canny_edge", "needs 0 <= low <= high")
        check(self.blur >= 1 and self.blur % 2 == 1, "label.canny_edge.blur", "must be odd and >= 1")


MODALITY = ModalitySpec(
    name="canny_edge",
    reference="tok_canny_edge@224",
    kind="edge_map",
    folder="labels/canny_edge",
    column="canny_edge",
    max_tokens=14 * 14,
    labeler="four_m.labelers.canny:CannyLabeler",
    labeler_config=CannyConfig(),
    tokenizer_config=VQConfig(),
    card_tasks=("image-to-image",),
    order=70,
)
