"""det: COCO's 80 classes as boxes, from an object detector (ultralytics YOLO; 4M used ViTDet-H)."""

from dataclasses import dataclass, field

from four_m.core.config import RUNTIME_ONLY, LabelerConfig, check
from four_m.core.modalities import ModalitySpec


@dataclass(frozen=True)
class DetConfig(LabelerConfig):
    input_size: int = 640
    score_threshold: float = 0.25
    """Boxes below this score are not stored (4M keeps confident boxes only)."""
    max_boxes: int = 100
    trust_pickle: bool = field(default=False, metadata=RUNTIME_ONLY)
    """Load a ``.pt`` ``model`` file. ultralytics unpickles ``.pt`` files, and unpickling runs whatever
    code the file names, so only set this for a file from a trusted source (ultralytics' own release
    assets, fetched by ``make models``). A folder of safetensors weights needs no trust. Even when
    true, a ``.pt`` inside the dataset root or scratch space is refused: other jobs can write there."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 <= self.score_threshold <= 1.0, "label.det.score_threshold", "must be in [0, 1]")
        check(self.max_boxes >= 1, "label.det.max_boxes", "must be >= 1")


MODALITY = ModalitySpec(
    name="det",
    reference="det",
    kind="boxes",
    folder="labels/det",
    column="det",
    labeler="four_m.labelers.det:DetLabeler",
    labeler_config=DetConfig(),
    card_tasks=("object-detection",),
    order=60,
)
