"""A finished training run, loaded for use: the model's weights, and its modalities checked against
the tokenizers that will read and write its tokens.

``make train`` leaves ``runs/<run>/model.safetensors`` (weights, loaded without unpickling anything)
and ``model.json`` (the model's size and its modalities with their vocabularies). Generation feeds
tokenizer ids into the model and tokenizer decoders read the model's ids back, so a run whose
vocabularies differ from the current ``tokenizers/`` would produce garbage silently: it stops here,
naming both sides. So does a ``model.json`` or ``model.safetensors`` that cannot be what this
version wrote (edited, cut short, another program's file): one line naming the file, for every
reader of a run (sample, eval, a fine-tune's source, the probe's backbone).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model

from four_m.core.config import Config, TaskConfig
from four_m.core.dataset_root import DatasetRoot
from four_m.core.errors import UserError
from four_m.core.runs import DESCRIPTION
from four_m.core.storage import RootPath, local_file
from four_m.tokenize.base import Tokenizer
from four_m.tokenize.registry import load_tokenizer, tokenizer_id
from four_m.train.model import FourM, ModelConfig, ModelModality, check_weight_names


class RunMismatchError(UserError):
    """A trained run and the dataset root's tokenizers disagree, or the run is not there."""


class RunFileError(UserError):
    """A run's ``model.json`` or ``model.safetensors`` that this version cannot read; the message names it."""


@dataclass(frozen=True)
class RunDescription:
    """A run's ``model.json``, read and checked."""

    model: ModelConfig
    modalities: list[ModelModality]
    spec: dict[str, Any]
    """All of it: the tokenizers, a task, where it came from."""


@dataclass
class TrainedRun:
    directory: RootPath
    model: FourM
    """In eval mode, on the CPU."""
    tokenizers: dict[str, Tokenizer]
    """Token modality -> the tokenizer whose vocabulary the model was trained on (pixel inputs have none)."""
    task: TaskConfig | None = None
    """The fixed task the run was trained on (``train.task``), None for any-to-any."""

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.model.modalities)

    @property
    def predicted(self) -> tuple[str, ...]:
        """The modalities the model has a head for (an imported ml-4m model's ``domains_out``)."""
        return tuple(m.name for m in self.model.modalities if m.as_target)


def load_trained(config: Config) -> TrainedRun:
    """``<root>/runs/<train.run>/``'s final weights, checked against ``<root>/tokenizers/``."""
    root = DatasetRoot(config.root)
    directory = root / f"runs/{config.train.run}"
    described, weights = directory / DESCRIPTION, directory / "model.safetensors"
    if not (described.is_file() and weights.is_file()):
        raise RunMismatchError(f"no trained model in {directory} (model.json + model.safetensors): run `make train`")
    description = read_description(described)
    spec, modalities = description.spec, description.modalities
    tokenizers = {}
    for modality in (m for m in modalities if m.layout != "pixels"):  # pixels have no tokenizer
        try:
            tokenizer = load_tokenizer(root, modality.name)
        except FileNotFoundError as err:
            raise RunMismatchError(str(err)) from None
        trained_on = spec.get("tokenizers", {}).get(modality.name)
        if tokenizer.vocab_size != modality.vocab_size or tokenizer_id(root, modality.name) != trained_on:
            raise RunMismatchError(
                f"{modality.name}: run {directory.name} was trained on tokenizer {trained_on} ({modality.vocab_size}"
                f" ids), but tokenizers/{modality.name} is {tokenizer_id(root, modality.name)} ({tokenizer.vocab_size}"
                " ids): the tokenizers were retrained after the run; retrain it or restore them"
            )
        tokenizers[modality.name] = tokenizer
    model = FourM(description.model, modalities)
    load_weights(model, weights, directory.name)
    task = TaskConfig(**{k: tuple(v) for k, v in spec["task"].items()}) if "task" in spec else None
    return TrainedRun(directory, model.eval(), tokenizers, task)


def read_description(file: RootPath) -> RunDescription:
    """A run's ``model.json``: the model's settings and its modalities, each field of the type this
    version writes; else one line naming the file and what in it is wrong."""
    try:
        spec = json.loads(file.read_text())
    except ValueError as err:  # not JSON, not text
        raise RunFileError(f"{file}: not JSON ({err})") from None
    shaped = isinstance(spec, dict) and isinstance(spec.get("model"), dict) and isinstance(spec.get("modalities"), list)
    if not shaped or not isinstance(spec.get("tokenizers", {}), dict):
        raise RunFileError(f"{file}: not a run's model.json (an object of model, modalities and tokenizers)")
    model = _fields(ModelConfig, spec["model"], f"{file}: model")
    modalities = [
        _fields(
            ModelModality, ModelModality.current_fields(m) if isinstance(m, dict) else m, f"{file}: modalities[{i}]"
        )
        for i, m in enumerate(spec["modalities"])
    ]
    return RunDescription(model, modalities, spec)


_PLAIN = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}
"""A plain field's type -> the JSON values it takes (a bool is an int to Python, never to us)."""


def _fields(cls: type, values: object, where: str) -> Any:
    """``cls(**values)`` once every key is a field of ``cls`` and every plain field has its type."""
    if not isinstance(values, dict):
        raise RunFileError(f"{where} is {values!r}, not an object")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise RunFileError(f"{where} has {unknown}, which this version's {cls.__name__} does not have")
    for key, value in values.items():
        kinds = _PLAIN.get(hints[key])
        if kinds and (not isinstance(value, kinds) or (isinstance(value, bool) and hints[key] is not bool)):
            raise RunFileError(f"{where}.{key} is {value!r}, not {hints[key].__name__}")
    try:
        return cls(**values)
    except (TypeError, ValueError, UserError) as err:  # a missing field; a value out of range
        raise RunFileError(f"{where}: {err}") from None


def load_weights(model: FourM, weights: RootPath, run: str) -> None:
    """``model.safetensors`` into ``model``, once its weights' names and shapes show it is this
    version's model as ``model.json`` describes it; a file that is no whole safetensors file (cut
    short, another format renamed) is refused naming it."""
    try:
        with local_file(weights) as local:  # the run folder may be on a remote root
            with safe_open(str(local), "pt") as saved:  # reads the header only
                check_weight_names(model, saved.keys(), run)
                _check_shapes(model, {key: saved.get_slice(key).get_shape() for key in saved.keys()}, weights)
            load_model(model, str(local))
    except SafetensorError as err:
        raise RunFileError(f"{weights}: not a whole safetensors file ({err})") from None


def _check_shapes(model: FourM, saved: dict[str, list[int]], weights: RootPath) -> None:
    for name, tensor in model.state_dict().items():
        if list(tensor.shape) != saved[name]:
            raise RunFileError(
                f"{weights}: {name} has shape {tuple(saved[name])}, the model of model.json needs {tuple(tensor.shape)}"
            )
