"""``make finetune``: train ``train.run`` on this root's token store starting from another run's weights.

What differs from ``make train`` is how the model starts and which of its weights train
(``finetune`` in the config):

- the source run's weights are carried over by meaning (``train.transfer``): modalities both runs
  have keep their embeddings and heads; modalities new to this run start freshly initialised and
  are named in the log; a vocabulary that changed size stops the run, naming its modalities;
- ``new_learning_rate``: the parameters the source did not have train at their own peak rate;
- ``freeze_encoder_steps``: the encoder does not train for the first steps;
- ``lora_rank``: LoRA adapters on the attention and MLP projections, every pretrained weight
  frozen (new modalities' tables and heads still train); the run's ``model.safetensors`` holds the
  merged weights, so ``make sample``, ``make eval`` and a later fine-tune read it as any run.

A resumed fine-tune starts from its own checkpoint, as ``make train`` does; the source is then read
only for which parameters are new.
"""

from __future__ import annotations

import json

import lightning as L
import torch

from four_m.core.config import Config, FinetuneConfig
from four_m.core.dataset_root import DatasetRoot
from four_m.core.errors import UserError
from four_m.core.runs import DESCRIPTION
from four_m.train.lora import add_lora, merge_lora
from four_m.train.model import FourM, ModelConfig, ModelModality
from four_m.train.module import FourMTraining
from four_m.train.trained import load_weights
from four_m.train.transfer import transfer_weights


class FinetuneStart:
    """How a fine-tune's model starts (``prepare``) and what its run saves (``finished``)."""

    def __init__(self, config: Config):
        cfg = config.finetune
        if cfg.from_run is None:
            raise UserError("finetune.from_run is not set: FROM_RUN=<run> names the run under runs/ to start from")
        if cfg.from_run == config.train.run:
            raise UserError(
                f"train.run is {cfg.from_run!r}, the run to start from: name a new run"
                " (finetune.train.run, or SET=train.run=...)"
            )
        self.cfg: FinetuneConfig = cfg
        self.notes: list[str] = []
        """What the start did, for the run's summary: the transfer, LoRA, the freeze."""
        self.directory = DatasetRoot(config.root) / f"runs/{cfg.from_run}"
        if not (self.directory / DESCRIPTION).is_file() or not (self.directory / "model.safetensors").is_file():
            raise UserError(f"no finished run in {self.directory} (model.json + model.safetensors) to fine-tune")

    def model_config(self) -> ModelConfig:
        """The source's architecture, which the fine-tune keeps (``train.model`` is not read): a
        named size, or an imported ml-4m model's with its options."""
        return ModelConfig(**json.loads((self.directory / DESCRIPTION).read_text())["model"])

    def source(self) -> FourM:
        spec = json.loads((self.directory / DESCRIPTION).read_text())
        model = FourM(ModelConfig(**spec["model"]), [ModelModality.from_dict(m) for m in spec["modalities"]])
        load_weights(model, self.directory / "model.safetensors", self.directory.name)
        return model

    def prepare(self, module: FourMTraining, resuming: bool) -> list[L.Callback]:
        """Start ``module`` from the source (unless resuming), mark its new parameters, add LoRA;
        returns the callbacks the run needs (the encoder's freeze)."""
        source = self.source()
        if not resuming:
            self.notes += [
                f"{line} (from run {self.directory.name})" for line in transfer_weights(source, module.model).lines()
            ]
        else:
            self.notes.append(
                f"transfer: none, resuming the fine-tune's own checkpoint (from run {self.directory.name})"
            )
        old = {m.vocabulary for m in source.modalities} | {m.name for m in source.modalities}
        module.new_parameters = frozenset(
            f"model.{name}"
            for name, _ in module.model.named_parameters()
            if name.startswith(("token_embeddings.", "heads.", "patch_embeddings.")) and name.split(".")[1] not in old
        )
        module.new_learning_rate = self.cfg.new_learning_rate
        if self.cfg.lora_rank:
            add_lora(module.model, self.cfg.lora_rank, self.cfg.lora_alpha, self.cfg.lora_targets)
            for name, parameter in module.named_parameters():
                if name in module.new_parameters:  # a new modality has nothing pretrained to adapt
                    parameter.requires_grad_(True)
            trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
            total = sum(p.numel() for p in module.parameters())
            self.notes.append(f"finetune: LoRA rank {self.cfg.lora_rank}, {trainable:,} of {total:,} parameters train")
        if self.cfg.freeze_encoder_steps:
            self.notes.append(f"finetune: encoder frozen for the first {self.cfg.freeze_encoder_steps} steps")
            return [FreezeEncoder(self.cfg.freeze_encoder_steps)]
        return []

    def finished(self, model: FourM) -> dict:
        """Merge LoRA into the model before it is saved; what the run's ``model.json`` records."""
        if self.cfg.lora_rank:
            merge_lora(model)
        return {"finetuned_from": self.directory.name, "finetune": {"lora_rank": self.cfg.lora_rank}}


class FreezeEncoder(L.Callback):
    """The encoder's trainable parameters (blocks and norm) get no gradient for the first ``steps``
    steps. Under DDP this needs ``train.strategy: ddp_find_unused_parameters_true``."""

    def __init__(self, steps: int):
        self.steps = steps
        self.encoder: list[torch.nn.Parameter] = []

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        parts = (module.model.encoder, module.model.encoder_norm)
        self.encoder = [p for part in parts for p in part.parameters() if p.requires_grad]

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_index: int) -> None:
        frozen = trainer.global_step < self.steps
        for parameter in self.encoder:
            parameter.requires_grad_(not frozen)
