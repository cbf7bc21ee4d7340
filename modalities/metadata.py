"""metadata: 4M-21's image metadata, one value per key (its key ids 0..20), computed from the image,
its url-list row and this run's other labels; keys whose source did not run are left out."""

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from four_m.core.config import AlgorithmConfig, check
from four_m.core.modalities import ModalitySpec


@dataclass(frozen=True)
class Bins:
    """How one key's raw value becomes its bin, the ``v0=<bin>`` token (ml-4m's MetadataTransform):
    with ``thresholds``, how many of them it reaches; with ``span`` (low, high), its place among
    ``RANGE_BINS`` bins of the span, clipped to it; else the value divided by ``step``, rounded down."""

    step: float = 1.0
    thresholds: tuple[float, ...] = ()
    span: tuple[float, float] | None = None


RANGE_BINS = 50
COUNT = Bins()
"""A count is its own bin."""
SIDE = Bins(step=32)
"""An image side, by 32 px."""

BINS: Mapping[str, Bins] = MappingProxyType(
    {
        "original_width": SIDE,
        "original_height": SIDE,
        "caption_n_chars": COUNT,
        "caption_n_words": COUNT,
        "caption_n_sentences": COUNT,
        "n_humans": COUNT,
        "n_sam_instances": COUNT,
        "n_coco_instances": COUNT,
        "coco_instance_diversity": COUNT,
        "colorfulness": Bins(span=(0.0, 150.0)),
        "brightness": Bins(span=(0.0, 255.0)),
        "contrast": Bins(span=(0.0, 127.0)),
        "saturation": Bins(span=(0.0, 255.0)),
        "entropy": Bins(span=(0.0, 10.0)),
        "walkability": Bins(span=(0.0, 1.0)),
        "objectness": Bins(span=(0.0, 1.0)),
        "semantic_diversity": COUNT,
        "geometric_complexity": Bins(span=(0.0, 0.75)),
        "occlusion_score": Bins(span=(0.0, 0.25)),
        "watermark_score": Bins(thresholds=(0.5,)),
        "aesthetic_score": Bins(thresholds=(4.5, 5.5)),
    }
)
"""4M-21's metadata keys, each with its binning: the one list of them (the labeler computes these
keys, the tokenizer bins them)."""
KEYS = tuple(BINS)
"""The keys in id order: a key's index is its id, the ``v1=<id>`` token (ml-4m's fixed map, so that
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
