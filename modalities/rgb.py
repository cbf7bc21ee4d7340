"""rgb: the image itself, the label view of the downloaded photo, tokenized by a VQ tokenizer; its
pixels are also an encoder input of their own, ``rgb_pixels``."""

from four_m.core.config import VQConfig
from four_m.core.modalities import ModalitySpec, PixelInput

MODALITY = ModalitySpec(
    name="rgb",
    reference="tok_rgb@224",
    kind="image",
    folder="images",
    column="jpg",
    max_tokens=14 * 14,
    tokenizer_config=VQConfig(),
    order=0,
    # 4M's rgb@224: 16x16 patches of the 224 px view, standardised with ImageNet's mean and std.
    pixel_input=PixelInput(name="rgb_pixels", patch_size=16, reference="rgb@224"),
)
