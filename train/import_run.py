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

A run is never lost to an import: it holds the run's lock (``core.runs.run_lock``, the one ``make
train`` and ``make finetune`` hold), so it waits for no training and no training overwrites it;
it refuses a run that exists unless told to replace it (``REPLACE=1``, ``--replace``); and it
writes the new run whole in a folder beside it before swapping it in (``_swap_in``), so a crash
leaves the old run or the new one, never a mix. A source that is not what ml-4m writes (a
``config.json`` that is no JSON object, a ``model.safetensors`` cut short or of another format,
settings that disagree with the weights) is refused in one line naming the file.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import Tensor

from four_m.core import storage
from four_m.core.config import Config, shaping_hash
from four_m.core.dataset_root import DatasetRoot
from four_m.core.errors import UserError
from four_m.core.runs import DESCRIPTION, run_digests, run_lock, run_state
from four_m.core.storage import RootPath
from four_m.tokenize.ml4m_tokenizer import is_imported
from four_m.tokenize.registry import TRAINED, tokenizer_dir, tokenizer_id
from four_m.tokenize.text import CONFIG_FILE as TEXT_CONFIG
from four_m.train.import_4m import Import4MError, convert

CONFIG, WEIGHTS = "config.json", "model.safetensors"
TOKENIZER_PREFIX = "ml-4m:"
"""A run's tokenizer id for ids of ml-4m's own tokenizers: ``ml-4m:<its modality name>``."""
BUILDING, ASIDE = ".{run}.importing-{id}", ".{run}.replaced"
"""Beside ``runs/<run>``: the new run while it is written; the old one while the new one moves in."""
log = logging.getLogger(__name__)


class RunExistsError(UserError):
    """The run to import into is there, and replacing it was not asked for."""


@dataclass(frozen=True)
class ImportReport:
    run: RootPath
    source: str
    modalities: dict[str, str]
    left_behind: tuple[str, ...]
    left_out: dict[str, int]
    parameters: int
    replaced: bool = False
    """A run was there, and was replaced as asked (``--replace``)."""

    def lines(self) -> list[str]:
        pairs = ", ".join(f"{ours} <- {theirs}" for ours, theirs in self.modalities.items())
        lines = [f"import-4m: {self.source} -> {self.run} ({self.parameters:,} parameters); modalities {pairs}"]
        if self.replaced:
            lines.append(f"import-4m: replaced the run that was in {self.run} as asked (--replace), all of it")
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


def run_import(config: Config, source: str, leave_out: Sequence[str] = (), replace: bool = False) -> ImportReport:
    """Convert ``source`` into run ``train.run``: refused if that run exists, unless ``replace``."""
    root = DatasetRoot(config.root)
    run = root / f"runs/{config.train.run}"
    with root.lock(run_lock(config.train.run)):
        _recover(run)
        replaced = run.exists()
        if replaced and not replace:
            raise RunExistsError(
                f"{run} exists: import-4m would replace all of it (weights, logs, checkpoints, eval, samples);"
                " name a new run (SET=train.run=<name>) or replace it with REPLACE=1 (--replace)"
            )
        folder = source_folder(source)
        reference, weights = read_checkpoint(folder)
        try:
            imported = convert(reference, weights, leave_out)
        except Import4MError as err:
            raise Import4MError(f"{folder}: {err}") from None
        model = imported.model
        described = {
            "model": asdict(model.config),
            "modalities": [asdict(m) for m in model.modalities],
            "tokenizers": {
                m.name: _tokenizer(root, m.name, imported.references[m.name])
                for m in model.modalities
                if m.layout != "pixels"
            },
            "imported_from": source,
            "left_out": list(imported.left_out),
        }
        with _building(run) as built:
            save_model(model, str(built / WEIGHTS))
            (built / DESCRIPTION).write_text(json.dumps(described, indent=1))
            digests = run_digests(root, config.train.run, built)
            _swap_in(built, run)
        # After the run is in place, as every marker: ``make verify`` checks its model against it.
        run_state(root, config.train.run).record(0, 0, digests, shaping_hash(source, list(leave_out)))
    report = (imported.references, imported.left_behind, imported.left_out, model.parameter_count())
    return ImportReport(run, source, *report, replaced=replaced)


def read_checkpoint(folder: Path) -> tuple[Any, dict[str, Tensor]]:
    """The folder's ``config.json`` (any JSON: ``convert`` checks it) and its weights; a file that is
    no JSON, or no whole safetensors file (cut short, a pickle renamed), refused naming it."""
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise UserError(f"{folder} has no {name}: an ml-4m model folder holds {CONFIG} and {WEIGHTS}")
    try:
        reference = json.loads((folder / CONFIG).read_text())
    except ValueError as err:  # not JSON, not text
        raise Import4MError(f"{folder / CONFIG}: not JSON ({err})") from None
    try:
        weights = load_file(str(folder / WEIGHTS))  # safetensors: tensors only, nothing unpickled
    except SafetensorError as err:
        raise Import4MError(f"{folder / WEIGHTS}: not a whole safetensors file ({err})") from None
    return reference, weights


@contextmanager
def _building(run: RootPath) -> Iterator[Path]:
    """A new folder to write the run in before it is swapped in: beside the run on a local root
    (so the swap is a rename), in this user's scratch for a remote one; removed if anything fails."""
    built = storage.scratch(run.parent) / BUILDING.format(run=run.name, id=uuid.uuid4().hex[:8])
    built.mkdir(parents=True)
    try:
        yield built
    finally:
        shutil.rmtree(built, ignore_errors=True)  # gone already once swapped in


def _swap_in(built: Path, run: RootPath) -> None:
    """Put the finished ``built`` folder at ``run``, replacing what is there. The old run is first
    renamed aside, so at every moment a whole run is at ``run`` or aside, which ``_recover`` puts
    back; locally both steps are renames, on an object store copies (``model.json`` last)."""
    aside = run.parent / ASIDE.format(run=run.name)
    if run.exists():
        storage.move_folder(run, aside)
    storage.publish_folder(built, run, last=DESCRIPTION)
    storage.remove_tree(aside)


def _recover(run: RootPath) -> None:
    """Finish or undo a swap that a crash cut short, and remove the folders killed imports were
    writing (the run's lock is held: no import is writing them now)."""
    aside = run.parent / ASIDE.format(run=run.name)
    if aside.exists():
        if (run / DESCRIPTION).is_file():  # the new run is whole: the old one was on its way out
            storage.remove_tree(aside)
        elif run.exists():
            raise UserError(
                f"{run} is not a whole run and {aside} holds the run an import was replacing when it stopped:"
                " keep the one you want under the run's name and delete the other"
            )
        else:
            storage.move_folder(aside, run)
            log.warning("put back %s, whose replacement by an import was cut short", run)
    scratch = storage.scratch(run.parent)
    for stale in scratch.glob(BUILDING.format(run=run.name, id="*")) if scratch.is_dir() else ():
        shutil.rmtree(stale, ignore_errors=True)


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
