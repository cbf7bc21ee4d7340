"""rgb: the image itself, the label view of the downloaded photo, tokenized by a VQ tokenizer."""

from four_m.core.config import VQConfig
from four_m.core.modalities import ModalitySpec

MODALITY = ModalitySpec(
    name="rgb",
    kind="image",
    folder="images",
    column="jpg",
    max_tokens=14 * 14,
    tokenizer_config=VQConfig(),
    no_metric="the input of `make eval` (rgb -> X): the tokenizer's own PSNR is in its trained.json",
    order=0,
)
