"""Object detection with ultralytics YOLO, COCO's 80 classes: boxes for 4M's ``det`` modality.

Boxes are (x0, y0, x1, y1) normalised to [0, 1] on the label view, with the class name and the
score; boxes under ``score_threshold`` are not stored. Random-init models name their classes
'0'..'79': those are mapped to COCO's names.

Weights: ultralytics' own ``.pt`` files are pickles, and unpickling runs whatever code the file
names. So the format loaded by default is a folder of ``model.safetensors`` (the state dict) and
``config.json`` (the name of an architecture YAML shipped with ultralytics, and the class names):
loading builds that architecture and copies the tensors in, running nothing from the folder. The
tiny variant (``yolov8n.yaml``, random weights) is such a folder, and ``convert_pickle`` turns a
trusted ``.pt`` into one. A ``.pt`` loads only with ``label.det.trust_pickle``, and never from the
dataset root or scratch space, which other jobs (and, on a shared machine, users) can write.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from four_m.core.coco import COCO_THINGS
from four_m.core.errors import UserError
from four_m.labelers.pretrained import PretrainedLabeler
from four_m.modalities.det import DetConfig

if TYPE_CHECKING:
    from ultralytics import YOLO

BOX_FORMAT = "x0,y0,x1,y1 in [0,1] of the label view; class name; score"
TINY_ARCHITECTURE = "yolov8n.yaml"
PRODUCTION_ARCHITECTURE = "yolov8x.yaml"
"""configs/cc12m.yaml's yolov8x.pt, as ultralytics builds it (COCO's 80 classes)."""
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ARCHITECTURE_NAME = re.compile(r"[A-Za-z0-9_-]+\.yaml")
"""A bare file name: no folder, nothing that ultralytics' file search would expand."""
BOX_TYPE = pa.struct(
    [
        ("x0", pa.float32()),
        ("y0", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("class", pa.string()),
        ("score", pa.float32()),
    ]
)


class UntrustedWeightsError(UserError):
    """Configured weights are a pickle, which runs code when loaded, and are not trusted to."""


class DetLabeler(PretrainedLabeler):
    name = "det"
    tiny_marker = "done-safetensors"  # the tiny folder held a pickle (yolo.pt) next to "done" before
    cfg: DetConfig

    def provenance(self) -> dict[str, str]:
        return {**super().provenance(), "score_threshold": str(self.cfg.score_threshold), "box_format": BOX_FORMAT}

    def schema(self) -> pa.Schema:
        return pa.schema([("det", pa.list_(BOX_TYPE))])

    def build_tiny(self, directory: Path) -> None:
        save_safetensors(build_architecture(TINY_ARCHITECTURE), directory)

    def build_production(self, directory: Path) -> None:
        save_safetensors(build_architecture(PRODUCTION_ARCHITECTURE), directory)

    def fetch(self) -> Path:
        """Ultralytics' release assets (yolov8x.pt, yolo11x.pt, ...) are fetched to the configured
        path when missing there; a folder or a file already there is taken as it is."""
        if Path(self.cfg.model).exists():
            return Path(self.cfg.model)
        from ultralytics.utils.downloads import attempt_download_asset

        return Path(attempt_download_asset(self.cfg.model))

    def load(self, source: str, revision: str | None) -> None:
        from ultralytics.utils import patches

        # ultralytics' patched Image.open would pip-install pi-heif on the first unknown image.
        patches._pil_plugins_registered = True

        path = Path(source)
        if path.is_dir():
            self.model = load_safetensors(path)
        elif path.is_file():
            self.model = self._load_pickle(path)
        else:
            raise FileNotFoundError(f"no YOLO weights folder or .pt file at {source}")
        names = self.model.names
        numeric = all(str(names[i]) == str(i) for i in names)
        self.class_names = [COCO_THINGS[i] if numeric else names[i] for i in sorted(names)]

    def _load_pickle(self, path: Path) -> YOLO:
        """ultralytics' own loader, which unpickles: only a trusted file, from outside what others can write."""
        from ultralytics import YOLO

        if not self.cfg.trust_pickle:
            raise UntrustedWeightsError(
                f"label.det.model {path} is a pickle (.pt), and loading a pickle runs any code it holds: set "
                "label.det.trust_pickle: true only for a file from a trusted source (such as ultralytics' release "
                "assets fetched by `make models`), or convert it once to a safetensors folder "
                "(four_m.labelers.det.convert_pickle) and set label.det.model to that folder"
            )
        area = self.writable_area_of(path)
        if area is not None:
            raise UntrustedWeightsError(
                f"label.det.model {path} is a pickle inside {area}, which other jobs can write: it is not "
                "loaded even with label.det.trust_pickle; keep trusted weights outside the dataset root and "
                "scratch space, or convert them to a safetensors folder"
            )
        return YOLO(str(path))

    def label(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        import torch

        # ultralytics' select_device() sets torch's CPU threads to cpu_count - 1 for the whole
        # process (1 on two cores), slowing every other labeler in it: keep the caller's setting.
        threads = torch.get_num_threads()
        try:
            results = self._predict(pixels)
        finally:
            torch.set_num_threads(threads)
        return [{"det": self._boxes(result)} for result in results]

    def _predict(self, pixels: np.ndarray) -> list:
        return self.model.predict(
            [image[:, :, ::-1] for image in pixels],  # ultralytics takes BGR arrays, like cv2
            imgsz=self.cfg.input_size,
            conf=self.cfg.score_threshold,
            max_det=self.cfg.max_boxes,
            device=str(self.device),
            verbose=False,
        )

    def _boxes(self, result) -> list[dict[str, Any]]:
        boxes = result.boxes
        corners = boxes.xyxyn.clamp(0, 1).cpu().numpy()
        return [
            {
                "x0": float(x0),
                "y0": float(y0),
                "x1": float(x1),
                "y1": float(y1),
                "class": self.class_names[int(cls)],
                "score": float(score),
            }
            for (x0, y0, x1, y1), cls, score in zip(
                corners, boxes.cls.cpu().numpy(), boxes.conf.cpu().numpy(), strict=True
            )
        ]


def build_architecture(name: str) -> YOLO:
    """A random-init ``YOLO`` of ``name``, an architecture YAML shipped with ultralytics.

    Only shipped YAMLs are built: building evaluates parts of one (its ``activation``), and given a
    bare name ultralytics would first take a same-named file from the working folder. The shipped
    YAML is copied under ``name`` into a private temporary folder because ultralytics reads the
    scale from the file name (``yolov8n.yaml``: n) while one shipped file holds every scale.
    """
    from ultralytics import YOLO

    shipped = _shipped_architecture(name)
    with tempfile.TemporaryDirectory(prefix="four_m-yolo-") as temp:
        file = Path(temp) / name
        shutil.copyfile(shipped, file)
        return YOLO(str(file))


def save_safetensors(yolo: YOLO, directory: Path) -> None:
    """Write ``yolo`` as a weights folder that loads without unpickling (see ``load_safetensors``).

    Tensors are stored in half precision, as ultralytics stores its own ``.pt`` files: a converted
    model keeps its numbers, and the tiny variant labels exactly as it did when it was a ``.pt``.
    """
    from safetensors.torch import save_file

    architecture = Path(yolo.model.yaml["yaml_file"]).name
    _shipped_architecture(architecture)  # refuse now a folder that could not be loaded later
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in yolo.model.state_dict().items()}
    names = [str(yolo.model.names[i]) for i in sorted(yolo.model.names)]
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps({"architecture": architecture, "names": names}, indent=1))


def load_safetensors(directory: Path) -> YOLO:
    """A ``YOLO`` from a weights folder: the named shipped architecture, then the stored tensors.

    Nothing in the folder is executed or unpickled, whoever wrote it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    architecture, names = _read_config(directory / CONFIG_FILE)
    yolo = build_architecture(architecture)
    weights = directory / WEIGHTS_FILE
    try:
        yolo.model.load_state_dict(load_file(weights))
    except (SafetensorError, RuntimeError) as err:
        raise ValueError(f"{weights} is not a safetensors state dict of {architecture}: {err}") from None
    classes = len(yolo.model.names)
    if len(names) != classes:
        raise ValueError(f"{directory / CONFIG_FILE} names {len(names)} classes, {architecture} has {classes}")
    yolo.model.names = dict(enumerate(names))
    return yolo


def convert_pickle(weights: str | os.PathLike, directory: str | os.PathLike) -> None:
    """Re-save a ``.pt`` as a weights folder once, so that later runs need not trust a pickle.

    This unpickles ``weights``: run it only on a file from a trusted source.
    """
    from ultralytics import YOLO

    save_safetensors(YOLO(os.fspath(weights)), Path(directory))


def _shipped_architecture(name: str) -> Path:
    """The YAML shipped with ultralytics that builds ``name``: the file itself or, by ultralytics'
    own rule, its family's (``yolov8n.yaml`` is ``yolov8.yaml`` at scale n)."""
    import ultralytics

    if ARCHITECTURE_NAME.fullmatch(name):
        family = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", Path(name).stem) + ".yaml"
        shipped = Path(ultralytics.__file__).parent / "cfg" / "models"
        for candidate in (name, family):
            found = sorted(shipped.rglob(candidate))
            if found:
                return found[0]
    raise ValueError(f"{name!r} is not a model architecture shipped with ultralytics")


def _read_config(file: Path) -> tuple[str, list[str]]:
    """``config.json``'s architecture name and class names, checked: the folder may be anyone's."""
    try:
        config = json.loads(file.read_text())
        architecture, names = config["architecture"], config["names"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{file} is not a YOLO weights config ({type(err).__name__}: {err})") from None
    if not isinstance(architecture, str) or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{file} needs an architecture name and a list of class names")
    return architecture, names
