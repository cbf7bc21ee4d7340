"""color_palette: 4M-21's colour palettes, seven per image (1 to 7 colours), one length drawn per
training example; tokens ``v1=<n>`` then ``v0=<R> v0=<G> v0=<B>`` per colour (real labels: k-means)."""

from dataclasses import dataclass

from four_m.core.config import AlgorithmConfig, check
from four_m.core.modalities import ModalitySpec


@dataclass(frozen=True)
class PaletteConfig(AlgorithmConfig):
    input_size: int = 224
    sample_side: int = 64
    """Pixels clustered: the view shrunk to this side (64 x 64 = 4096 colours are plenty for 7 means)."""
    iterations: int = 20
    """Lloyd iterations of k-means per palette."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.sample_side >= 8, "label.color_palette.sample_side", "must be >= 8")
        check(self.iterations >= 1, "label.color_palette.iterations", "must be >= 1")


MODALITY = ModalitySpec(
    name="color_palette",
    reference="color_palette",
    kind="palette",
    folder="labels/color_palette",
    column="color_palette",
    labeler="four_m.labelers.palette:PaletteLabeler",
    labeler_config=PaletteConfig(),
    card_tasks=("image-to-text", "text-to-image"),
    order=75,
)
