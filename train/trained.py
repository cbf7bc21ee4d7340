"""A finished training run, loaded for use: the model's weights, and its modalities checked against
the tokenizers that will read and write its tokens.

``make train`` leaves ``runs/<run>/model.safetensors`` (weights, loaded without unpickling anything)
and ``model.json`` (the model's size and its modalities with their vocabularies). Generation feeds
tokenizer ids into the model and tokenizer decoders read the model's ids back, so a run whose
vocabularies differ from the current ``tokenizers/`` would produce garbage silently: it stops here,
naming both sides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from safetensors import safe_open
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


def load_trained(config: Config) -> TrainedRun:
    """``<root>/runs/<train.run>/``'s final weights, checked against ``<root>/tokenizers/``."""
    root = DatasetRoot(config.root)
    directory = root / f"runs/{config.train.run}"
    described, weights = directory / DESCRIPTION, directory / "model.safetensors"
    if not (described.is_file() and weights.is_file()):
        raise RunMismatchError(f"no trained model in {directory} (model.json + model.safetensors): run `make train`")
    spec = json.loads(described.read_text())
    modalities = [ModelModality.from_dict(m) for m in spec["modalities"]]
    tokenizers = {}
    for modality in (m for m in modalities if m.layout != "pixels"):  # pixels have no tokenizer
        try:
            tokenizer = load_tokenizer(root, modality.name)
        except FileNotFoundError as err:
            raise RunMismatchError(str(err)) from None
        trained_on = spec["tokenizers"][modality.name]
        if tokenizer.vocab_size != modality.vocab_size or tokenizer_id(root, modality.name) != trained_on:
            raise RunMismatchError(
                f"{modality.name}: run {directory.name} was trained on tokenizer {trained_on} ({modality.vocab_size}"
                f" ids), but tokenizers/{modality.name} is {tokenizer_id(root, modality.name)} ({tokenizer.vocab_size}"
                " ids): the tokenizers were retrained after the run; retrain it or restore them"
            )
        tokenizers[modality.name] = tokenizer
    model = FourM(ModelConfig(**spec["model"]), modalities)
    load_weights(model, weights, directory.name)
    task = TaskConfig(**{k: tuple(v) for k, v in spec["task"].items()}) if "task" in spec else None
    return TrainedRun(directory, model.eval(), tokenizers, task)


def load_weights(model: FourM, weights: RootPath, run: str) -> None:
    """``model.safetensors`` into ``model``, once its weights' names show it is this version's model."""
    with local_file(weights) as local:  # the run folder may be on a remote root
        with safe_open(str(local), "pt") as saved:  # reads the header only
            check_weight_names(model, saved.keys(), run)
        load_model(model, str(local))
