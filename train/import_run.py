"""``make import-4m SOURCE=<folder or hub id>``: a released apple/ml-4m model written as run
``runs/<train.run>/`` of this root, as ``make train`` leaves one (``model.safetensors`` + ``model.json``).

A source is a folder with ml-4m's ``config.json`` and ``model.safetensors`` (what its Hugging Face
repositories such as ``EPFL-VILAB/4M-7_B_CC12M`` hold), or such a hub id, fetched with
``huggingface_hub`` where a hub is reachable. The conversion is ``train.import_4m``'s. The run
records, per token modality, the tokenizer its ids belong to: the root's ``tokenizers/<modality>``
where that is an import of ml-4m's own (``tokenize.<modality>.source``, ``tokenize.text.file``),
else ``ml-4m:<its name>`` (``ml-4m:tok_depth@224``), which ``make sample``/``eval``/``finetune``
refuse by name until the root has that tokenizer. ``LEAVE_OUT=<ml-4m names>`` converts a
checkpoint without modalities this project does not have (4M-21's ``t5_caption``...), recorded in
``model.json`` as ``left_out``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import load_file, save_model

from four_m.core.config import Config, shaping_hash
from four_m.core.dataset_root import DatasetRoot, atomic_path, write_text_atomic
from four_m.core.errors import UserError
from four_m.core.runs import DESCRIPTION, mark_run
from four_m.core.storage import RootPath
from four_m.tokenize.ml4m_tokenizer import is_imported
from four_m.tokenize.registry import TRAINED, tokenizer_dir, tokenizer_id
from four_m.tokenize.text import CONFIG_FILE as TEXT_CONFIG
from four_m.train.import_4m import convert

CONFIG, WEIGHTS = "config.json", "model.safetensors"
TOKENIZER_PREFIX = "ml-4m:"
"""A run's tokenizer id for ids of ml-4m's own tokenizers: ``ml-4m:<its modality name>``."""


@dataclass(frozen=True)
class ImportReport:
    run: RootPath
    source: str
    modalities: dict[str, str]
    left_behind: tuple[str, ...]
    left_out: dict[str, int]
    parameters: int

    def lines(self) -> list[str]:
        pairs = ", ".join(f"{ours} <- {theirs}" for ours, theirs in self.modalities.items())
        lines = [f"import-4m: {self.source} -> {self.run} ({self.parameters:,} parameters); modalities {pairs}"]
        if self.left_behind:
            lines.append(f"import-4m: left behind (never read by ml-4m): {', '.join(self.left_behind)}")
        if self.left_out:
            counts = ", ".join(f"{name} ({count} tensors)" for name, count in self.left_out.items())
            lines.append(f"import-4m: left out as asked (LEAVE_OUT): {counts}")
        return lines


def source_folder(source: str) -> Path:
    """A local folder as it is; otherwise a hub id, downloaded (its config and weights only)."""
    folder = Path(source)
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=[CONFIG, WEIGHTS]))
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one line naming the source
        raise UserError(f"cannot read {source!r}: not a folder, and the hub says {type(err).__name__}: {err}") from None


def run_import(config: Config, source: str, leave_out: Sequence[str] = ()) -> ImportReport:
    folder = source_folder(source)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise UserError(f"{folder} has no {name}: an ml-4m model folder holds {CONFIG} and {WEIGHTS}")
    reference = json.loads((folder / CONFIG).read_text())
    imported = convert(reference, load_file(str(folder / WEIGHTS)), leave_out)
    model = imported.model
    root = DatasetRoot(config.root)
    run = root / f"runs/{config.train.run}"
    with atomic_path(run / WEIGHTS) as temp:
        save_model(model, str(temp))
    described = {
        "model": asdict(model.config),
        "modalities": [asdict(m) for m in model.modalities],
        "tokenizers": {
            m.name: _tokenizer(root, m.name, imported.references[m.name])
            for m in model.modalities
            if m.kind != "pixels"
        },
        "imported_from": source,
        "left_out": list(imported.left_out),
    }
    write_text_atomic(run / DESCRIPTION, json.dumps(described, indent=1))
    mark_run(root, config.train.run, run, shaping_hash(source, list(leave_out)))
    report = (imported.references, imported.left_behind, imported.left_out, model.parameter_count())
    return ImportReport(run, source, *report)


def _tokenizer(root: DatasetRoot, modality: str, reference: str) -> str:
    """The id of the root's tokenizer of ``modality`` if it is ml-4m's (imported), else ml-4m's name for it."""
    folder = tokenizer_dir(root, modality)
    if (folder / TRAINED).is_file() and (is_imported(folder) or _is_ml4m_text(folder)):
        return tokenizer_id(root, modality)
    return f"{TOKENIZER_PREFIX}{reference}"


def _is_ml4m_text(folder: RootPath) -> bool:
    """A text tokenizer read from ml-4m's file: its layout has ml-4m's 200 sentinels."""
    config = folder / TEXT_CONFIG
    return config.is_file() and json.loads(config.read_text()).get("file") is not None
